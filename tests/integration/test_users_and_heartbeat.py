"""etcd users and roles of DESIGN section 5 on a real etcd with auth enabled, and the heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from kvstore import errors, etcd, users
from kvstore.heartbeat import HeartbeatReader, HeartbeatWriter
from tests.integration.conftest import EtcdCluster, start_etcd, stop_etcd


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = start_etcd(tmp_path_factory.mktemp("auth"), "c1")

    async def set_up() -> None:
        backend = await cluster.connect("root")
        try:
            await users.ensure_cluster_users(backend, "c1")
            await users.ensure_remote_user(backend, "c1", "c2")
            await users.ensure_cluster_users(backend, "c1")  # twice: idempotent
            await backend.put("cilium/state/nodes/v1/c1/n1", b"{}")
            await backend.put("registry/services/default/web", b"{}")
        finally:
            await backend.close()

    try:
        asyncio.run(set_up())
        yield cluster
    finally:
        stop_etcd(cluster)


@pytest.fixture
async def remote(auth_cluster: EtcdCluster) -> AsyncIterator[etcd.EtcdBackend]:
    backend = await auth_cluster.connect("remote-c2")
    yield backend
    await backend.close()


async def test_users_and_roles_exist(auth_cluster: EtcdCluster) -> None:
    backend = await auth_cluster.connect("root")
    try:
        assert sorted(await backend.users()) == ["admin-c1", "agent-c1", "remote-c2", "root"]
        assert sorted(await backend.roles()) == ["agent-c1", "remote", "root"]
    finally:
        await backend.close()


@pytest.mark.parametrize(
    "key",
    [
        "cilium/state/nodes/v1/c1/n1",
        "cilium/state/ip/v1/default/10.0.0.1",
        "cilium/cluster-config/c1",
        "cilium/synced/c1/cilium/state/nodes/v1",
        "cilium/.heartbeat",
        "registry/ciliumnodes/n1",
    ],
)
async def test_a_remote_user_can_never_write(remote: etcd.EtcdBackend, key: str) -> None:
    with pytest.raises(errors.PermissionDenied, match="remote-c2"):
        await remote.put(key, b"rogue")
    with pytest.raises(errors.PermissionDenied):
        await remote.delete(key)


async def test_a_remote_user_reads_only_what_the_mesh_needs(remote: etcd.EtcdBackend) -> None:
    assert await remote.get("cilium/state/nodes/v1/c1/n1") is not None
    assert await remote.get("cilium/cluster-config/c1") is None  # allowed, just not written yet
    assert await remote.get("cilium/.heartbeat") is None
    with pytest.raises(errors.PermissionDenied):
        await remote.get("registry/services/default/web")
    with pytest.raises(errors.PermissionDenied):
        await remote.get("cilium/cluster-config/c3")
    with pytest.raises(errors.PermissionDenied):
        await remote.list_prefix("cilium/")


async def test_the_agent_writes_only_its_own_kinds(auth_cluster: EtcdCluster) -> None:
    agent = await auth_cluster.connect("agent-c1")
    try:
        await agent.put("registry/ciliumnodes/n1", b"{}")
        await agent.put("registry/ciliumendpoints/default/pod", b"{}")
        assert await agent.get("registry/services/default/web") is not None
        with pytest.raises(errors.PermissionDenied):
            await agent.put("registry/services/default/web", b"{}")
        with pytest.raises(errors.PermissionDenied):
            await agent.put("cilium/state/nodes/v1/c1/n1", b"{}")
    finally:
        await agent.close()


async def test_an_unknown_user_is_refused_with_its_name(auth_cluster: EtcdCluster) -> None:
    backend = await auth_cluster.connect("mallory")  # a valid certificate from the right CA, but no such user
    try:
        with pytest.raises(errors.PermissionDenied, match="'mallory'"):
            await backend.get("cilium/state/nodes/v1/c1/n1")
    finally:
        await backend.close()


async def test_heartbeat_is_seen_and_judged_by_the_readers_clock(auth_cluster: EtcdCluster) -> None:
    now = [1000.0]
    admin = await auth_cluster.connect("admin-c1")
    remote = await auth_cluster.connect("remote-c2")
    reader = HeartbeatReader(clock=lambda: now[0])
    task = asyncio.create_task(reader.run(remote))

    async def next_beat() -> None:
        reader.changed.clear()
        await HeartbeatWriter(admin).beat()
        beat = asyncio.create_task(reader.changed.wait())
        await asyncio.wait([beat, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the reader failed: show why
        assert beat.done(), "the reader did not see the beat"

    try:
        await next_beat()
        assert reader.age() == 0 and not reader.stale()
        assert reader.last_value.endswith("Z")
        now[0] += 121
        assert reader.stale()
        await next_beat()
        assert not reader.stale()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await admin.close()
        await remote.close()
