"""The load balancer's maps, kept equal to the cluster's Services and the mesh's global services.

Inputs: the local cluster's Services and EndpointSlices (informer handlers), and the merged view's exports of
global services by the other clusters (its `service` changes name the Service to look at again). For each Service
that changed, `clustermesh.model.loadbalancing.plan_service` says its frontends and their backends; this writes the
difference with what the maps hold for that Service only: backends first (ids stable per cluster, address, port
and protocol, shared by every frontend that uses them, removed when none does), then the slots, then each
frontend's slot 0 (its count: the datapath picks among slots 1..count). A Service that did not change costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from agent.view import Change, MergedView
from bpf.lbmaps import PROTOCOLS, LbBackend, LbBackendMap, LbFrontendKey, LbRevNatMap, LbService, LbServiceMap
from clustermesh.model import converters
from clustermesh.model.kinds import Kind, Object
from clustermesh.model.loadbalancing import Backend, FrontendPlan, plan_service
from clustermesh.resources.informing import object_ref

__all__ = ["LbCounts", "LbDatapath", "LoadBalancer"]

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class LbDatapath(Protocol):
    lb_services: LbServiceMap
    lb_backends: LbBackendMap
    lb_revnat: LbRevNatMap


@dataclass
class LbCounts:
    """Map writes, as the bench and the tests count them."""

    service_writes: int = 0
    backend_writes: int = 0
    revnat_writes: int = 0


@dataclass
class _Ids:
    """Small numbers handed out and taken back (backend ids from 1, reverse-NAT indexes from 1 to 65535)."""

    limit: int
    given: dict[object, int] = field(default_factory=dict)
    owners: dict[int, object] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    next: int = 1

    def get(self, owner: object) -> int:
        if owner not in self.given:
            if self.free:
                self.given[owner] = self.free.pop()
            elif self.next <= self.limit:
                self.given[owner] = self.next
                self.next += 1
            else:
                raise OverflowError(f"more than {self.limit} ids")
            self.owners[self.given[owner]] = owner
        return self.given[owner]

    def release(self, owner: object) -> None:
        number = self.given.pop(owner, None)
        if number is not None:
            del self.owners[number]
            self.free.append(number)


class LoadBalancer:
    """An informer Handler of Services and EndpointSlices, and the writer of the load balancer's maps."""

    def __init__(self, view: MergedView, datapath: LbDatapath, cluster: str, cluster_id: int) -> None:
        self.view = view
        self.datapath = datapath
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.services: dict[str, Object] = {}  # namespace/name -> the local Service
        self.slices: dict[str, dict[str, Object]] = {}  # namespace/name -> slice name -> EndpointSlice
        self._slice_owner: dict[str, str] = {}  # namespace/slice name -> namespace/name of its Service
        self.plans: dict[str, list[FrontendPlan]] = {}
        self.counts = LbCounts()
        self._written: dict[str, dict[LbFrontendKey, LbService]] = {}  # per Service: its entries in the map
        self._backend_users: dict[int, set[str]] = {}  # backend id -> the Services whose slots name it
        self._service_backends: dict[str, set[int]] = {}  # namespace/name -> the backend ids its slots name
        self._backend_ids = _Ids(limit=2**32 - 1)
        self._revnat_ids = _Ids(limit=65535)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._revnat_services: dict[int, str] = {}  # reverse-NAT index -> namespace/name: flows name the Service
        self._cluster_names: dict[int, str] = {cluster_id: cluster}

    # --- inputs

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        namespace, name = object_ref(obj)
        namespace = namespace or "default"
        if kind.name == "Service":
            self.services[f"{namespace}/{name}"] = obj
            self._touch(f"{namespace}/{name}")
        elif kind.name == "EndpointSlice":
            owner = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if owner:
                self._forget_slice(namespace, name)
                self.slices.setdefault(f"{namespace}/{owner}", {})[name] = obj
                self._slice_owner[f"{namespace}/{name}"] = f"{namespace}/{owner}"
                self._touch(f"{namespace}/{owner}")

    def on_delete(self, kind: Kind, obj: Object) -> None:
        namespace, name = object_ref(obj)
        namespace = namespace or "default"
        if kind.name == "Service":
            self.services.pop(f"{namespace}/{name}", None)
            self._touch(f"{namespace}/{name}")
        elif kind.name == "EndpointSlice":
            self._forget_slice(namespace, name)

    def _forget_slice(self, namespace: str, name: str) -> None:
        """Take a slice from the Service that owned it (its label may have changed since)."""
        key = self._slice_owner.pop(f"{namespace}/{name}", None)
        if key is None:
            return
        slices = self.slices.get(key, {})
        slices.pop(name, None)
        if not slices:
            self.slices.pop(key, None)
        self._touch(key)

    def on_changes(self, changes: Iterable[Change]) -> None:
        """The view's changes: a global service another cluster exports changed."""
        for change in changes:
            if change.kind == "service":
                self._touch(change.key)

    def _touch(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    # --- the maps

    def sync(self, keys: Iterable[str] | None = None) -> None:
        """Write what changed for these Services (all that are dirty, by default)."""
        todo = set(keys) if keys is not None else self._dirty
        for key in sorted(todo):
            self._dirty.discard(key)
            try:
                self._sync_service(key)
            except (OSError, OverflowError) as exc:
                log.error("service %s: the load balancer's maps were not written: %s", key, exc)

    def _sync_service(self, key: str) -> None:
        service = self.services.get(key)
        plans: list[FrontendPlan] = []
        exports = self.view.service_exports(key)
        if service is not None:
            slices = (self.slices.get(key) or {}).values()
            plans = plan_service(service, slices, exports if converters.is_global_service(service) else {},
                                 self.cluster)  # fmt: skip
        self.plans[key] = plans
        if not plans:
            self.plans.pop(key, None)
        cluster_ids = {**{c: int(e.clusterID) for c, e in exports.items()}, self.cluster: self.cluster_id}
        self._cluster_names.update({number: name for name, number in cluster_ids.items() if number})
        desired: dict[LbFrontendKey, LbService] = {}
        backends: dict[int, LbBackend] = {}
        for plan in plans:
            frontend = plan.frontend
            base = LbFrontendKey(frontend.ip, frontend.port, PROTOCOLS[frontend.protocol])
            rev_nat = self._revnat_ids.get((frontend.ip, frontend.port, frontend.protocol))
            self._revnat_services[rev_nat] = key
            desired[base] = LbService(0, len(plan.used), rev_nat)
            for slot, backend in enumerate(plan.used, start=1):
                number = self._backend_id(backend, cluster_ids.get(backend.cluster, 0))
                backends[number] = LbBackend(backend.ip, backend.port, PROTOCOLS[backend.protocol], 0,
                                             cluster_ids.get(backend.cluster, 0))  # fmt: skip
                desired[base._replace(slot=slot)] = LbService(number)
        written = self._written.get(key, {})
        # backends before the slots that name them
        new_backends = {n: b for n, b in backends.items() if key not in self._backend_users.get(n, set())}
        for number in backends:
            self._backend_users.setdefault(number, set()).add(key)
        before = self._service_backends.pop(key, set())
        if backends:
            self._service_backends[key] = set(backends)
        if new_backends:
            self.datapath.lb_backends.write(new_backends)
            self.counts.backend_writes += len(new_backends)
        revnats = {s.rev_nat: (k.address, k.port) for k, s in desired.items() if k.slot == 0}
        fresh_revnats = {n: f for n, f in revnats.items() if not any(
            k.slot == 0 and v.rev_nat == n for k, v in written.items())}  # fmt: skip
        if fresh_revnats:
            self.datapath.lb_revnat.write(fresh_revnats)
            self.counts.revnat_writes += len(fresh_revnats)
        slots = {k: v for k, v in desired.items() if k.slot and written.get(k) != v}
        heads = {k: v for k, v in desired.items() if not k.slot and written.get(k) != v}
        if slots:
            self.datapath.lb_services.write(slots)
        if heads:
            self.datapath.lb_services.write(heads)
        gone = [k for k in written if k not in desired]
        if gone:
            self.datapath.lb_services.remove(sorted(gone, key=lambda k: k.slot == 0))  # slots, then heads
        self.counts.service_writes += len(slots) + len(heads) + len(gone)
        if desired:
            self._written[key] = desired
        else:
            self._written.pop(key, None)
        # frontends and backends no longer used
        for k in gone:
            if k.slot == 0 and k not in desired:
                owner = (k.address, k.port, _protocol_name(k.protocol))
                unused = self._revnat_ids.given.get(owner)
                if unused is not None:
                    self.datapath.lb_revnat.remove([unused])
                    self.counts.revnat_writes += 1
                    self._revnat_ids.release(owner)
                    self._revnat_services.pop(unused, None)
        for number in sorted(before - backends.keys()):
            users = self._backend_users.get(number, set())
            users.discard(key)
            if not users:
                self._backend_users.pop(number, None)
                self.datapath.lb_backends.remove([number])
                self.counts.backend_writes += 1
                self._backend_ids.release(self._backend_ids.owners[number])

    # --- naming what the socket programs tell (agent/flows.py)

    def service_of(self, rev_nat: int) -> str | None:
        return self._revnat_services.get(rev_nat)

    def cluster_name(self, cluster_id: int) -> str | None:
        return self._cluster_names.get(cluster_id)

    def _backend_id(self, backend: Backend, cluster_id: int) -> int:
        return self._backend_ids.get((cluster_id, backend.ip, backend.port, backend.protocol))

    async def run(self, listed: asyncio.Event) -> None:
        """Until cancelled: once the Services and EndpointSlices are listed, keep the maps in step."""
        subscription = self.view.subscribe(kinds=["service"])
        try:
            await listed.wait()
            self._wake.set()
            follower = asyncio.create_task(self._follow(subscription), name="lb-view")
            try:
                while True:
                    await self._wake.wait()
                    self._wake.clear()
                    await asyncio.sleep(0)  # a burst of changes in before writing once
                    self.sync()
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
        finally:
            subscription.close()

    async def _follow(self, subscription: object) -> None:
        while True:
            self.on_changes(await subscription.drain())  # type: ignore[attr-defined]

    def resolve(self, namespace: str, name: str, clusterset: bool) -> str | None:
        """A Service's ClusterIP for DNS: every local Service (cluster.local), a global one (clusterset.local)."""
        service = self.services.get(f"{namespace}/{name}")
        if service is None or (clusterset and not converters.is_global_service(service)):
            return None
        ip = ((service.get("spec") or {}).get("clusterIP") or "").lower()
        return ip if ip and ip != "none" else None

    # --- what `clustermesh service list` shows

    def describe(self) -> list[dict[str, object]]:
        found = []
        for key, plans in sorted(self.plans.items()):
            for plan in plans:
                used = set(plan.used)
                found.append({
                    "service": key, "frontend": str(plan.frontend), "port_name": plan.frontend.port_name,
                    "global": plan.is_global, "affinity": plan.affinity,
                    "backends": [{"cluster": b.cluster, "address": f"{b.ip}:{b.port}", "state": b.state,
                                  "in_use": b in used} for b in plan.backends],
                })  # fmt: skip
        return found


def _protocol_name(number: int) -> str:
    return next(name for name, value in PROTOCOLS.items() if value == number)
