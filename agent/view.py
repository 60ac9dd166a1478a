"""The merged view: every connected cluster's nodes, ipcache, identities and global services, as one.

Each cluster (the local one included) feeds it through four observers, one per state prefix, which its WatchStores
call in order. The view keeps, per key, what each cluster said, so that two clusters claiming one IP (a broken mesh)
do not make one cluster's delete wipe the other's entry; it answers lookups, counts per cluster, and tells its
subscribers every change in order (`subscribe()`, one queue each): the datapath (routes, tunnels) programs itself
from those changes.

Global services are merged here, with Cilium's rules: backends from every cluster that exports the service with
`shared: true`; `service.cilium.io/affinity` of the local Service: `local` uses local backends while there are any,
`remote` uses remote backends while there are any, none (or anything else) uses all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from clustermesh.model import keys, wire
from clustermesh.model.admission import IdentityEntry

__all__ = ["Change", "GlobalService", "MergedView", "ServiceBackend", "Subscription"]

log = logging.getLogger(__name__)

Kind = Literal["node", "ipcache", "identity", "service"]
KINDS: tuple[Kind, ...] = ("node", "ipcache", "identity", "service")


class Change(NamedTuple):
    """One change of the view (a tuple: a sync makes one per entry, and tuples are the cheapest to make)."""

    kind: Kind
    op: Literal["upsert", "delete"]
    key: str
    value: Any
    cluster: str


@dataclass(frozen=True)
class ServiceBackend:
    cluster: str
    ip: str
    ports: dict[str, wire.L4Addr | None]
    zone: str = ""


@dataclass(frozen=True)
class GlobalService:
    namespace: str
    name: str
    affinity: str
    frontends: dict[str, dict[str, wire.L4Addr | None]]
    backends: tuple[ServiceBackend, ...]
    clusters: tuple[str, ...]  # every cluster that exports it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Subscription:
    """Changes of the view in order; `get()` waits for the next one, `drain()` takes all that are there.

    A deque and one event rather than an asyncio.Queue: a sync of 100k entries puts 100k changes, and a queue wakes
    a waiter future for each of them.
    """

    def __init__(self, view: MergedView, kinds: frozenset[Kind] | None = None) -> None:
        self._view = view
        self.kinds = kinds  # None: every kind
        self.pending: deque[Change] = deque()
        self._ready = asyncio.Event()

    def wake(self) -> None:
        if not self._ready.is_set():
            self._ready.set()

    async def get(self) -> Change:
        while not self.pending:
            self._ready.clear()
            await self._ready.wait()
        return self.pending.popleft()

    async def drain(self) -> list[Change]:
        """Every change waiting (at least one): datapaths apply changes in batches."""
        while not self.pending:
            self._ready.clear()
            await self._ready.wait()
        changes = list(self.pending)
        self.pending.clear()
        return changes

    def close(self) -> None:
        self._view.unsubscribe(self)


@dataclass
class _ServiceInputs:
    exports: dict[str, wire.ClusterService] = field(default_factory=dict)  # cluster -> its ClusterService
    affinity: str = ""  # from the local Service's annotation
    local_frontends: dict[str, dict[str, wire.L4Addr | None]] | None = None


class MergedView:
    def __init__(self, local_cluster: str) -> None:
        self.local_cluster = local_cluster
        self.nodes: dict[str, wire.Node] = {}  # "<cluster>/<name>"
        self._ip_entries: dict[str, wire.IPIdentityPair] = {}  # ip key -> the entry in use
        self._ip_owner: dict[str, str] = {}  # ip key -> the cluster of the entry in use
        self._ip_shadowed: dict[str, dict[str, wire.IPIdentityPair]] = {}  # ip key -> other clusters' claims
        self._ip_counts: dict[str, int] = {}
        self.identities: dict[int, IdentityEntry] = {}
        self._identity_cluster: dict[int, str] = {}
        self._services: dict[str, _ServiceInputs] = defaultdict(_ServiceInputs)
        self.services: dict[str, GlobalService] = {}
        self._counts: dict[str, dict[Kind, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        self._subscribers: list[Subscription] = []
        self.changes = 0

    # --- subscribers

    def subscribe(self, kinds: Iterable[Kind] | None = None) -> Subscription:
        """Every change from now on, or those of `kinds` only (a prober of nodes is not handed a million endpoints)."""
        subscription = Subscription(self, frozenset(kinds) if kinds is not None else None)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def _emit(self, change: Change) -> None:
        self.changes += 1
        for subscription in self._subscribers:
            if subscription.kinds is None or change.kind in subscription.kinds:
                subscription.pending.append(change)
                subscription.wake()

    # --- lookups

    def ipcache(self, ip_key: str) -> wire.IPIdentityPair | None:
        return self._ip_entries.get(ip_key)

    def ipcache_keys(self) -> list[str]:
        return list(self._ip_entries)

    @property
    def conflicts(self) -> dict[str, set[str]]:
        """IP keys claimed by more than one cluster, and the clusters."""
        return {ip: {self._ip_owner[ip], *shadow} for ip, shadow in self._ip_shadowed.items()}

    # --- observers (called by each cluster's WatchStores)

    def observer(self, cluster: str, kind: Kind) -> Any:
        return _Observer(self, cluster, kind)

    def upsert(self, cluster: str, kind: Kind, key: str, value: Any) -> None:
        getattr(self, f"_upsert_{kind}")(cluster, key, value)

    def delete(self, cluster: str, kind: Kind, key: str, value: Any) -> None:
        getattr(self, f"_delete_{kind}")(cluster, key, value)

    def _count(self, cluster: str, kind: Kind, delta: int) -> None:
        self._counts[cluster][kind] += delta

    def count(self, cluster: str, kind: Kind) -> int:
        if kind == "ipcache":
            return self._ip_counts.get(cluster, 0)
        return self._counts[cluster][kind] if cluster in self._counts else 0

    @property
    def counts(self) -> dict[str, dict[Kind, int]]:
        """Entries per cluster and kind (an ipcache entry counts for every cluster that claims it)."""
        result = {cluster: dict(kinds) for cluster, kinds in self._counts.items()}
        for cluster, number in self._ip_counts.items():
            result.setdefault(cluster, dict.fromkeys(KINDS, 0))["ipcache"] = number
        return result

    def _upsert_node(self, cluster: str, key: str, node: wire.Node) -> None:
        name = f"{cluster}/{node.Name}"
        if name not in self.nodes:
            self._count(cluster, "node", 1)
        self.nodes[name] = node
        self._emit(Change("node", "upsert", name, node, cluster))

    def _delete_node(self, cluster: str, key: str, node: wire.Node) -> None:
        name = f"{cluster}/{node.Name}"
        if self.nodes.pop(name, None) is not None:
            self._count(cluster, "node", -1)
            self._emit(Change("node", "delete", name, node, cluster))

    # The ipcache is the big one (one entry per endpoint of every cluster): kept flat, one entry per IP, and the
    # rare second claim of an IP by another cluster (a broken mesh) kept aside, the local cluster's claim winning.

    def _upsert_ipcache(self, cluster: str, key: str, pair: wire.IPIdentityPair) -> None:
        ip_key = keys.ip_of_checked_key(key)
        owner = self._ip_owner.get(ip_key)
        if owner is None or owner == cluster:
            if owner is None:
                self._ip_owner[ip_key] = cluster
                self._ip_counts[cluster] = self._ip_counts.get(cluster, 0) + 1
            self._ip_entries[ip_key] = pair
            self._emit(Change("ipcache", "upsert", ip_key, pair, cluster))
            return
        shadow = self._ip_shadowed.setdefault(ip_key, {})
        if cluster not in shadow:
            self._ip_counts[cluster] = self._ip_counts.get(cluster, 0) + 1
        log.warning("IP %s is claimed by clusters %s and %s", ip_key, owner, cluster)
        if cluster == self.local_cluster:  # the local claim wins: the active one steps aside
            shadow.pop(cluster, None)
            shadow[owner] = self._ip_entries[ip_key]
            self._ip_owner[ip_key] = cluster
            self._ip_entries[ip_key] = pair
            self._emit(Change("ipcache", "upsert", ip_key, pair, cluster))
        else:
            shadow[cluster] = pair

    def _upserts_ipcache(self, cluster: str, items: list[tuple[str, wire.IPIdentityPair]]) -> None:
        """A page of a list: the common case (new IPs, or this cluster's own) in one tight loop."""
        owners, entries = self._ip_owner, self._ip_entries
        changes: list[Change] = []
        added = 0
        parse = keys.ip_of_checked_key
        new, append = tuple.__new__, changes.append  # Change(...) is a Python call per entry; this is not
        for key, pair in items:
            ip_key = parse(key)
            owner = owners.get(ip_key)
            if owner is None:
                owners[ip_key] = cluster
                added += 1
            elif owner != cluster:
                self._upsert_ipcache(cluster, key, pair)  # a conflict: the careful path
                continue
            entries[ip_key] = pair
            append(new(Change, ("ipcache", "upsert", ip_key, pair, cluster)))
        self._ip_counts[cluster] = self._ip_counts.get(cluster, 0) + added
        self.changes += len(changes)
        for subscription in self._subscribers:
            subscription.pending.extend(changes)
            subscription.wake()

    def _delete_ipcache(self, cluster: str, key: str, pair: wire.IPIdentityPair) -> None:
        ip_key = keys.ip_of_checked_key(key)
        owner = self._ip_owner.get(ip_key)
        shadow = self._ip_shadowed.get(ip_key)
        if owner != cluster:
            if shadow is not None and shadow.pop(cluster, None) is not None:
                self._ip_counts[cluster] -= 1
                if not shadow:
                    del self._ip_shadowed[ip_key]
            return
        self._ip_counts[cluster] -= 1
        if shadow:  # another cluster still claims it: its entry takes over
            successor = self.local_cluster if self.local_cluster in shadow else next(iter(shadow))
            replacement = shadow.pop(successor)
            if not shadow:
                del self._ip_shadowed[ip_key]
            self._ip_owner[ip_key] = successor
            self._ip_entries[ip_key] = replacement
            self._emit(Change("ipcache", "upsert", ip_key, replacement, successor))
            return
        del self._ip_owner[ip_key]
        del self._ip_entries[ip_key]
        self._emit(Change("ipcache", "delete", ip_key, pair, cluster))

    def _upsert_identity(self, cluster: str, key: str, entry: IdentityEntry) -> None:
        if entry.id not in self.identities:
            self._count(cluster, "identity", 1)
        self.identities[entry.id] = entry
        self._identity_cluster[entry.id] = cluster
        self._emit(Change("identity", "upsert", str(entry.id), entry, cluster))

    def _delete_identity(self, cluster: str, key: str, entry: IdentityEntry) -> None:
        if self._identity_cluster.get(entry.id) != cluster:
            return
        del self.identities[entry.id]
        del self._identity_cluster[entry.id]
        self._count(cluster, "identity", -1)
        self._emit(Change("identity", "delete", str(entry.id), entry, cluster))

    def _upsert_service(self, cluster: str, key: str, service: wire.ClusterService) -> None:
        name = f"{service.namespace}/{service.name}"
        inputs = self._services[name]
        if cluster not in inputs.exports:
            self._count(cluster, "service", 1)
        inputs.exports[cluster] = service
        self._merge(name, cluster)

    def _delete_service(self, cluster: str, key: str, service: wire.ClusterService) -> None:
        name = f"{service.namespace}/{service.name}"
        inputs = self._services.get(name)
        if inputs is None or inputs.exports.pop(cluster, None) is None:
            return
        self._count(cluster, "service", -1)
        self._merge(name, cluster)

    def service_exports(self, key: str) -> dict[str, wire.ClusterService]:
        """Every cluster's export of the service `namespace/name` (shared or not), by cluster."""
        inputs = self._services.get(key)
        return dict(inputs.exports) if inputs is not None else {}

    def set_local_service(self, namespace: str, name: str, *, affinity: str, frontends: Any | None) -> None:
        """The local cluster's Service (from its ResourceStore): its affinity, and frontends when not exported."""
        key = f"{namespace}/{name}"
        inputs = self._services[key]
        inputs.affinity = affinity
        inputs.local_frontends = frontends
        self._merge(key, self.local_cluster)

    def clear_local_service(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        inputs = self._services.get(key)
        if inputs is not None:
            inputs.affinity = ""
            inputs.local_frontends = None
            self._merge(key, self.local_cluster)

    def _merge(self, key: str, cluster: str) -> None:
        inputs = self._services.get(key)
        merged = _merge_service(key, inputs, self.local_cluster) if inputs is not None else None
        if merged is None:
            if inputs is not None and not inputs.exports and not inputs.affinity:
                # nothing left to remember; a local Service's affinity is kept for exports that come later
                self._services.pop(key, None)
            if self.services.pop(key, None) is not None:
                self._emit(Change("service", "delete", key, None, cluster))
            return
        if self.services.get(key) == merged:
            return
        self.services[key] = merged
        self._emit(Change("service", "upsert", key, merged, cluster))


def _merge_service(key: str, inputs: _ServiceInputs, local: str) -> GlobalService | None:
    exports = {cluster: svc for cluster, svc in inputs.exports.items() if svc.shared}
    if not exports and inputs.local_frontends is None:
        return None
    namespace, _, name = key.partition("/")
    local_export = exports.get(local)
    frontends = dict(local_export.frontends or {}) if local_export is not None else {}
    if inputs.local_frontends is not None:
        frontends = dict(inputs.local_frontends)
    backends = [
        ServiceBackend(cluster, ip, dict(ports), _zone(svc, ip))
        for cluster, svc in sorted(exports.items())
        for ip, ports in sorted((svc.backends or {}).items())
    ]
    local_backends = [b for b in backends if b.cluster == local]
    remote_backends = [b for b in backends if b.cluster != local]
    if inputs.affinity == "local" and local_backends:
        backends = local_backends
    elif inputs.affinity == "remote" and remote_backends:
        backends = remote_backends
    return GlobalService(namespace, name, inputs.affinity or "none", frontends, tuple(backends), tuple(sorted(exports)))


def _zone(service: wire.ClusterService, ip: str) -> str:
    zones = service.zones if isinstance(service.zones, dict) else {}
    zone = zones.get(ip)
    return zone.zone if zone is not None else ""


class _Observer:
    """Adapts one cluster's WatchStore of one kind to the view (the view's methods are looked up once)."""

    def __init__(self, view: MergedView, cluster: str, kind: Kind) -> None:
        self.cluster = cluster
        self._upsert = getattr(view, f"_upsert_{kind}")
        self._delete = getattr(view, f"_delete_{kind}")
        single = self._upsert
        self._upserts = getattr(view, f"_upserts_{kind}", None) or (
            lambda cluster, items: [single(cluster, key, value) for key, value in items]
        )

    def on_upsert(self, key: str, value: Any) -> None:
        self._upsert(self.cluster, key, value)

    def on_delete(self, key: str, value: Any) -> None:
        self._delete(self.cluster, key, value)

    def on_upserts(self, items: list[tuple[str, Any]]) -> None:
        self._upserts(self.cluster, items)
