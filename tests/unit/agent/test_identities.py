"""IdentityAllocator and IdentityCollector over the standalone store on a MemoryBackend.

The races run two allocators, each with its own StandaloneStore over one backend that yields to the event loop
inside every operation, so their steps interleave as two agents' would. The collector runs in virtual time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.identities import (
    CILIUM_ENDPOINT,
    CILIUM_IDENTITY,
    IdentityAllocator,
    IdentityCollector,
    IdentityRangeExhausted,
    is_marked,
)
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.identities import IdentityRange
from clustermesh.model.kinds import Object
from clustermesh.resources.standalone import StandaloneStore
from clustermesh.resources.store import ObjectList, Unavailable
from kvstore.backend import Entry, Listing
from kvstore.memory import MemoryBackend

C1 = ClusterInfo("c1", 1)
FIRST = (1 << 16) + 256  # cluster 1's first allocatable identity


def identity(number: int, labels: dict[str, str], namespace: str = "shop", cluster: str = "c1") -> Object:
    security = {f"k8s:{key}": value for key, value in labels.items()}
    security["k8s:io.kubernetes.pod.namespace"] = namespace
    security["k8s:io.cilium.k8s.policy.cluster"] = cluster
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumIdentity",
        "metadata": {"name": str(number), "labels": {"io.kubernetes.pod.namespace": namespace}},
        "security-labels": security,
    }


def endpoint(name: str, number: int, namespace: str = "shop") -> Object:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEndpoint",
        "metadata": {"name": name, "namespace": namespace},
        "status": {"identity": {"id": number}},
    }


async def stored_ids(store: StandaloneStore) -> list[int]:
    return sorted(int(obj["metadata"]["name"]) for obj in (await store.list(CILIUM_IDENTITY)).items)


def allocations(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("clustermesh_identity_allocations_total", {"outcome": outcome}) or 0.0


class InterleavingBackend(MemoryBackend):
    """A MemoryBackend whose reads and writes yield to the loop a few times first, as a network round trip does."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.random = random.Random(seed)

    async def _pause(self) -> None:
        for _ in range(self.random.randrange(4)):
            await asyncio.sleep(0)

    async def get(self, key: str) -> Entry | None:
        await self._pause()
        return await super().get(key)

    async def list_prefix(self, prefix: str) -> Listing:
        await self._pause()
        return await super().list_prefix(prefix)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        await self._pause()
        return await super().create(key, value, lease=lease)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        await self._pause()
        return await super().delete_if(key, mod_revision=mod_revision)


class StaleListStore(StandaloneStore):
    """A store whose first list of identities is an old one: another agent wrote in between our list and create."""

    def __init__(self, backend: MemoryBackend, stale: ObjectList) -> None:
        super().__init__(backend)
        self.stale: ObjectList | None = stale

    async def list(self, kind: Any) -> ObjectList:
        if kind == CILIUM_IDENTITY and self.stale is not None:
            stale, self.stale = self.stale, None
            return stale
        return await super().list(kind)


class FlakyStore(StandaloneStore):
    """A store that is unavailable for its next `failures` lists."""

    def __init__(self, backend: MemoryBackend, failures: int) -> None:
        super().__init__(backend)
        self.failures = failures
        self.lists = 0

    async def list(self, kind: Any) -> ObjectList:
        self.lists += 1
        if self.failures:
            self.failures -= 1
            raise Unavailable("etcd is restarting")
        return await super().list(kind)


@pytest.fixture
def store() -> StandaloneStore:
    return StandaloneStore(MemoryBackend())


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[None]]]:
    running: list[asyncio.Task[None]] = []
    yield running
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


def start(tasks: list[asyncio.Task[None]], coroutine: Coroutine[Any, Any, None]) -> None:
    tasks.append(asyncio.create_task(coroutine))


# --- allocating


async def test_an_identity_carries_the_labels_the_namespace_and_the_cluster(store: StandaloneStore) -> None:
    number = await IdentityAllocator(store, C1).allocate({"app": "web"}, "shop")
    obj = await store.get(CILIUM_IDENTITY, str(number))
    assert obj is not None
    assert obj["metadata"]["name"] == str(FIRST)
    assert obj["metadata"]["labels"] == {"io.kubernetes.pod.namespace": "shop"}
    assert obj["security-labels"] == {
        "k8s:app": "web",
        "k8s:io.kubernetes.pod.namespace": "shop",
        "k8s:io.cilium.k8s.policy.cluster": "c1",
    }


