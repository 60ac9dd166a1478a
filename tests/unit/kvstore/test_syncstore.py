from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from kvstore import errors
from kvstore.backend import PutOp
from kvstore.leases import LeaseManager
from kvstore.memory import MemoryBackend
from kvstore.metrics import KVStoreMetrics
from kvstore.syncing import SyncStore

PREFIX = "cilium/state/nodes/v1/c1/"
CANARY = "cilium/synced/c1/cilium/state/nodes/v1"


@pytest.fixture
async def backend() -> MemoryBackend:
    return MemoryBackend()


async def _running(store: SyncStore, leases: LeaseManager | None = None) -> asyncio.Task[None]:
    return asyncio.create_task(store.run(), name=f"sync-{store.name}")


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_publishes_then_writes_the_canary(backend: MemoryBackend) -> None:
    leases = LeaseManager(backend)
    store = SyncStore(backend, prefix=PREFIX, synced_key=CANARY, leases=leases)
    task = await _running(store)
    try:
        store.upsert("n1", b"one")
        store.upsert("n2", b"two")
        await store.wait_idle()
        assert await backend.get(CANARY) is None, "the canary must wait for mark_synced()"
        store.mark_synced()
        await asyncio.wait_for(store.synced.wait(), 5)
        assert backend.keys() == sorted([CANARY, PREFIX + "n1", PREFIX + "n2"])
        entry = await backend.get(PREFIX + "n1")
        assert entry is not None and leases.owns(entry.lease)
    finally:
        await _stop(task)


async def test_writes_only_what_changed(backend: MemoryBackend) -> None:
    store = SyncStore(backend, prefix=PREFIX)
    task = await _running(store)
    try:
        for i in range(300):
            store.upsert(f"n{i}", b"v")
        await store.wait_idle()
        commits = backend.commits
        assert commits == 3  # 300 keys in batches of 128
        store.upsert("n5", b"v")  # same value: nothing to do
        store.upsert("n6", b"changed")
        store.delete("n7")
        store.delete("never-there")
        await store.wait_idle()
        assert backend.commits == commits + 1
        assert (await backend.get(PREFIX + "n6")).value == b"changed"  # type: ignore[union-attr]
        assert await backend.get(PREFIX + "n7") is None
    finally:
        await _stop(task)


async def test_restart_deletes_only_its_own_stale_keys(backend: MemoryBackend) -> None:
    # What a previous run left behind, and keys that belong to others (a longer cluster name, another prefix).
    await backend.commit(
        [
            PutOp(PREFIX + "kept", b"old"),
            PutOp(PREFIX + "gone-while-down", b"x"),
            PutOp("cilium/state/nodes/v1/c10/other", b"y"),
            PutOp("cilium/state/nodes/v1/c1", b"not-under-the-prefix"),
            PutOp("cilium/state/ip/v1/default/10.0.0.1", b"z"),
        ]
    )
    leases = LeaseManager(backend)
    store = SyncStore(backend, prefix=PREFIX, synced_key=CANARY, leases=leases)
    task = await _running(store)
    try:
        store.upsert("kept", b"old")
        store.upsert("new", b"n")
        store.mark_synced()
        await asyncio.wait_for(store.synced.wait(), 5)
        assert backend.keys() == sorted(
            [
                CANARY,
                "cilium/state/ip/v1/default/10.0.0.1",
                "cilium/state/nodes/v1/c1",
                "cilium/state/nodes/v1/c10/other",
                PREFIX + "kept",
                PREFIX + "new",
            ]
        )
        kept = await backend.get(PREFIX + "kept")
        assert kept is not None and leases.owns(kept.lease), "a key found at start is moved onto our own lease"
    finally:
        await _stop(task)


async def test_lost_lease_rewrites_its_keys_and_the_canary(backend: MemoryBackend) -> None:
    leases = LeaseManager(backend, max_keys=2)
    store = SyncStore(backend, prefix=PREFIX, synced_key=CANARY, leases=leases)
    task = await _running(store)
    try:
        for name in ("a", "b", "c"):
            store.upsert(name, name.encode())
        store.mark_synced()
        await asyncio.wait_for(store.synced.wait(), 5)
        assert sorted(leases.leases.values()) == [2, 2]  # 3 keys + canary, at most 2 per lease
        lost = next(iter(leases.leases))
        await backend.expire_lease(lost)
        assert len(backend.keys()) == 2
        await leases.keep_alive_once()  # etcd answers "lease not found": the manager declares it lost
        await store.wait_idle()
        assert backend.keys() == sorted([CANARY, PREFIX + "a", PREFIX + "b", PREFIX + "c"])
        assert lost not in leases.leases
    finally:
        await _stop(task)


@pytest.mark.looptime
async def test_outage_is_retried_with_backoff_and_nothing_is_lost(backend: MemoryBackend) -> None:
    registry = CollectorRegistry()
    store = SyncStore(backend, prefix=PREFIX, name="nodes", metrics=KVStoreMetrics(registry))
    task = await _running(store)
    try:
        store.upsert("a", b"1")
        await store.wait_idle()
        backend.available = False
        store.upsert("b", b"2")
        store.delete("a")
        await asyncio.sleep(3)  # virtual time: several failed attempts
        assert (
            registry.get_sample_value("clustermesh_kvstore_errors_total", {"store": "nodes", "reason": "unavailable"})
            >= 3
        )  # type: ignore[operator]
        assert registry.get_sample_value("clustermesh_kvstore_sync_queue_size", {"store": "nodes"}) == 2
        backend.available = True
        await asyncio.wait_for(store.wait_idle(), 30)
        assert backend.keys() == [PREFIX + "b"]
    finally:
        await _stop(task)


