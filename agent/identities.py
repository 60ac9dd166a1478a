"""Security identities of one cluster: allocating them for label sets, and collecting the ones nobody uses.

An endpoint's identity is a number for its set of security labels (its Kubernetes labels, its namespace and its
cluster), kept as a CiliumIdentity object in the cluster's ResourceStore: `metadata.name` is the number, the
`security-labels` map is the label set. Every agent of the cluster allocates from the same range (the cluster's,
`clustermesh.model.identities`), with nothing but the store's `create` to coordinate them, as Cilium does in CRD mode:

- an identity that already carries the labels is reused;
- otherwise the agent creates the lowest free number; `AlreadyExists` means another agent took it first: if that
  one has the same labels it is ours too, else the next free number is tried;
- two agents may still create two numbers for one label set at the same time. After creating, the agent lists
  again, and of all the identities with these labels the OLDEST (lowest creation revision, then lowest number)
  wins; a loser deletes its own. The oldest is the only rule that every agent can agree on without talking: an
  identity created earlier is always visible to a later list, and none is ever created earlier afterwards. "Lowest
  number wins" is not safe: a loser's deletion frees a low number, and a third creation can take it after an agent
  already returned a higher one.

Identities are never released by the agent that allocated them; the `IdentityCollector` deletes those that no
CiliumEndpoint of the cluster has referenced for a grace period, as Cilium's operator does. Every agent runs a
collector, and collection races with reuse (one agent's collector finds X unused while another agent hands X to a
new endpoint), so deletion is two steps, as Cilium's CRD identity GC does with its heartbeat annotation:

1. an identity unused for the grace period is *marked*: the annotation `clustermesh.cilium.io/unused-since`;
2. one `confirm_period` later, still marked and still unused, it is deleted with a precondition on the version the
   collector marked (`resource_version`): any change since, an allocator's unmarking among them, makes the delete
   fail with `Conflict`, and the identity stays.

An allocator that reuses a marked identity removes the mark before it returns the number (and allocates anew if the
identity is gone). So whatever the interleaving, an identity handed out is either unmarked (not deletable until
marked again, which needs a grace period without references) or already deleted (and not handed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter

from agent.endpoints import IdentityError
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.identities import IdentityRange, identity_range
from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.model.labels import (
    CLUSTER_LABEL,
    NAMESPACE_LABEL,
    SOURCE_K8S,
    format_label_string,
    labels_from_security_map,
)
from clustermesh.resources.informing import Informer, Ref, object_ref
from clustermesh.resources.store import AlreadyExists, Conflict, NotFound, ResourceStore, Unavailable

__all__ = [
    "CILIUM_ENDPOINT",
    "UNUSED_ANNOTATION",
    "is_marked",
    "CILIUM_IDENTITY",
    "DEFAULT_GC_GRACE_PERIOD",
    "DEFAULT_GC_INTERVAL",
    "IdentityAllocator",
    "IdentityCollector",
    "IdentityIndex",
    "IdentityRangeExhausted",
    "Outcome",
    "label_string",
    "security_labels",
]

log = logging.getLogger(__name__)

CILIUM_IDENTITY = kind_by_name("CiliumIdentity")
CILIUM_ENDPOINT = kind_by_name("CiliumEndpoint")
DEFAULT_GC_GRACE_PERIOD = 15 * 60.0
DEFAULT_GC_INTERVAL = 60.0
#: Set by a collector on an identity it will delete if it stays unused (the value: when, RFC 3339).
UNUSED_ANNOTATION = "clustermesh.cilium.io/unused-since"
#: The identity's creation revision, kept when a mark updates the object (the oldest identity wins races).
CREATED_AT_ANNOTATION = "clustermesh.cilium.io/created-revision"

Outcome = Literal["existing", "created", "converged"]
_OUTCOMES: tuple[Outcome, ...] = ("existing", "created", "converged")


class IdentityRangeExhausted(IdentityError):
    """Every number of the cluster's identity range is taken."""


#: Cilium's prefix for the labels of an endpoint's namespace among its security labels.
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."


def security_labels(
    labels: Mapping[str, str], namespace: str, cluster: str, namespace_labels: Mapping[str, str] | None = None
) -> dict[str, str]:
    """An endpoint's security labels, as `k8s:<key>` -> value: its k8s labels, its namespace, the labels of its
    namespace (as Cilium has them: a NetworkPolicy's namespaceSelector matches them), and its cluster."""
    result = {f"{SOURCE_K8S}:{key}": value for key, value in labels.items()}
    for key, value in (namespace_labels or {}).items():
        result[f"{SOURCE_K8S}:{NAMESPACE_LABELS_PREFIX}{key}"] = value
    result[f"{SOURCE_K8S}:{NAMESPACE_LABEL}"] = namespace
    result[f"{SOURCE_K8S}:{CLUSTER_LABEL}"] = cluster
    return result


