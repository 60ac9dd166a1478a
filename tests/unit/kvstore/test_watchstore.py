from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from clustermesh.model.errors import InvalidValue
from kvstore import errors
from kvstore.backend import DeleteOp, PutOp
from kvstore.memory import MemoryBackend
from kvstore.metrics import KVStoreMetrics
from kvstore.testing import Recorder
from kvstore.watching import WatchStore

PREFIX = "cilium/state/nodes/v1/c1/"
CANARY = "cilium/synced/c1/cilium/state/nodes/v1"


def decode(key: str, data: bytes) -> dict[str, str]:
    try:
        value = json.loads(data)
    except ValueError:
        raise InvalidValue(key, "malformed JSON") from None
    if not isinstance(value, dict) or value.get("Name") != key.rsplit("/", 1)[-1]:
        raise InvalidValue(key, "name does not match key")
    return value


def node(name: str, version: int = 1) -> bytes:
    return json.dumps({"Name": name, "v": version}).encode()


def store_with(recorder: Recorder, **kwargs: object) -> WatchStore[dict[str, str]]:
    return WatchStore(prefix=PREFIX, decode=decode, observer=recorder, name="nodes", **kwargs)  # type: ignore[arg-type]


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_lists_then_follows_changes_in_order() -> None:
    backend = MemoryBackend()
    await backend.commit([PutOp(PREFIX + "a", node("a")), PutOp(PREFIX + "b", node("b"))])
    recorder = Recorder()
    store = store_with(recorder)
    task = asyncio.create_task(store.run(backend))
    try:
        await asyncio.wait_for(store.synced.wait(), 5)
        assert recorder.upserts() == [PREFIX + "a", PREFIX + "b"]
        await backend.commit([PutOp(PREFIX + "c", node("c"))])
        await backend.commit([DeleteOp(PREFIX + "a"), PutOp(PREFIX + "b", node("b", 2))])
        await recorder.wait_for(lambda r: len(r.events) == 5)
        assert [(a, k) for a, k, _ in recorder.events[2:]] == [
            ("upsert", PREFIX + "c"),
            ("delete", PREFIX + "a"),
            ("upsert", PREFIX + "b"),
        ]
        assert set(store.entries) == {PREFIX + "b", PREFIX + "c"}
    finally:
        await _stop(task)


async def test_one_malformed_value_among_many_is_rejected_alone() -> None:
    backend = MemoryBackend()
    ops = [PutOp(PREFIX + f"n{i:04d}", node(f"n{i:04d}")) for i in range(1000)]
    ops[500] = PutOp(PREFIX + "n0500", b"{not json")
    for start in range(0, 1000, 100):
        await backend.commit(ops[start : start + 100])
    registry = CollectorRegistry()
    recorder = Recorder()
    told: list[tuple[str, str]] = []  # what the store's owner hears (the agent wakes its status waiters on it)
    store = store_with(recorder, metrics=KVStoreMetrics(registry), on_rejected=lambda k, r: told.append((k, r)))
    task = asyncio.create_task(store.run(backend))
    try:
        await asyncio.wait_for(store.synced.wait(), 5)
        assert len(store.entries) == 999
        assert store.rejected == {PREFIX + "n0500": "malformed JSON"}
        assert (
            registry.get_sample_value(
                "clustermesh_kvstore_rejected_entries_total", {"store": "nodes", "reason": "malformed JSON"}
            )
            == 1
        )
        # A valid entry later overwritten by garbage keeps its last valid value; the next valid write flows on.
        await backend.commit([PutOp(PREFIX + "n0001", b"garbage"), PutOp(PREFIX + "n1000", node("n1000"))])
        await recorder.wait_for(lambda r: PREFIX + "n1000" in r.state)
        assert store.entries[PREFIX + "n0001"] == {"Name": "n0001", "v": 1}
        assert PREFIX + "n0001" in store.rejected
        # A wrong name is rejected with its own reason.
        await backend.commit([PutOp(PREFIX + "n2000", node("someone-else")), PutOp(PREFIX + "n2001", node("n2001"))])
        await recorder.wait_for(lambda r: PREFIX + "n2001" in r.state)
        assert store.rejected[PREFIX + "n2000"] == "name does not match key"
        assert told == [
            (PREFIX + "n0500", "malformed JSON"),
            (PREFIX + "n0001", "malformed JSON"),
            (PREFIX + "n2000", "name does not match key"),
        ]
        assert registry.get_sample_value("clustermesh_kvstore_entries", {"store": "nodes"}) == 1001
    finally:
        await _stop(task)


