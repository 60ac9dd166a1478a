"""The clustermesh apiserver of one cluster: reads its resources, writes its `cilium/` keys, and nothing else does.

Wiring, in the order it starts:

1. connect to the cluster's etcd (retried, with the reason logged and shown by /readyz, until it answers);
2. a ResourceStore: `standalone` (the `registry/` prefix of that same etcd) or `kubernetes`;
3. leases, four SyncStores (nodes, ipcache, identities, services), the cluster-config enforcer, the heartbeat;
4. one informer per kind feeding the exporter; when the kinds a prefix depends on have listed, that prefix's store
   is marked synced, deletes what a previous run left behind, and writes its synced canary.

Stopping does not revoke the leases: a restarted apiserver takes its keys over (same values, its own leases), so no
reader ever sees a key that still exists go away. Keys of an apiserver that never comes back expire with its leases.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from apiserver.clusterconfig import ClusterConfigEnforcer
from apiserver.exporting import Exporter, StateStores
from apiserver.serviceips import ServiceIPAllocator
from clustermesh.daemon.http import Response
from clustermesh.daemon.tasks import run_together
from clustermesh.model import keys
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.informing import Informer
from clustermesh.resources.store import ResourceStore
from kvstore.backend import Backend
from kvstore.heartbeat import HeartbeatWriter
from kvstore.leases import DEFAULT_TTL, LeaseManager
from kvstore.metrics import KVStoreMetrics
from kvstore.syncing import SyncStore

__all__ = ["Apiserver", "ApiserverConfig"]

log = logging.getLogger(__name__)

EXPORTED_KINDS = ("Namespace", "CiliumNode", "CiliumEndpoint", "CiliumIdentity", "Service", "EndpointSlice")
# Which kinds must have listed before a prefix's initial sync is complete.
SYNC_DEPENDENCIES = {
    keys.NODES_PREFIX: ("CiliumNode",),
    keys.IPCACHE_PREFIX: ("Namespace", "CiliumEndpoint"),
    keys.IDENTITIES_PREFIX: ("Namespace", "CiliumIdentity"),
    keys.SERVICES_PREFIX: ("Namespace", "Service", "EndpointSlice"),
}


@dataclass
class ApiserverConfig:
    cluster: ClusterInfo
    lease_ttl: int = DEFAULT_TTL
    heartbeat_interval: float = 60.0
    #: Cilium's --clustermesh-default-global-namespace: a namespace without the annotation is global.
    default_global_namespace: bool = True
    #: Cilium's --k8s-service-proxy-name: the services this apiserver exports carry this proxy name ("" : none).
    service_proxy_name: str = ""
    #: where Services get their ClusterIP (None: they come with one, as from a Kubernetes API server)
    service_cidr: str | None = None


@dataclass
class Apiserver:
    """One run of the apiserver over a connected backend and a ResourceStore."""

    config: ApiserverConfig
    backend: Backend
    resources: ResourceStore
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        cluster = self.config.cluster
        self.kvmetrics = KVStoreMetrics(self.registry, cilium_prefix="cilium_clustermesh_apiserver_kvstore",
                                        source_cluster=cluster.name)  # fmt: skip
        self.leases = LeaseManager(self.backend, ttl=self.config.lease_ttl)

        def store(prefix: str, key_prefix: str) -> SyncStore:
            return SyncStore(
                self.backend,
                prefix=key_prefix,
                synced_key=keys.synced_key(cluster.name, prefix),
                leases=self.leases,
                name=prefix.rsplit("/", 2)[-2],
                metrics=self.kvmetrics,
            )

        self.stores = StateStores(
            nodes=store(keys.NODES_PREFIX, keys.nodes_key_prefix(cluster.name)),
            ipcache=store(keys.IPCACHE_PREFIX, keys.ipcache_key_prefix()),
            identities=store(keys.IDENTITIES_PREFIX, keys.identities_key_prefix()),
            services=store(keys.SERVICES_PREFIX, keys.services_key_prefix(cluster.name)),
        )
        self.by_prefix = {
            keys.NODES_PREFIX: self.stores.nodes,
            keys.IPCACHE_PREFIX: self.stores.ipcache,
            keys.IDENTITIES_PREFIX: self.stores.identities,
            keys.SERVICES_PREFIX: self.stores.services,
        }
        self.exporter = Exporter(
            cluster,
            self.stores,
            registry=self.registry,
            default_global_namespace=self.config.default_global_namespace,
            service_proxy_name=self.config.service_proxy_name,
        )
        self.informers: dict[str, Informer] = {
            name: Informer(self.resources, kind_by_name(name), self.exporter) for name in EXPORTED_KINDS
        }
        self.service_ips: ServiceIPAllocator | None = None
        if self.config.service_cidr is not None:
            self.service_ips = ServiceIPAllocator(self.resources, self.config.service_cidr, registry=self.registry)
            self.informers["ServiceIPs"] = Informer(self.resources, kind_by_name("Service"), self.service_ips)
        self.cluster_config = ClusterConfigEnforcer(self.backend, cluster, leases=self.leases)
        self.heartbeat = HeartbeatWriter(self.backend, leases=self.leases, interval=self.config.heartbeat_interval)
        self.started = time.monotonic()
        self.bootstrap = Gauge(
            "apiserver_bootstrap_seconds",
            "Seconds from start until every prefix completed its initial sync",
            namespace="clustermesh",
            registry=self.registry,
        )
        self.ready_gauge = Gauge(
            "apiserver_ready", "1 once every prefix is synced", namespace="clustermesh", registry=self.registry
        )
        self.ready = asyncio.Event()

    def not_ready(self) -> list[str]:
        """Why the apiserver is not ready (empty when it is)."""
        reasons = [f"{prefix} not synced" for prefix, s in self.by_prefix.items() if not s.synced.is_set()]
        if not self.cluster_config.written.is_set():
            reasons.append("cluster-config not written")
        reasons += [f"{name}: {i.last_error}" for name, i in self.informers.items() if i.last_error]
        return reasons

    async def _mark_synced(self, prefix: str) -> None:
        await asyncio.gather(*(self.informers[name].synced.wait() for name in SYNC_DEPENDENCIES[prefix]))
        self.by_prefix[prefix].mark_synced()
        await self.by_prefix[prefix].synced.wait()
        log.info("initial sync of %s done", prefix)

    async def _bootstrap(self) -> None:
        await asyncio.gather(*(self._mark_synced(prefix) for prefix in SYNC_DEPENDENCIES))
        await self.cluster_config.written.wait()
        elapsed = time.monotonic() - self.started
        self.bootstrap.set(elapsed)
        self.ready_gauge.set(1)
        self.ready.set()
        log.info("cluster %s published: every prefix synced in %.2f s", self.config.cluster.name, elapsed)

    async def run(self) -> None:
        """Run until cancelled. Leases are kept (not revoked) when it stops."""
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [
            self.leases.run,
            self.cluster_config.run,
            self.heartbeat.run,
            self._bootstrap,
            *(s.run for s in self.stores.all()),
            *(i.run for i in self.informers.values()),
        ]
        allocator = self.service_ips
        if allocator is not None:
            listed = self.informers["ServiceIPs"].synced
            jobs.append(lambda: allocator.run(listed))
        await run_together([job() for job in jobs])

    # --- HTTP

    def readyz(self) -> Response:
        return readyz_answer(self.not_ready())


def readyz_answer(reasons: list[str]) -> Response:
    """/readyz: 200 "ready", or 503 with one line per reason."""
    if reasons:
        return 503, "text/plain", ("not ready:\n" + "\n".join(f"- {r}" for r in reasons) + "\n").encode()
    return 200, "text/plain", b"ready\n"