def label_string(security: Mapping[str, str]) -> str:
    """The canonical form of a security-labels map (`k8s:app=web;...;`): equal label sets, equal strings."""
    return format_label_string(labels_from_security_map(security))


def _identity_number(obj: Object, id_range: IdentityRange) -> int | None:
    """The number of a CiliumIdentity, if it is one of `id_range`."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    if not name.isdigit():
        return None
    number = int(name)
    return number if number in id_range else None


def _creation(obj: Object) -> int:
    """When the identity was created, as a revision: the creation annotation's (marks update the object, so its
    resourceVersion moves), else its resourceVersion."""
    metadata = obj.get("metadata") or {}
    version = str((metadata.get("annotations") or {}).get(CREATED_AT_ANNOTATION) or metadata.get("resourceVersion", ""))
    return int(version) if version.isdigit() else sys.maxsize


def is_marked(obj: Object) -> bool:
    """Whether a collector marked the identity for deletion."""
    return UNUSED_ANNOTATION in ((obj.get("metadata") or {}).get("annotations") or {})


def with_mark(obj: Object, mark: str | None) -> Object:
    """A copy of the identity with the collector's mark set to `mark`, or removed (None)."""
    marked = copy.deepcopy(obj)
    metadata = marked.setdefault("metadata", {})
    annotations = dict(metadata.get("annotations") or {})
    if mark is None:
        annotations.pop(UNUSED_ANNOTATION, None)
    else:
        annotations[UNUSED_ANNOTATION] = mark
    annotations.setdefault(CREATED_AT_ANNOTATION, str(metadata.get("resourceVersion", "")))
    metadata["annotations"] = annotations
    return marked


class IdentityIndex:
    """The identities of one range, by number and by label string.

    Several identities may carry one label set for a moment (two agents raced); `winner` names the one that stays.
    """

    def __init__(self, id_range: IdentityRange) -> None:
        self.range = id_range
        self._by_id: dict[int, tuple[str, int]] = {}  # number -> (label string, revision)
        self._by_labels: dict[str, set[int]] = {}
        self.marked: set[int] = set()  # identities a collector marked for deletion

    @classmethod
    def of(cls, id_range: IdentityRange, objects: list[Object]) -> IdentityIndex:
        index = cls(id_range)
        for obj in objects:
            index.add(obj)
        return index

    def add(self, obj: Object) -> int | None:
        number = _identity_number(obj, self.range)
        if number is None:
            return None
        self.discard(number)
        labels = label_string(obj.get("security-labels") or {})
        self._by_id[number] = (labels, _creation(obj))
        if is_marked(obj):
            self.marked.add(number)
        if labels:  # an identity without labels matches nothing (Cilium ignores those)
            self._by_labels.setdefault(labels, set()).add(number)
        return number

    def discard(self, number: int) -> None:
        self.marked.discard(number)
        old = self._by_id.pop(number, None)
        if old is not None and old[0]:
            numbers = self._by_labels[old[0]]
            numbers.discard(number)
            if not numbers:
                del self._by_labels[old[0]]

    def winner(self, labels: str) -> int | None:
        """The identity of these labels that every agent agrees on: the oldest, then the lowest number."""
        numbers = self._by_labels.get(labels)
        if not numbers:
            return None
        return min(numbers, key=lambda number: (self._by_id[number][1], number))

    def __contains__(self, number: object) -> bool:
        return number in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)