async def test_compaction_relists_and_emits_only_the_difference() -> None:
    backend = MemoryBackend()
    await backend.commit([PutOp(PREFIX + k, node(k)) for k in ("a", "b", "c")])
    recorder = Recorder()
    registry = CollectorRegistry()
    store = store_with(recorder, metrics=KVStoreMetrics(registry))
    task = asyncio.create_task(store.run(backend))
    try:
        await asyncio.wait_for(store.synced.wait(), 5)
        recorder.clear()
        # These commits happen before the watcher task runs again; then their history is compacted away.
        await backend.commit([DeleteOp(PREFIX + "a")])
        await backend.commit([PutOp(PREFIX + "b", node("b", 2))])
        last = await backend.commit([PutOp(PREFIX + "d", node("d"))])
        await backend.compact(last)
        await recorder.wait_for(lambda r: len(r.events) == 3)
        assert sorted((a, k) for a, k, _ in recorder.events) == [
            ("delete", PREFIX + "a"),
            ("upsert", PREFIX + "b"),
            ("upsert", PREFIX + "d"),
        ]
        assert store.relists == 1
        assert (
            registry.get_sample_value("clustermesh_kvstore_relists_total", {"store": "nodes", "cause": "compacted"})
            == 1
        )
    finally:
        await _stop(task)


async def test_reconnect_deletes_only_entries_that_did_not_come_back() -> None:
    backend = MemoryBackend()
    await backend.commit([PutOp(PREFIX + k, node(k)) for k in ("a", "b", "c")])
    recorder = Recorder()
    store = store_with(recorder)
    task = asyncio.create_task(store.run(backend))
    await asyncio.wait_for(store.synced.wait(), 5)
    await backend.break_connections()
    with pytest.raises(errors.BackendUnavailable):
        await asyncio.wait_for(task, 5)
    assert set(store.entries) == {PREFIX + "a", PREFIX + "b", PREFIX + "c"}, "nothing is dropped during an outage"
    # While disconnected: b vanished, c changed, d appeared.
    await backend.commit([DeleteOp(PREFIX + "b"), PutOp(PREFIX + "c", node("c", 2)), PutOp(PREFIX + "d", node("d"))])
    recorder.clear()
    task = asyncio.create_task(store.run(backend))
    try:
        await asyncio.wait_for(store.live.wait(), 5)
        assert recorder.deletes() == [PREFIX + "b"]
        assert sorted(recorder.upserts()) == [PREFIX + "c", PREFIX + "d"]
    finally:
        await _stop(task)


async def test_wiped_store_is_not_believed_before_the_writer_says_synced() -> None:
    backend = MemoryBackend()
    await backend.commit([PutOp(PREFIX + k, node(k)) for k in ("a", "b", "c")] + [PutOp(CANARY, b"t")])
    recorder = Recorder()
    store = store_with(recorder, synced_canary=CANARY)
    task = asyncio.create_task(store.run(backend))
    await asyncio.wait_for(store.synced.wait(), 5)
    await backend.wipe()
    with pytest.raises(errors.BackendUnavailable):
        await asyncio.wait_for(task, 5)
    recorder.clear()
    task = asyncio.create_task(store.run(backend))
    try:
        await backend.commit([PutOp(PREFIX + "a", node("a"))])  # the writer refills, part by part
        await backend.commit([PutOp(PREFIX + "c", node("c"))])
        assert recorder.events == [], "an empty or half-refilled store must not delete anything"
        await backend.commit([PutOp(CANARY, b"t2")])
        await asyncio.wait_for(store.live.wait(), 5)
        assert recorder.deletes() == [PREFIX + "b"]
        assert recorder.upserts() == []
    finally:
        await _stop(task)


async def test_drain_deletes_everything_for_the_observer() -> None:
    backend = MemoryBackend()
    await backend.commit([PutOp(PREFIX + k, node(k)) for k in ("a", "b")])
    recorder = Recorder()
    store = store_with(recorder)
    task = asyncio.create_task(store.run(backend))
    await asyncio.wait_for(store.synced.wait(), 5)
    await _stop(task)
    store.drain()
    assert sorted(recorder.deletes()) == [PREFIX + "a", PREFIX + "b"]
    assert store.entries == {} and not store.synced.is_set()
