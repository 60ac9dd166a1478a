"""What `clustermesh status` says of one remote cluster when something is wrong, in virtual time (looptime): it must
never say ready while the cluster is broken, and must say why."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.mesh import Mesh
from agent.remotes import ClusterRegistry, RemoteCluster
from agent.view import MergedView
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model import converters, keys, wire
from clustermesh.model.admission import Ownership
from clustermesh.model.clusters import ClusterInfo
from kvstore import errors
from kvstore.backend import Backend, PutOp
from kvstore.config import EtcdConfig
from kvstore.memory import MemoryBackend

C1 = ClusterInfo("c1", 1)
C2 = ClusterInfo("c2", 2)
PREFIXES = (keys.NODES_PREFIX, keys.IPCACHE_PREFIX, keys.IDENTITIES_PREFIX, keys.SERVICES_PREFIX)
CONFIG = EtcdConfig(["https://c2.test:2379"], Path("ca"), Path("c"), Path("k"))


async def publish(backend: MemoryBackend, cluster: ClusterInfo, *, canaries: bool = True, beat: str = "t0") -> None:
    ops = [
        PutOp(keys.cluster_config_key(cluster.name), wire.encode(converters.cluster_config(cluster))),
        PutOp(keys.HEARTBEAT_KEY, beat.encode()),
    ]
    if canaries:
        ops += [PutOp(keys.synced_key(cluster.name, prefix), b"t0") for prefix in PREFIXES]
    await backend.commit(ops)


def remote_of(connect: Callable[[EtcdConfig], Awaitable[Backend]], **options: float) -> RemoteCluster:
    loop = asyncio.get_running_loop()
    return RemoteCluster(
        name="c2",
        config_path=None,
        config=CONFIG,
        view=MergedView("c1"),
        registry=ClusterRegistry(C1),
        ownership=Ownership("c1", ["10.0.0.0/8"]),
        connect=connect,
        clock=loop.time,
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.looptime
async def test_a_frozen_writer_is_never_ready_again_across_reconnects() -> None:
    backend = MemoryBackend()
    await publish(backend, C2)

    async def connect(config: EtcdConfig) -> Backend:
        return backend

    remote = remote_of(connect, heartbeat_max_age=120.0)
    task = asyncio.create_task(remote.run())
    try:
        await asyncio.sleep(1)
        assert remote.ready()
        readiness = []
        for _ in range(600):  # ten minutes in which nothing beats: the apiserver is frozen
            await asyncio.sleep(1)
            readiness.append(remote.ready())
        stale_from = readiness.index(False)
        assert 115 <= stale_from <= 130, "stale after heartbeat_max_age"
        assert not any(readiness[stale_from:]), "a reconnect's first read of the same beat is not a beat"
        assert remote.sessions > 2, "it did reconnect, again and again"
        assert "heartbeat" in (remote.status().last_error or "")
        await backend.put(keys.HEARTBEAT_KEY, b"t1")  # the apiserver thaws
        for _ in range(30):
            await asyncio.sleep(1)
            if remote.ready():
                break
        assert remote.ready()
    finally:
        await cancel_and_wait([task])


class Denying:
    """A backend that refuses some keys to its user, as etcd's auth does."""

    def __init__(self, backend: MemoryBackend, denied: Callable[[str], bool]) -> None:
        self.backend = backend
        self.denied = denied

    def __getattr__(self, name: str) -> object:
        return getattr(self.backend, name)

    async def get(self, key: str) -> object:
        if self.denied(key):
            raise errors.PermissionDenied(f"get {key}: etcd refused user 'remote-c1': etcdserver: permission denied")
        return await self.backend.get(key)


async def settle(remote: RemoteCluster, condition: Callable[[], bool], seconds: int = 60) -> None:
    for _ in range(seconds * 10):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {remote.status()}")