async def test_an_existing_identity_with_the_same_labels_is_reused(store: StandaloneStore) -> None:
    await store.create(identity(FIRST + 40, {"app": "web"}))
    registry = CollectorRegistry()
    allocator = IdentityAllocator(store, C1, registry=registry)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST + 40
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST + 40
    assert await stored_ids(store) == [FIRST + 40]
    assert allocations(registry, "existing") == 2
    assert allocations(registry, "created") == 0
    # Same k8s labels, other namespace or other cluster's labels: another identity.
    assert await allocator.allocate({"app": "web"}, "billing") == FIRST
    assert await allocator.allocate({"app": "web", "tier": "front"}, "shop") == FIRST + 1
    assert allocations(registry, "created") == 2


async def test_the_lowest_free_number_is_taken(store: StandaloneStore) -> None:
    await store.create(identity(FIRST, {"app": "db"}))
    await store.create(identity(FIRST + 2, {"app": "cache"}))
    allocator = IdentityAllocator(store, C1)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST + 1
    assert await allocator.allocate({"app": "api"}, "shop") == FIRST + 3
    await store.delete(CILIUM_IDENTITY, str(FIRST))
    assert await allocator.allocate({"app": "worker"}, "shop") == FIRST


async def test_each_cluster_allocates_in_its_own_range(store: StandaloneStore) -> None:
    c3 = IdentityAllocator(store, ClusterInfo("c3", 3))
    assert await c3.allocate({"app": "web"}, "shop") == 196608 + 256
    c3_wide = IdentityAllocator(store, ClusterInfo("c3", 3, max_connected_clusters=511))
    assert await c3_wide.allocate({"app": "api"}, "shop") == (3 << 15) + 256
    # Another cluster's identity in the same store (it should not be there) is never reused.
    await store.create(identity(FIRST, {"app": "db"}, cluster="c3"))
    assert await c3.allocate({"app": "db"}, "shop") == 196608 + 257


async def test_a_full_range_is_a_clear_error(store: StandaloneStore) -> None:
    tiny = IdentityRange(cluster_id=1, first=1 << 16, last=(1 << 16) + 257)  # two allocatable numbers
    allocator = IdentityAllocator(store, C1, id_range=tiny)
    assert await allocator.allocate({"app": "a"}, "shop") == FIRST
    assert await allocator.allocate({"app": "b"}, "shop") == FIRST + 1
    with pytest.raises(IdentityRangeExhausted, match=r"cluster c1: no free identity left in 65792\.\.65793"):
        await allocator.allocate({"app": "c"}, "shop")
    assert await allocator.allocate({"app": "a"}, "shop") == FIRST, "existing identities are still found"


async def test_a_number_taken_meanwhile_by_other_labels_moves_on_to_the_next() -> None:
    backend = MemoryBackend()
    other = StandaloneStore(backend)
    stale = await other.list(CILIUM_IDENTITY)
    await other.create(identity(FIRST, {"app": "db"}))
    registry = CollectorRegistry()
    allocator = IdentityAllocator(StaleListStore(backend, stale), C1, registry=registry)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST + 1
    assert allocations(registry, "created") == 1


async def test_a_number_taken_meanwhile_by_the_same_labels_is_used() -> None:
    backend = MemoryBackend()
    other = StandaloneStore(backend)
    stale = await other.list(CILIUM_IDENTITY)
    await other.create(identity(FIRST, {"app": "web"}))
    registry = CollectorRegistry()
    allocator = IdentityAllocator(StaleListStore(backend, stale), C1, registry=registry)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST
    assert await stored_ids(other) == [FIRST]
    assert allocations(registry, "converged") == 1


async def test_a_duplicate_loses_to_the_older_identity_and_is_deleted() -> None:
    """Another agent created the labels' identity at a higher number first: it wins, ours goes."""
    backend = MemoryBackend()
    other = StandaloneStore(backend)
    stale = await other.list(CILIUM_IDENTITY)
    await other.create(identity(FIRST + 5, {"app": "web"}))
    registry = CollectorRegistry()
    allocator = IdentityAllocator(StaleListStore(backend, stale), C1, registry=registry)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST + 5
    assert await stored_ids(other) == [FIRST + 5]
    assert allocations(registry, "converged") == 1
    assert allocations(registry, "created") == 0


@pytest.mark.parametrize("seed", range(5))
async def test_two_agents_racing_for_the_same_labels_agree_on_one_identity_each(seed: int) -> None:
    backend = InterleavingBackend(seed)
    registries = CollectorRegistry(), CollectorRegistry()
    one, two = (IdentityAllocator(StandaloneStore(backend), C1, registry=registry) for registry in registries)
    label_sets = [{"app": f"app-{i}"} for i in range(20)]
    random.Random(seed).shuffle(order := list(label_sets))
    results = await asyncio.gather(
        *(one.allocate(labels, "shop") for labels in label_sets),
        *(two.allocate(labels, "shop") for labels in order),
    )
    by_one = dict(zip((labels["app"] for labels in label_sets), results[:20], strict=True))
    by_two = dict(zip((labels["app"] for labels in order), results[20:], strict=True))
    assert by_one == by_two
    assert len(set(by_one.values())) == 20
    store = StandaloneStore(backend)
    assert sorted(await stored_ids(store)) == sorted(by_one.values()), "exactly one identity per label set"
    for number in by_one.values():
        assert number in range(FIRST, FIRST + 40)
    outcomes = {o: sum(allocations(r, o) for r in registries) for o in ("existing", "created", "converged")}
    assert sum(outcomes.values()) == 40
    assert outcomes["created"] == 20, "exactly one agent created each identity that stayed"


