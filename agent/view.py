"""The merged view: every connected cluster's nodes, ipcache, identities and global services, as one.

Each cluster (the local one included) feeds it through four observers, one per state prefix, which its WatchStores
call in order. The view keeps, per key, what each cluster said, so that two clusters claiming one IP (a broken mesh)
do not make one cluster's delete wipe the other's entry; it answers lookups, counts per cluster, and tells its
subscribers every change in order (`subscribe()`, one queue each): the datapath of the next issue programs itself
from those changes.

Global services are merged here, with Cilium's rules: backends from every cluster that exports the service with
`shared: true`; `service.cilium.io/affinity` of the local Service: `local` uses local backends while there are any,
`remote` uses remote backends while there are any, none (or anything else) uses all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from clustermesh.model import wire
from clustermesh.model.remotes import IdentityEntry

__all__ = ["Change", "GlobalService", "MergedView", "ServiceBackend", "Subscription"]

log = logging.getLogger(__name__)

Kind = Literal["node", "ipcache", "identity", "service"]
KINDS: tuple[Kind, ...] = ("node", "ipcache", "identity", "service")


@dataclass(frozen=True)
class Change:
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
    """Changes of the view in order; `get()` waits for the next one."""

    def __init__(self, view: MergedView) -> None:
        self._view = view
        self.queue: asyncio.Queue[Change] = asyncio.Queue()

    async def get(self) -> Change:
        return await self.queue.get()

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
        self._ips: dict[str, dict[str, wire.IPIdentityPair]] = defaultdict(dict)  # ip key -> cluster -> entry
        self.identities: dict[int, IdentityEntry] = {}
        self._identity_cluster: dict[int, str] = {}
        self._services: dict[str, _ServiceInputs] = defaultdict(_ServiceInputs)
        self.services: dict[str, GlobalService] = {}
        self.counts: dict[str, dict[Kind, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        self.conflicts: dict[str, set[str]] = {}  # ip key -> clusters claiming it (more than one)
        self._subscribers: list[Subscription] = []
        self.changes = 0

    # --- subscribers

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def _emit(self, change: Change) -> None:
        self.changes += 1
        for subscription in self._subscribers:
            subscription.queue.put_nowait(change)

    # --- lookups

    def ipcache(self, ip_key: str) -> wire.IPIdentityPair | None:
        claims = self._ips.get(ip_key)
        if not claims:
            return None
        return claims.get(self.local_cluster) or next(iter(claims.values()))

    def ipcache_keys(self) -> list[str]:
        return [key for key, claims in self._ips.items() if claims]

    # --- observers (called by each cluster's WatchStores)

    def observer(self, cluster: str, kind: Kind) -> Any:
        return _Observer(self, cluster, kind)

    def upsert(self, cluster: str, kind: Kind, key: str, value: Any) -> None:
        getattr(self, f"_upsert_{kind}")(cluster, key, value)

    def delete(self, cluster: str, kind: Kind, key: str, value: Any) -> None:
        getattr(self, f"_delete_{kind}")(cluster, key, value)

    def _count(self, cluster: str, kind: Kind, delta: int) -> None:
        self.counts[cluster][kind] += delta

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

    def _upsert_ipcache(self, cluster: str, key: str, pair: wire.IPIdentityPair) -> None:
        ip_key = pair.key_name()
        claims = self._ips[ip_key]
        if cluster not in claims:
            self._count(cluster, "ipcache", 1)
        claims[cluster] = pair
        if len(claims) > 1:
            self.conflicts[ip_key] = set(claims)
            log.warning("IP %s is claimed by clusters %s", ip_key, ", ".join(sorted(claims)))
        self._emit(Change("ipcache", "upsert", ip_key, self.ipcache(ip_key), cluster))

    def _delete_ipcache(self, cluster: str, key: str, pair: wire.IPIdentityPair) -> None:
        ip_key = pair.key_name()
        claims = self._ips.get(ip_key)
        if not claims or claims.pop(cluster, None) is None:
            return
        self._count(cluster, "ipcache", -1)
        if len(claims) <= 1:
            self.conflicts.pop(ip_key, None)
        if claims:
            self._emit(Change("ipcache", "upsert", ip_key, self.ipcache(ip_key), cluster))
        else:
            del self._ips[ip_key]
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
    """Adapts one cluster's WatchStore of one kind to the view."""

    def __init__(self, view: MergedView, cluster: str, kind: Kind) -> None:
        self.view = view
        self.cluster = cluster
        self.kind = kind

    def on_upsert(self, key: str, value: Any) -> None:
        self.view.upsert(self.cluster, self.kind, key, value)

    def on_delete(self, key: str, value: Any) -> None:
        self.view.delete(self.cluster, self.kind, key, value)
