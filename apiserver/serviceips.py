"""The ClusterIP allocator: every Service of the cluster without an address gets one from `--service-cluster-ip-range`.

What Kubernetes' apiserver does when a Service is created, done after the fact since the standalone store is plain
etcd: an informer of Services notes the addresses in use; once it has listed them all, each Service that has none
(and is not headless) is given the next free one with an update conditioned on the version it read. A Service keeps
its address (the store refuses to change it); its deletion frees it. Only for the standalone store: a Kubernetes
API server gives ClusterIPs itself.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.model.serviceips import PoolExhausted, ServiceIPPool, cluster_ip, needs_cluster_ip
from clustermesh.resources.informing import object_ref
from clustermesh.resources.store import ResourceError, ResourceStore

__all__ = ["ServiceIPAllocator"]

log = logging.getLogger(__name__)

SERVICE = kind_by_name("Service")


class ServiceIPAllocator:
    """An informer Handler of Services, and the job that gives the waiting ones their ClusterIP."""

    def __init__(self, store: ResourceStore, cidr: str, *, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.pool = ServiceIPPool(cidr)
        self.waiting: set[str] = set()  # "namespace/name"
        self.exhausted: set[str] = set()  # waiting for an address to be freed
        self._wake = asyncio.Event()
        registry = registry or CollectorRegistry()
        self.allocated = Gauge("apiserver_service_ips_allocated", "ClusterIPs held by the cluster's Services",
                               namespace="clustermesh", registry=registry)  # fmt: skip
        self.failures = Counter("apiserver_service_ip_failures", "ClusterIPs that could not be given, by reason",
                                ["reason"], namespace="clustermesh", registry=registry)  # fmt: skip

    @staticmethod
    def _owner(obj: Object) -> str:
        namespace, name = object_ref(obj)
        return f"{namespace or 'default'}/{name}"

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        owner = self._owner(obj)
        ip = cluster_ip(obj)
        if ip is not None and ip.lower() != "none":
            self.pool.note(owner, ip)
            self.waiting.discard(owner)
        elif needs_cluster_ip(obj):
            self.waiting.add(owner)
            self._wake.set()
        self.allocated.set(len(self.pool.holders))

    def on_delete(self, kind: Kind, obj: Object) -> None:
        owner = self._owner(obj)
        self.pool.release(owner)
        self.waiting.discard(owner)
        self.exhausted.discard(owner)
        if self.exhausted:  # an address is free again
            self.waiting |= self.exhausted
            self.exhausted.clear()
            self._wake.set()
        self.allocated.set(len(self.pool.holders))

    async def run(self, listed: asyncio.Event) -> None:
        """Until cancelled: once every Service is listed (so that no address in use is given again), give the
        waiting ones theirs."""
        await listed.wait()
        while True:
            await self._wake.wait()
            self._wake.clear()
            for owner in sorted(self.waiting):
                await self._give(owner)
            if self.waiting:  # a conflict or an unavailable store: again in a moment
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _give(self, owner: str) -> None:
        namespace, _, name = owner.partition("/")
        try:
            current = await self.store.get(SERVICE, name, namespace)
            if current is None or not needs_cluster_ip(current):
                self.waiting.discard(owner)
                return
            ip = self.pool.allocate(owner)
            spec = {**(current.get("spec") or {}), "clusterIP": ip, "clusterIPs": [ip]}
            await self.store.update({**current, "spec": spec})  # conditioned on the resourceVersion read
        except PoolExhausted as exc:
            self.failures.labels("exhausted").inc()
            log.error("Service %s gets no ClusterIP until one is freed: %s", owner, exc)
            self.waiting.discard(owner)
            self.exhausted.add(owner)
            return
        except ResourceError as exc:
            self.failures.labels(type(exc).__name__.lower()).inc()
            log.info("Service %s: ClusterIP not written yet (%s); trying again", owner, exc)
            return
        self.waiting.discard(owner)
        log.info("Service %s: ClusterIP %s", owner, ip)