async def test_unavailable_is_retried_with_backoff_then_given_up() -> None:
    backend = MemoryBackend()
    flaky = FlakyStore(backend, failures=2)
    allocator = IdentityAllocator(flaky, C1, backoff=0.001)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST
    down = FlakyStore(backend, failures=100)
    with pytest.raises(Unavailable):
        await IdentityAllocator(down, C1, attempts=3, backoff=0.001).allocate({"app": "api"}, "shop")
    assert down.lists == 3


async def test_the_informer_index_answers_without_a_round_trip(tasks: list[asyncio.Task[None]]) -> None:
    backend = MemoryBackend()
    await StandaloneStore(backend).create(identity(FIRST + 7, {"app": "web"}))
    flaky = FlakyStore(backend, failures=0)
    allocator = IdentityAllocator(flaky, C1)
    start(tasks, allocator.run())
    await asyncio.wait_for(allocator.synced.wait(), 5)
    lists = flaky.lists
    assert allocator.lookup({"app": "web"}, "shop") == FIRST + 7
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST + 7
    assert flaky.lists == lists, "answered from the index"
    allocator.on_delete(CILIUM_IDENTITY, {"metadata": {"name": str(FIRST + 7)}})
    assert allocator.lookup({"app": "web"}, "shop") is None


# --- collecting


def test_collection_step_by_step() -> None:
    collector = IdentityCollector(StandaloneStore(MemoryBackend()), C1, grace_period=100)
    for number in (FIRST, FIRST + 1, FIRST + 2):
        collector.on_upsert(CILIUM_IDENTITY, identity(number, {"app": str(number)}))
    collector.on_upsert(CILIUM_IDENTITY, identity(3 << 16, {"app": "remote"}, cluster="c3"))  # not ours
    collector.on_upsert(CILIUM_ENDPOINT, endpoint("web-1", FIRST))
    collector.on_upsert(CILIUM_ENDPOINT, endpoint("web-2", FIRST))
    assert collector.expired(0) == []
    assert collector.unused_since == {FIRST + 1: 0, FIRST + 2: 0}
    collector.on_upsert(CILIUM_ENDPOINT, endpoint("api-1", FIRST + 2))  # used again within the grace period
    collector.on_delete(CILIUM_ENDPOINT, endpoint("web-1", FIRST))  # web-2 still uses FIRST
    assert collector.expired(99) == []
    assert collector.expired(100) == [FIRST + 1]
    collector.on_upsert(CILIUM_ENDPOINT, endpoint("api-1", FIRST + 1))  # api-1 moved to another identity
    collector.on_delete(CILIUM_ENDPOINT, endpoint("web-2", FIRST))
    assert collector.expired(150) == []
    assert collector.unused_since == {FIRST: 150, FIRST + 2: 150}
    assert collector.expired(250) == [FIRST, FIRST + 2]
    collector.on_delete(CILIUM_IDENTITY, identity(FIRST, {}))
    assert collector.expired(260) == [FIRST + 2]
    assert FIRST not in collector.unused_since


async def test_collect_once_deletes_and_counts_and_an_identity_already_gone_is_fine(store: StandaloneStore) -> None:
    registry = CollectorRegistry()
    collector = IdentityCollector(store, C1, grace_period=10, registry=registry)
    for number in (FIRST, FIRST + 1):
        obj = await store.create(identity(number, {"app": str(number)}))
        collector.on_upsert(CILIUM_IDENTITY, obj)
    collector.on_upsert(CILIUM_IDENTITY, identity(FIRST + 2, {"app": "x"}))  # another agent deleted it already
    assert collector.confirm_period == 10
    assert await collector.collect_once(0) == []
    assert await collector.collect_once(10) == [], "unused for the grace period: marked, not deleted yet"
    marked = (await store.list(CILIUM_IDENTITY)).items
    assert [is_marked(obj) for obj in marked] == [True, True]
    assert FIRST + 2 not in collector.identities, "gone already: forgotten"
    assert await collector.collect_once(19) == []
    assert await collector.collect_once(20) == [FIRST, FIRST + 1]
    assert await stored_ids(store) == []
    assert collector.deleted == 2
    assert registry.get_sample_value("clustermesh_identity_gc_deleted_total") == 2
    assert await collector.collect_once(21) == [], "not deleted twice while the informer catches up"


