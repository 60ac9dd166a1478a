"""WatchStore and SyncStore against a real etcd that is restarted, wiped and compacted under them.

Each test runs the reader as production does: `run_reconnecting(connect, store.run)`. Waits are on the stores'
events and the recorder's changes, never on sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from clustermesh.model import wire
from kvstore import etcd
from kvstore.backend import Backend, PutOp
from kvstore.leases import LeaseManager
from kvstore.reconnecting import Backoff, run_reconnecting
from kvstore.syncing import SyncStore
from kvstore.testing import Recorder
from kvstore.watching import WatchStore
from tests.integration.conftest import EtcdCluster

decode_node = wire.decoder_for(wire.Node)


def node_value(name: str, version: int = 1) -> bytes:
    return wire.encode(wire.Node(Name=name, Cluster="c1", ClusterID=1, BootID=f"boot-{version}"))


class Tasks:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        self.tasks.append(asyncio.create_task(coroutine, name=name))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def tasks() -> AsyncIterator[Tasks]:
    running = Tasks()
    yield running
    await running.stop()


class Failures(list[Exception]):
    """What the reconnect loop reported, with an event per report."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = asyncio.Event()

    def report(self, exc: Exception) -> None:
        self.append(exc)
        self.reported.set()


def reader(cluster: EtcdCluster, store: WatchStore[Any], tasks: Tasks, user: str = "root") -> Failures:
    failures = Failures()
    tasks.start(
        run_reconnecting(
            lambda: etcd.connect(cluster.config(user)),
            store.run,
            name=f"reader {store.name}",
            backoff=Backoff(initial=0.05, maximum=0.3),
            on_failure=failures.report,
        ),
        name=f"reader-{store.name}",
    )
    return failures


async def put_many(backend: Backend, items: dict[str, bytes]) -> None:
    keys = sorted(items)
    for start in range(0, len(keys), 100):
        await backend.commit([PutOp(key, items[key]) for key in keys[start : start + 100]])


async def test_one_malformed_value_among_1000_good_ones(etcd_cluster: EtcdCluster, prefix: str, tasks: Tasks) -> None:
    backend = await etcd_cluster.connect()
    try:
        items = {f"{prefix}n{i:04d}": node_value(f"n{i:04d}") for i in range(1000)}
        items[f"{prefix}n0500"] = b'{"Name": "n0500", "ClusterID": "one"}'
        await put_many(backend, items)
        recorder = Recorder()
        store = WatchStore(prefix=prefix, decode=decode_node, observer=recorder, name="nodes")
        reader(etcd_cluster, store, tasks)
        await asyncio.wait_for(store.synced.wait(), 10)
        assert len(recorder.state) == 999
        assert list(store.rejected) == [f"{prefix}n0500"]
        assert "Expected `int`" in store.rejected[f"{prefix}n0500"]
        await backend.commit([PutOp(f"{prefix}n1000", node_value("n1000"))])
        await recorder.wait_for(lambda r: f"{prefix}n1000" in r.state)
    finally:
        await backend.close()


async def test_restart_mid_watch_deletes_nothing_that_survived(
    etcd_cluster: EtcdCluster, prefix: str, tasks: Tasks
) -> None:
    backend = await etcd_cluster.connect()
    await put_many(backend, {f"{prefix}{k}": node_value(k) for k in "abcdef"})
    await backend.close()
    recorder = Recorder()
    store = WatchStore(prefix=prefix, decode=decode_node, observer=recorder, name="nodes")
    failures = reader(etcd_cluster, store, tasks)
    await asyncio.wait_for(store.synced.wait(), 10)
    recorder.clear()

    etcd_cluster.process.restart()
    await asyncio.wait_for(failures.reported.wait(), 10)  # the reader saw the connection break
    await asyncio.wait_for(store.live.wait(), 20)  # and came back
    assert store.relists == 1
    assert recorder.events == [], "keys that survived a restart must not be deleted (nor re-announced)"

    backend = await etcd_cluster.connect()
    try:
        await backend.delete(f"{prefix}c")
        await recorder.wait_for(lambda r: r.deletes() == [f"{prefix}c"])
    finally:
        await backend.close()


async def test_wipe_and_refill_deletes_exactly_the_vanished_keys(
    etcd_cluster: EtcdCluster, prefix: str, tasks: Tasks
) -> None:
    """etcd loses everything; the writer (a SyncStore) refills it by itself once it sees its lease is gone."""
    canary = f"cilium/synced/c1/{prefix}"
    writer_backend = await etcd_cluster.connect()
    leases = LeaseManager(writer_backend, ttl=5)  # keep-alive every ~2 s: the wipe is noticed quickly
    writer = SyncStore(writer_backend, prefix=prefix, synced_key=canary, leases=leases, name="writer")
    tasks.start(writer.run(), "writer")
    tasks.start(leases.run(), "leases")
    for name in "abcdefgh":
        writer.upsert(name, node_value(name))
    writer.mark_synced()
    await asyncio.wait_for(writer.synced.wait(), 10)

    recorder = Recorder()
    store = WatchStore(prefix=prefix, decode=decode_node, observer=recorder, name="nodes", synced_canary=canary)
    reader(etcd_cluster, store, tasks)
    await asyncio.wait_for(store.synced.wait(), 10)
    recorder.clear()
    lease_lost = asyncio.Event()
    leases.subscribe(lambda keys: lease_lost.set())

    etcd_cluster.process.stop()
    etcd_cluster.process.wipe()
    writer.delete("c")  # while etcd is gone, the owner drops two entries and changes one
    writer.delete("f")
    writer.upsert("g", node_value("g", 2))
    etcd_cluster.process.start()

    await asyncio.wait_for(lease_lost.wait(), 20)
    await asyncio.wait_for(writer.wait_idle(), 20)
    await recorder.wait_for(lambda r: len(r.deletes()) == 2 and r.upserts() == [f"{prefix}g"], timeout=20)
    assert sorted(recorder.deletes()) == [f"{prefix}c", f"{prefix}f"]
    assert sorted(store.entries) == [f"{prefix}{k}" for k in "abdegh"]
    await writer_backend.close()


async def test_compaction_past_the_watchers_revision_relists_and_loses_nothing(
    etcd_cluster: EtcdCluster, prefix: str, tasks: Tasks
) -> None:
    backend = await etcd_cluster.connect()
    await put_many(backend, {f"{prefix}{k}": node_value(k) for k in "abc"})
    perturbed = asyncio.Event()

    class ListThenPerturb(WatchStore[wire.Node]):
        """After its first list, and before its watch starts, the store falls behind: changes, then a compaction."""

        async def _list(self, backend_: Backend, cause: str) -> int:
            revision = await super()._list(backend_, cause)
            if not perturbed.is_set():
                perturbed.set()
                await backend.delete(f"{prefix}a")
                await backend.put(f"{prefix}b", node_value("b", 2))
                last = await backend.put(f"{prefix}d", node_value("d"))
                await backend.compact(last)
            return revision

    recorder = Recorder()
    store = ListThenPerturb(prefix=prefix, decode=decode_node, observer=recorder, name="nodes")
    reader(etcd_cluster, store, tasks)
    try:
        await recorder.wait_for(lambda r: len(r.events) == 6)
        assert store.relists == 1
        assert sorted((action, key) for action, key, _ in recorder.events[3:]) == [
            ("delete", f"{prefix}a"),
            ("upsert", f"{prefix}b"),
            ("upsert", f"{prefix}d"),
        ]
        assert sorted(store.entries) == [f"{prefix}b", f"{prefix}c", f"{prefix}d"]
    finally:
        await backend.close()