@pytest.mark.looptime
async def test_canaries_never_written_are_named_and_nothing_counts_as_synced() -> None:
    backend = MemoryBackend()
    await publish(backend, C2, canaries=False)

    async def connect(config: EtcdConfig) -> Backend:
        return backend

    remote = remote_of(connect)
    task = asyncio.create_task(remote.run())
    try:
        await settle(remote, lambda: remote.connected and len(remote.problems()) == 4)
        await asyncio.sleep(60)  # and it stays so
        status = remote.status()
        assert not status.ready and status.connected
        assert [p.code for p in status.problems] == [
            "waiting-canary",
            "waiting-nodes",
            "waiting-canary",
            "waiting-nodes",
        ]
        assert "nodes: waiting for the synced canary cilium/synced/c2/cilium/state/nodes/v1" in status.not_ready[0]
        assert status.synced == {"nodes": False, "endpoints": False, "identities": False, "services": False}
    finally:
        await cancel_and_wait([task])


@pytest.mark.looptime
async def test_a_recovered_cluster_forgets_its_old_error_and_a_new_failure_shows_its_own_words() -> None:
    backend = MemoryBackend()
    await publish(backend, C2)
    failures = [errors.EndpointUnreachable("etcd at https://c2.test:2379 is unreachable: connection refused")]

    async def connect(config: EtcdConfig) -> Backend:
        if failures:
            raise failures.pop()
        return backend

    remote = remote_of(connect)
    task = asyncio.create_task(remote.run())
    try:
        await settle(remote, remote.ready)
        status = remote.status()
        assert status.last_error is None and status.last_error_reason is None and status.failures == 1
        backend.available = False  # the etcd goes away under the session ...
        failures.append(errors.NameNotResolved("cannot resolve etcd endpoint https://c2.test:2379: Name not known"))
        await backend.break_connections()
        await settle(remote, lambda: not remote.connected and remote.status().last_error_reason == "dns")
        status = remote.status()
        assert [p.code for p in status.problems] == ["dns"]
        assert "cannot resolve" in status.not_ready[0]
    finally:
        await cancel_and_wait([task])


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("denied", "code", "words"),
    [
        (lambda key: True, "no-role", "grants this certificate's user no role"),
        (lambda key: key.startswith("cilium/cluster-config/"), "wrong-cluster", "holds another cluster's state"),
    ],
)
async def test_a_refused_read_says_whether_the_user_has_no_role_or_the_etcd_is_another_clusters(
    denied: Callable[[str], bool], code: str, words: str
) -> None:
    backend = MemoryBackend()
    await publish(backend, C2)

    async def connect(config: EtcdConfig) -> Backend:
        return Denying(backend, denied)  # type: ignore[return-value]

    remote = remote_of(connect)
    task = asyncio.create_task(remote.run())
    try:
        await settle(remote, lambda: remote.status().last_error_reason == code)
        status = remote.status()
        assert not status.ready
        assert [p.code for p in status.problems] == [code]
        assert words in status.not_ready[0]
        assert "may belong to another cluster" not in status.not_ready[0]
    finally:
        await cancel_and_wait([task])


@pytest.mark.looptime
async def test_a_config_file_named_after_the_local_cluster_leaves_the_agent_not_ready(tmp_path: Path) -> None:
    """Such a file is a peer the user meant to join and did not: `ready` must say so (and `clustermesh status`
    exits 1), not only list it."""
    local = MemoryBackend()
    await publish(local, C1)
    config_dir = tmp_path / "remotes"
    config_dir.mkdir()
    (config_dir / "c1").write_text(
        "endpoints: [https://c9.test:2379]\ntrusted-ca-file: ca\ncert-file: c\nkey-file: k\n"
    )

    async def connect(config: EtcdConfig) -> Backend:
        return local

    mesh = Mesh(C1, EtcdConfig(["https://c1.test:2379"], Path("ca"), Path("c"), Path("k")), config_dir,
                connect=connect, scan_interval=0.1)  # fmt: skip
    task = asyncio.create_task(mesh.run())
    try:
        await asyncio.sleep(5)
        status = mesh.status()
        assert all(cluster.ready for cluster in status.clusters), "the local cluster itself is fine"
        assert not status.ready
        assert [p.code for p in status.problems] == ["config-problem"]
        mesh.refresh_metrics()
        assert mesh.registry.get_sample_value("clustermesh_config_problems") == 1
        assert status.not_ready == [
            "config file c1: named after the local cluster: a cluster is not its own peer; "
            "name it after the peer it is for"
        ]
        (config_dir / "c1").unlink()
        await asyncio.sleep(1)
        assert mesh.status().ready
    finally:
        await cancel_and_wait([task])