async def test_collection_racing_a_reuse_never_deletes_an_identity_handed_out(store: StandaloneStore) -> None:
    """Agent A's collector finds X unused and marks it; agent B hands X to a new pod before A's view of the store
    shows the pod. A's delete, of the version it marked, fails: X stays, as B's pod needs it."""
    created = await store.create(identity(FIRST, {"app": "web"}))
    collector = IdentityCollector(store, C1, grace_period=10, confirm_period=5)  # agent A, fed by hand: its view
    collector.on_upsert(CILIUM_IDENTITY, created)  # lags behind the store exactly as the test says
    assert await collector.collect_once(0) == [] and await collector.collect_once(10) == []
    marked = await store.get(CILIUM_IDENTITY, str(FIRST))
    assert marked is not None and is_marked(marked)

    allocator = IdentityAllocator(store, C1)  # agent B, whose informer has seen the mark
    allocator.on_upsert(CILIUM_IDENTITY, marked)
    assert await allocator.allocate({"app": "web"}, "shop") == FIRST
    reused = await store.get(CILIUM_IDENTITY, str(FIRST))
    assert reused is not None and not is_marked(reused), "the allocator took the mark away before answering"

    assert await collector.collect_once(20) == [], "A still thinks X is marked and unused: its delete is refused"
    assert collector.kept == 1
    assert await stored_ids(store) == [FIRST]
    collector.on_upsert(CILIUM_IDENTITY, reused)  # A's informer catches up: nothing left to do
    collector.on_upsert(CILIUM_ENDPOINT, endpoint("web-1", FIRST))
    assert await collector.collect_once(100) == [] and await stored_ids(store) == [FIRST]


async def test_an_allocator_asked_for_a_collected_identity_makes_a_new_one(store: StandaloneStore) -> None:
    """The other order: the collector deleted X before the allocator could unmark it. The allocator's index still
    holds X (marked): it must not hand out a deleted number."""
    created = await store.create(identity(FIRST, {"app": "web"}))
    collector = IdentityCollector(store, C1, grace_period=10, confirm_period=5)
    collector.on_upsert(CILIUM_IDENTITY, created)
    await collector.collect_once(0)
    await collector.collect_once(10)
    marked = await store.get(CILIUM_IDENTITY, str(FIRST))
    assert marked is not None
    allocator = IdentityAllocator(store, C1)
    allocator.on_upsert(CILIUM_IDENTITY, marked)  # its view: X exists, marked
    assert await collector.collect_once(20) == [FIRST]
    number = await allocator.allocate({"app": "web"}, "shop")
    assert await stored_ids(store) == [number], "the number handed out exists"


async def test_a_marked_identity_used_again_is_unmarked_by_the_collector(store: StandaloneStore) -> None:
    created = await store.create(identity(FIRST, {"app": "web"}))
    collector = IdentityCollector(store, C1, grace_period=10, confirm_period=5)
    collector.on_upsert(CILIUM_IDENTITY, created)
    await collector.collect_once(0)
    await collector.collect_once(10)
    collector.on_upsert(CILIUM_ENDPOINT, endpoint("web-1", FIRST))  # an endpoint restored from a backup
    assert await collector.collect_once(20) == []
    current = await store.get(CILIUM_IDENTITY, str(FIRST))
    assert current is not None and not is_marked(current)


@pytest.mark.looptime
async def test_the_collector_deletes_only_identities_unused_for_the_grace_period(
    store: StandaloneStore, tasks: list[asyncio.Task[None]]
) -> None:
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry()
    collector = IdentityCollector(store, C1, grace_period=900, interval=60, clock=loop.time, registry=registry)
    used, unused, reused = FIRST, FIRST + 1, FIRST + 2
    remote = (3 << 16) + 256
    for number in (used, unused, reused):
        await store.create(identity(number, {"app": str(number)}))
    await store.create(identity(remote, {"app": "remote"}, cluster="c3"))
    await store.create(endpoint("web", used))
    start(tasks, collector.run())
    await asyncio.wait_for(collector.synced.wait(), 5)

    await asyncio.sleep(600)
    assert await stored_ids(store) == [used, unused, reused, remote]
    await store.create(endpoint("api", reused))  # referenced again within the grace period

    await asyncio.sleep(400)  # 1000 s: the unused one is gone, the others stay
    assert await stored_ids(store) == [used, reused, remote]
    await store.delete(CILIUM_ENDPOINT, "api", "shop")  # unused from now on: 15 minutes more

    await asyncio.sleep(800)
    assert await stored_ids(store) == [used, reused, remote]
    await asyncio.sleep(200)
    assert await stored_ids(store) == [used, remote], "another cluster's identity is never collected"
    assert collector.deleted == 2
    assert registry.get_sample_value("clustermesh_identity_gc_deleted_total") == 2