@pytest.mark.looptime
async def test_keys_whose_new_lease_cannot_be_granted_yet_are_written_once_etcd_is_back(
    backend: MemoryBackend,
) -> None:
    leases = LeaseManager(backend)
    store = SyncStore(backend, prefix=PREFIX, synced_key=CANARY, leases=leases)
    task = await _running(store)
    try:
        store.upsert("a", b"1")
        store.upsert("b", b"2")
        store.mark_synced()
        await asyncio.wait_for(store.synced.wait(), 5)
        lost = next(iter(leases.leases))
        await backend.expire_lease(lost)
        backend.available = False
        leases.lease_lost(lost)  # a new lease is needed while etcd does not answer
        await asyncio.sleep(3)  # virtual time: several failed grants
        store.delete("b")
        backend.available = True
        await asyncio.wait_for(store.wait_idle(), 30)
        assert backend.keys() == sorted([CANARY, PREFIX + "a"])
    finally:
        await _stop(task)


def test_prefix_must_end_with_a_slash() -> None:
    with pytest.raises(ValueError, match="must end with '/'"):
        SyncStore(MemoryBackend(), prefix="cilium/state/nodes/v1/c1")


async def test_lease_manager_spreads_keys_over_leases(backend: MemoryBackend) -> None:
    leases = LeaseManager(backend, max_keys=1000)
    ids = [await leases.acquire(f"k{i}") for i in range(2500)]
    assert sorted(leases.leases.values()) == [500, 1000, 1000]
    assert ids[0] == await leases.acquire("k0"), "a key keeps its lease"
    leases.release("k0")
    assert sum(leases.leases.values()) == 2499
    await leases.revoke_all()
    assert leases.leases == {}
    with pytest.raises(errors.LeaseLost):
        await backend.keep_alive(ids[0])


async def test_sync_store_in_use_stays_consistent_under_concurrent_wishes(backend: MemoryBackend) -> None:
    store = SyncStore(backend, prefix=PREFIX, batch_size=16, in_flight=4)
    task = await _running(store)
    try:

        async def writer(offset: int) -> None:
            for i in range(200):
                store.upsert(f"k{(i + offset) % 150}", f"{offset}-{i}".encode())
                if i % 7 == 0:
                    store.delete(f"k{(i * 3) % 150}")
                await asyncio.sleep(0)

        await asyncio.gather(*(writer(o) for o in range(4)))
        await store.wait_idle()
        listing = await backend.list_prefix(PREFIX)
        assert {e.key: e.value for e in listing.entries} == store.held()
    finally:
        await _stop(task)


class GatedBackend(MemoryBackend):
    """The first commit waits at a gate: a transaction that takes long to be answered."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.first_started = asyncio.Event()
        self._held_one = False

    async def commit(self, ops):  # type: ignore[no-untyped-def]
        if not self._held_one:
            self._held_one = True
            self.first_started.set()
            await self.gate.wait()
        return await super().commit(ops)


async def test_a_key_is_never_in_two_transactions_at_once() -> None:
    backend = GatedBackend()
    store = SyncStore(backend, prefix=PREFIX, batch_size=1, in_flight=4)
    task = asyncio.create_task(store.run())
    try:
        store.upsert("k", b"old")
        await backend.first_started.wait()  # "old" is in a transaction that has not been answered
        store.upsert("k", b"new")
        changes = backend.watch(PREFIX + "other", start_revision=1)
        store.upsert("other", b"x")
        await asyncio.wait_for(anext(changes), 5)  # the pipeline goes on with other keys meanwhile
        await changes.aclose()  # type: ignore[attr-defined]
        assert (await backend.get(PREFIX + "k")) is None
        backend.gate.set()
        await store.wait_idle()
        assert (await backend.get(PREFIX + "k")).value == b"new"  # type: ignore[union-attr]
    finally:
        await _stop(task)


async def test_before_the_initial_sync_a_delete_never_removes_what_a_previous_run_left(
    backend: MemoryBackend,
) -> None:
    """The owner's sources list in any order: a 'delete' before a later 'upsert' must not flap the key."""
    await backend.commit([PutOp(PREFIX + "svc", b"v"), PutOp(PREFIX + "stale", b"s")])
    store = SyncStore(backend, prefix=PREFIX, synced_key=CANARY)
    task = await _running(store)
    try:
        changes = backend.watch(PREFIX, start_revision=(await backend.list_prefix(PREFIX)).revision + 1)
        await store.listed.wait()
        store.delete("svc")  # e.g. an EndpointSlice listed before its Service
        await store.wait_idle()
        store.upsert("svc", b"v")
        store.upsert("new", b"n")
        store.delete("new")  # upserted by this run, then deleted: a real delete
        store.mark_synced()
        await asyncio.wait_for(store.synced.wait(), 5)
        events = []
        while True:
            batch = await asyncio.wait_for(anext(changes), 5)
            events.extend((type(e).__name__, e.key) for e in batch)
            if any(e[1] == PREFIX + "stale" for e in events):
                break
        await changes.aclose()  # type: ignore[attr-defined]
        assert ("Delete", PREFIX + "svc") not in events
        assert ("Delete", PREFIX + "stale") in events
        assert sorted(backend.keys()) == sorted([CANARY, PREFIX + "svc"])
    finally:
        await _stop(task)