class IdentityAllocator:
    """Allocates identities for label sets of one cluster, in its ResourceStore; an informer Handler of identities.

    `run()` keeps `index` in step with the store; the index answers for label sets already known, without a round trip.
    """

    def __init__(
        self,
        store: ResourceStore,
        cluster: ClusterInfo,
        *,
        id_range: IdentityRange | None = None,
        registry: CollectorRegistry | None = None,
        attempts: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        namespace_labels: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self.store = store
        self.cluster = cluster
        #: The labels of a namespace (from the cluster's Namespace objects), for the identities of its pods.
        self.namespace_labels = namespace_labels or (lambda namespace: {})
        self.range = id_range or identity_range(cluster.id, cluster.max_connected_clusters)
        self.index = IdentityIndex(self.range)
        self.informer = Informer(store, CILIUM_IDENTITY, self)
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._reserved: set[int] = set()  # numbers our own concurrent allocations are trying to create
        self._allocations: Counter | None = None
        if registry is not None:
            self._allocations = Counter(
                "identity_allocations", "Identity allocations by outcome (existing, created, converged)",
                ["outcome"], namespace="clustermesh", registry=registry,
            )  # fmt: skip
            for outcome in _OUTCOMES:
                self._allocations.labels(outcome)

    # --- the informer's side

    @property
    def synced(self) -> asyncio.Event:
        """Set once the index holds every identity the store had at start."""
        return self.informer.synced

    async def run(self) -> None:
        """Keep the index in step with the store, until cancelled."""
        await self.informer.run()

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        if kind.name == CILIUM_IDENTITY.name:
            self.index.add(obj)

    def on_delete(self, kind: Kind, obj: Object) -> None:
        if kind.name == CILIUM_IDENTITY.name and (number := _identity_number(obj, self.range)) is not None:
            self.index.discard(number)

    # --- allocating

    def security_labels(self, labels: Mapping[str, str], namespace: str) -> dict[str, str]:
        return security_labels(labels, namespace, self.cluster.name, self.namespace_labels(namespace))

    def lookup(self, labels: Mapping[str, str], namespace: str) -> int | None:
        """The identity of these labels as far as the index knows, without asking the store."""
        return self.index.winner(label_string(self.security_labels(labels, namespace)))

    async def allocate(self, labels: Mapping[str, str], namespace: str) -> int:
        """The identity of an endpoint with these k8s labels in this namespace, created if there is none.

        Raises `IdentityRangeExhausted` when the range is full, and the store's `Conflict` or `Unavailable` when they
        persist over `attempts` tries.
        """
        security = self.security_labels(labels, namespace)
        labels_key = label_string(security)
        known = self.index.winner(labels_key)
        if known is not None and await self._claim(known):
            self._count("existing")
            return known
        created: list[int] = []  # identities we created, over every attempt: the losers among them are deleted
        delay = self.backoff
        attempt = 1
        while True:
            try:
                number, outcome = await self._allocate_once(labels_key, security, namespace, created)
            except (Conflict, Unavailable) as exc:
                if attempt >= self.attempts:
                    raise
                log.info("identity for %s: attempt %d failed (%s); retrying in %.2f s", labels_key, attempt, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                attempt += 1
                continue
            self._count(outcome)
            return number

    async def _allocate_once(
        self, labels_key: str, security: dict[str, str], namespace: str, created: list[int]
    ) -> tuple[int, Outcome]:
        snapshot = await self._snapshot()
        if snapshot.winner(labels_key) is not None:
            return await self._settle(labels_key, created, snapshot, raced=False)
        for number in self._free(snapshot):
            self._reserved.add(number)
            try:
                try:
                    await self.store.create(self._identity(number, security, namespace))
                except AlreadyExists:
                    current = await self.store.get(CILIUM_IDENTITY, str(number))
                    if current is None or label_string(current.get("security-labels") or {}) != labels_key:
                        continue  # taken by other labels (or gone again): the next number
                    raced = True
                else:
                    created.append(number)
                    raced = False
            finally:
                self._reserved.discard(number)
            return await self._settle(labels_key, created, await self._snapshot(), raced=raced)
        raise IdentityRangeExhausted(
            f"cluster {self.cluster.name}: no free identity left in {self.range.allocatable_first}..{self.range.last}"
            f" ({len(snapshot)} in use)"
        )

    async def _claim(self, number: int) -> bool:
        """Make sure no collector deletes `number` now that it is handed out: remove a collector's mark, if any.
        False if the identity is gone (the caller allocates anew)."""
        if number not in self.index.marked:
            return True
        for _ in range(self.attempts):
            current = await self.store.get(CILIUM_IDENTITY, str(number))
            if current is None:
                self.index.discard(number)
                return False
            if not is_marked(current):
                return True
            try:
                updated = await self.store.update(with_mark(current, None))
            except Conflict:
                continue  # changed meanwhile (a collector, or another allocator): read it again
            except NotFound:
                self.index.discard(number)
                return False
            self.index.add(updated)
            log.info("identity %d: reused, so no longer marked for collection", number)
            return True
        raise Conflict(f"identity {number}: could not remove the collector's mark after {self.attempts} tries")

    async def _settle(
        self, labels_key: str, created: list[int], snapshot: IdentityIndex, *, raced: bool
    ) -> tuple[int, Outcome]:
        """Agree on the winner of `snapshot` and delete what we created that lost."""
        winner = snapshot.winner(labels_key)
        if winner is None:  # ours (or the one we found) was deleted before we saw it again
            raise Conflict(f"the identity for {labels_key} vanished while it was allocated")
        losers = [number for number in created if number != winner]
        for number in losers:
            log.info("identity %d for %s lost a race to %d: deleting it", number, labels_key, winner)
            with contextlib.suppress(NotFound):  # gone already: that is what we wanted
                await self.store.delete(CILIUM_IDENTITY, str(number))
            created.remove(number)
        if winner in created:
            log.info("identity %d created for %s", winner, labels_key)
            return winner, "created"
        if winner in snapshot.marked:
            self.index.marked.add(winner)
            if not await self._claim(winner):
                raise Conflict(f"the identity for {labels_key} was collected while it was allocated")
        return winner, "converged" if losers or raced else "existing"

    async def _snapshot(self) -> IdentityIndex:
        return IdentityIndex.of(self.range, (await self.store.list(CILIUM_IDENTITY)).items)

    def _free(self, snapshot: IdentityIndex) -> Iterator[int]:
        """Free numbers of the range, lowest first, skipping the ones our other allocations are creating."""
        for number in range(self.range.allocatable_first, self.range.last + 1):
            if number not in snapshot and number not in self._reserved:
                yield number

    def _identity(self, number: int, security: dict[str, str], namespace: str) -> Object:
        return {
            "apiVersion": CILIUM_IDENTITY.api_version,
            "kind": CILIUM_IDENTITY.name,
            "metadata": {"name": str(number), "labels": {NAMESPACE_LABEL: namespace}},
            "security-labels": dict(security),
        }

    def _count(self, outcome: Outcome) -> None:
        if self._allocations is not None:
            self._allocations.labels(outcome).inc()


class IdentityCollector:
    """Deletes the cluster's identities that no CiliumEndpoint has referenced for `grace_period` seconds: it marks
    them, and deletes them `confirm_period` later if they are still marked and unused (see the module's text).

    An informer Handler of both CiliumIdentity and CiliumEndpoint. `collect_once(now)` is the whole logic, one
    step; `run()` runs the two informers and calls it every `interval` seconds.
    """

    def __init__(
        self,
        store: ResourceStore,
        cluster: ClusterInfo,
        *,
        grace_period: float = DEFAULT_GC_GRACE_PERIOD,
        interval: float = DEFAULT_GC_INTERVAL,
        confirm_period: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        id_range: IdentityRange | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.grace_period = grace_period
        self.interval = interval
        #: How long a mark stays before the delete: far longer than an allocator's view of it can lag.
        self.confirm_period = confirm_period if confirm_period is not None else min(grace_period, max(interval, 60.0))
        self.clock = clock
        self.range = id_range or identity_range(cluster.id, cluster.max_connected_clusters)
        self.identities: dict[int, Object] = {}  # our range's identities, as last seen
        self.references: dict[int, int] = {}  # identity -> how many endpoints use it
        self._endpoints: dict[Ref, int] = {}  # endpoint -> the identity it uses
        #: identity -> when a collection first found it unused
        self.unused_since: dict[int, float] = {}
        #: identity -> when this collector first saw it marked
        self.marked_at: dict[int, float] = {}
        self.deleted = 0
        self.kept = 0  # deletes refused because the identity changed (was reused) since it was marked
        self.informers = (Informer(store, CILIUM_IDENTITY, self), Informer(store, CILIUM_ENDPOINT, self))
        #: Set once both kinds are listed: before, every identity would look unused.
        self.synced = asyncio.Event()
        self._deleted_total: Counter | None = None
        if registry is not None:
            self._deleted_total = Counter(
                "identity_gc_deleted", "Identities deleted because no endpoint used them for the grace period",
                namespace="clustermesh", registry=registry,
            )  # fmt: skip

    # --- the informers' side

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        if kind.name == CILIUM_IDENTITY.name:
            if (number := _identity_number(obj, self.range)) is not None:
                self.identities[number] = obj
                if not is_marked(obj):
                    self.marked_at.pop(number, None)
        elif kind.name == CILIUM_ENDPOINT.name:
            self._unreference(object_ref(obj))
            number = _endpoint_identity(obj)
            if number is not None:
                self._endpoints[object_ref(obj)] = number
                self.references[number] = self.references.get(number, 0) + 1

    def on_delete(self, kind: Kind, obj: Object) -> None:
        if kind.name == CILIUM_IDENTITY.name:
            if (number := _identity_number(obj, self.range)) is not None:
                self.identities.pop(number, None)
                self.unused_since.pop(number, None)
                self.marked_at.pop(number, None)
        elif kind.name == CILIUM_ENDPOINT.name:
            self._unreference(object_ref(obj))

    def _unreference(self, ref: Ref) -> None:
        number = self._endpoints.pop(ref, None)
        if number is None:
            return
        left = self.references[number] - 1
        if left:
            self.references[number] = left
        else:
            del self.references[number]

    # --- collecting

    def expired(self, now: float) -> list[int]:
        """Mark the unused identities (from `now` if newly unused) and name those unused for the grace period."""
        for number in [number for number in self.unused_since if number not in self.identities]:
            del self.unused_since[number]
        expired: list[int] = []
        for number in sorted(self.identities):
            if self.references.get(number):
                self.unused_since.pop(number, None)
                continue
            since = self.unused_since.setdefault(number, now)
            if now - since >= self.grace_period:
                expired.append(number)
        return expired

    async def collect_once(self, now: float | None = None) -> list[int]:
        """One round: mark what is unused for the grace period, delete what stayed marked and unused for the
        confirm period, unmark what is used again. Returns the identities this call deleted."""
        now = self.clock() if now is None else now
        deleted: list[int] = []
        for number in self.expired(now):
            obj = self.identities.get(number)
            if obj is None:
                continue
            if not is_marked(obj):
                await self._mark(number, obj, now)
                continue
            if now - self.marked_at.setdefault(number, now) < self.confirm_period:
                continue
            if await self._delete(number, obj):
                deleted.append(number)
        for number, obj in list(self.identities.items()):
            if self.references.get(number) and is_marked(obj):
                await self._set_mark(number, obj, None)  # used again (an endpoint came back): not deletable
        self.deleted += len(deleted)
        if self._deleted_total is not None and deleted:
            self._deleted_total.inc(len(deleted))
        return deleted

    async def _mark(self, number: int, obj: Object, now: float) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if await self._set_mark(number, obj, stamp):
            self.marked_at[number] = now
            log.info("identity %d: unused for %.0f s, marked; deleted in %.0f s if still unused", number,
                     self.grace_period, self.confirm_period)  # fmt: skip

    async def _set_mark(self, number: int, obj: Object, mark: str | None) -> bool:
        try:
            updated = await self.store.update(with_mark(obj, mark))
        except NotFound:
            self.on_delete(CILIUM_IDENTITY, obj)
            return False
        except (Conflict, Unavailable) as exc:  # changed meanwhile: the informer brings it, the next round decides
            log.info("identity %d: not %s this time: %s", number, "marked" if mark else "unmarked", exc)
            return False
        self.identities[number] = updated
        return True

    async def _delete(self, number: int, obj: Object) -> bool:
        """Delete the version we marked, and only that one."""
        version = str((obj.get("metadata") or {}).get("resourceVersion", "")) or None
        try:
            await self.store.delete(CILIUM_IDENTITY, str(number), resource_version=version)
        except NotFound:
            log.debug("identity %d: already deleted by another agent", number)
        except Conflict:
            self.kept += 1
            log.info("identity %d: changed since it was marked (reused): kept", number)
            return False
        except Unavailable as exc:
            log.warning("identity %d: not collected this time: %s", number, exc)
            return False
        else:
            log.info("identity %d: unused for %.0f s, deleted", number, self.grace_period + self.confirm_period)
            self.unused_since.pop(number, None)
            self.marked_at.pop(number, None)
            return True
        self.unused_since.pop(number, None)
        self.marked_at.pop(number, None)
        return False

    async def collect_forever(self) -> None:
        """`collect_once` every `interval` seconds, until cancelled (for informers wired by the caller)."""
        while True:
            await self.collect_once()
            await asyncio.sleep(self.interval)

    async def run(self) -> None:
        """Run both informers, wait until they are synced, then collect every `interval` seconds."""
        async with asyncio.TaskGroup() as group:
            for informer in self.informers:
                group.create_task(informer.run(), name=f"identity-gc-{informer.kind.plural}")
            for informer in self.informers:
                await informer.synced.wait()
            self.synced.set()
            await self.collect_forever()


def _endpoint_identity(obj: Object) -> int | None:
    """The identity a CiliumEndpoint uses (`status.identity.id`), if any."""
    status: Any = obj.get("status") or {}
    number = (status.get("identity") or {}).get("id")
    return number if isinstance(number, int) and not isinstance(number, bool) else None
