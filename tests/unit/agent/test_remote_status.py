"""What `clustermesh status` says of one remote cluster when something is wrong, in virtual time (looptime): it must
never say ready while the cluster is broken, and must say why."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.remotes import ClusterRegistry, RemoteCluster
from agent.view import MergedView
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model import converters, keys, wire
from clustermesh.model.admission import Ownership
from clustermesh.model.clusters import ClusterInfo
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
