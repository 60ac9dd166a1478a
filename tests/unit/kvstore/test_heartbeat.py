"""The heartbeat writer after its lease is lost: written again on a new lease within seconds, not at the next
keep-alive round (ttl/3: minutes), which would leave every reader calling the cluster stale."""

from __future__ import annotations

import asyncio

import pytest

from clustermesh.model.keys import HEARTBEAT_KEY
from kvstore.heartbeat import HeartbeatWriter
from kvstore.leases import LeaseManager
from kvstore.memory import MemoryBackend


@pytest.mark.looptime
async def test_a_lost_lease_is_replaced_at_the_next_beat() -> None:
    backend = MemoryBackend()
    leases = LeaseManager(backend, ttl=900)  # its own keep-alive round is not running: only the writer can notice
    writer = HeartbeatWriter(backend, leases=leases, interval=10.0)
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.sleep(1)
        first = await backend.get(HEARTBEAT_KEY)
        assert first is not None
        await backend.expire_lease(first.lease)  # etcd forgot it (a wipe, a restore, a long partition)
        assert await backend.get(HEARTBEAT_KEY) is None
        await asyncio.sleep(15)  # one failed beat (LeaseLost), then the retry 2 s later
        again = await backend.get(HEARTBEAT_KEY)
        assert again is not None and again.lease != first.lease and leases.owns(again.lease)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
