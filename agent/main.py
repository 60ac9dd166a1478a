"""`clustermesh-agent`: one per node. Publishes the node, reads every cluster of the mesh, serves its status.

    clustermesh-agent --cluster-name c1 --cluster-id 1 --node-name n1 --node-ip 192.168.1.11 --pod-cidr 10.1.1.0/24 \\
        --kvstore-endpoints https://192.168.1.2:2379 --kvstore-ca ca.crt --kvstore-cert agent-c1.crt \\
        --kvstore-key agent-c1.key --clustermesh-config /var/lib/clustermesh/remotes \\
        --api-socket /run/clustermesh/agent.sock

It runs, side by side: the mesh (the local cluster and every remote in the config directory, into the merged view),
the publisher of its own CiliumNode, the identity allocator and collector, the renderer of ClusterMeshRemote objects
into the config directory, the local API on a unix socket and the metrics endpoint. SIGTERM stops it; nothing it
published is withdrawn (a restarted agent takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from prometheus_client import CollectorRegistry

from agent import api
from agent.datapath.drivers import NativeDriver, VxlanDriver, WireguardDriver
from agent.datapath.ipsec import IpsecDriver
from agent.datapath.netlink import DatapathError
from agent.datapath.pods import PodNetwork
from agent.datapath.routing import Driver, Router
from agent.dns import DnsServer
from agent.endpoints import EndpointKeeper, EndpointManager
from agent.enforcement import POLICY_KINDS, Enforcer
from agent.flows import FlowLog
from agent.health import HEALTH_PORT, HealthProber
from agent.identities import IdentityAllocator, IdentityCollector
from agent.mesh import Mesh
from agent.metrics import CiliumClusterMeshMetrics, DatapathCounters, PolicyProblems
from agent.namespaces import NamespaceLabels
from agent.publishing import NodePublisher, NodeSpec
from agent.rendering import RemoteRenderer
from agent.services import LoadBalancer
from agent.view import MergedView
from agent.wgkeys import load_or_create
from bpf.events import RingReader, follow_records
from bpf.loader import BuildError, Loaded, LoadError, build, cgroup2_mount
from clustermesh.daemon.http import HttpEndpoint, metrics_route, parse_address
from clustermesh.daemon.tasks import cancel_and_wait, run_together
from clustermesh.daemon.tls import ServerTlsFiles
from clustermesh.model import converters
from clustermesh.model.api import DatapathStatus
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import InvalidValue, ModelError
from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.resources.informing import Informer
from clustermesh.resources.kubernetes import KubernetesStore
from clustermesh.resources.opening import open_resource_store
from clustermesh.resources.store import ResourceError, ResourceStore
from kvstore import errors, etcd
from kvstore.config import EtcdConfig
from kvstore.credentials import follow_credentials
from kvstore.reconnecting import connect_until_up

__all__ = ["Agent", "AgentSettings", "main"]

log = logging.getLogger("clustermesh.agent")


@dataclass
class AgentSettings:
    cluster: ClusterInfo
    node_name: str
    etcd: EtcdConfig
    node_ips: list[str] = field(default_factory=list)
    pod_cidrs: list[str] = field(default_factory=list)
    health_ip: str = ""
    cilium_internal_ip: str = ""
    config_dir: Path | None = None
    cache_ttl: float = 0.0
    heartbeat_max_age: float = 120.0
    api_socket: Path | None = None
    metrics_address: tuple[str, int] | None = None
    state_dir: Path = Path("/var/lib/clustermesh")
    boot_id: str = ""
    source: str = "standalone"
    kubeconfig: str | None = None
    kube_context: str | None = None
    identity_gc_grace: float = 900.0
    scan_interval: float = 1.0
    datapath: str = "none"
    wireguard_interface: str = "cm_wg0"
    wireguard_port: int = 51871
    ipsec_cert: Path | None = None
    ipsec_key: Path | None = None
    ipsec_ca: Path | None = None
    pod_supernets: list[str] = field(default_factory=lambda: ["10.0.0.0/8"])
    enable_policy: bool = True  # with a datapath: enforce network policies in eBPF
    policy_default_local_cluster: bool = True
    bpf_pin_dir: Path | None = None  # default: /sys/fs/bpf/clustermesh/<cluster>-<node>
    cgroup_root: Path | None = None  # where this node's pods' processes live (default: the cgroup v2 mount)
    dns: bool = True  # answer DNS for the node's pods on its router address
    hubble_address: tuple[str, int] | None = None  # the flow service, for relays (mutual TLS)
    hubble_tls: ServerTlsFiles | None = None
    health_checking: bool = True  # with a datapath: probe every other node through it
    health_port: int = HEALTH_PORT


class LocalServices:
    """The local cluster's global Services, for the view: their affinity annotation and frontends."""

    def __init__(self, view: MergedView) -> None:
        self.view = view

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        metadata = obj.get("metadata") or {}
        namespace, name = str(metadata.get("namespace", "default")), str(metadata.get("name", ""))
        if not converters.is_global_service(obj):
            self.view.clear_local_service(namespace, name)
            return
        self.view.set_local_service(
            namespace, name, affinity=converters.service_affinity(obj), frontends=converters.service_frontends(obj)
        )

    def on_delete(self, kind: Kind, obj: Object) -> None:
        metadata = obj.get("metadata") or {}
        self.view.clear_local_service(str(metadata.get("namespace", "default")), str(metadata.get("name", "")))


class Agent:
    def __init__(self, settings: AgentSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.mesh = Mesh(
            settings.cluster,
            settings.etcd,
            settings.config_dir,
            node_name=settings.node_name,
            cache_ttl=settings.cache_ttl,
            heartbeat_max_age=settings.heartbeat_max_age,
            scan_interval=settings.scan_interval,
            registry=self.registry,
            pod_supernets=settings.pod_supernets,
            own_node=converters.cilium_node_to_node(self.node_spec_without_key(), settings.cluster),
        )
        self.registry.register(CiliumClusterMeshMetrics(
            settings.cluster.name, settings.node_name, lambda: list(self.mesh.remotes.values()),
            lambda cluster: {str(k): n for k, n in self.mesh.view.counts.get(cluster, {}).items()}))  # fmt: skip
        self.keys = load_or_create(settings.state_dir / "wireguard.key")
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.endpoints: EndpointManager | None = None
        self.store: ResourceStore | None = None
        self.allocator: IdentityAllocator | None = None
        self.driver = make_driver(settings, self.keys_path) if settings.datapath != "none" else None
        self.router = (
            Router(self.mesh.view, self.driver, f"{settings.cluster.name}/{settings.node_name}")
            if self.driver is not None
            else None
        )
        self.pods = (
            PodNetwork(
                pod_cidr=settings.pod_cidrs[0],
                router_ip=router_ip(settings.pod_cidrs[0]),
                supernets=settings.pod_supernets,
                state_dir=settings.state_dir,
                mtu=self.driver.mtu,
            )
            if self.driver is not None and settings.pod_cidrs
            else None
        )
        self.health = (
            HealthProber(
                self.mesh.view,
                self.node_key,
                self.pods.router_ip,
                port=settings.health_port,
                on_change=self.mesh.changed.set,
            )
            if self.pods is not None and settings.health_checking
            else None
        )
        self.loaded: Loaded | None = None
        self.enforcer: Enforcer | None = None
        self.flows: FlowLog | None = None
        self.policy_error = ""
        self.policies_synced = asyncio.Event()
        self.lb: LoadBalancer | None = None
        self.lb_error = ""
        self.dns: DnsServer | None = None
        if self.pods is not None and settings.enable_policy:
            self._load_datapath()

    @property
    def node_key(self) -> str:
        return f"{self.settings.cluster.name}/{self.settings.node_name}"

    @property
    def pin_dir(self) -> Path:
        default = Path("/sys/fs/bpf/clustermesh") / f"{self.settings.cluster.name}-{self.settings.node_name}"
        return self.settings.bpf_pin_dir or default

    def _load_datapath(self) -> None:
        """Build (cached) and load the eBPF datapath; without it the node runs, says why, and is not ready."""
        assert self.pods is not None
        try:
            self.loaded = Loaded.load(build(), self.pin_dir)
        except (BuildError, LoadError, OSError) as exc:
            self.policy_error = f"network policies cannot be enforced on this node: {exc}"
            log.error("%s", self.policy_error)
            return
        settings = self.settings
        self.enforcer = Enforcer(self.mesh.view, self.loaded, settings.cluster.name, self.node_key,
                                 host_addresses=[*settings.node_ips, self.pods.router_ip],
                                 default_local_cluster=settings.policy_default_local_cluster,
                                 state_file=settings.state_dir / "enforced.json", registry=self.registry,
                                 synced=self.policies_synced, skipped=self._skipped_objects)  # fmt: skip
        self.registry.register(DatapathCounters(self.loaded.counters))
        self.registry.register(PolicyProblems(self.enforcer.not_enforced))
        log.info("eBPF datapath loaded: %s", self.loaded.object_dir)
        self.lb = LoadBalancer(self.mesh.view, self.loaded, settings.cluster.name, settings.cluster.id)
        self.flows = FlowLog(self.mesh.view, self.node_key, local=self._local_pod, registry=self.registry,
                             pod_of_netns=self._pod_of_netns, services=self.lb)  # fmt: skip
        try:
            cgroup = settings.cgroup_root or cgroup2_mount()
            self.loaded.attach_cgroup(cgroup)
            log.info("socket load balancer on cgroup %s", cgroup)
        except (LoadError, OSError) as exc:
            self.lb_error = f"services are not load-balanced on this node: {exc}"
            log.error("%s", self.lb_error)

    def _skipped_objects(self) -> dict[str, str]:
        return dict(getattr(self.store, "skipped", None) or {})

    async def _pod_labels(self, namespace: str, name: str) -> dict[str, str]:
        store = self.store
        return await store.pod_labels(namespace, name) if isinstance(store, KubernetesStore) else {}

    def _pod_of_netns(self, cookie: int) -> tuple[str, int] | None:
        endpoint = self.enforcer.endpoint_by_netns(cookie) if self.enforcer is not None else None
        return (endpoint.ip, endpoint.identity) if endpoint is not None else None

    def _local_pod(self, ip: str) -> tuple[str, str] | None:
        endpoint = self.enforcer.endpoint_by_ip(ip) if self.enforcer is not None else None
        return (endpoint.namespace, endpoint.name) if endpoint is not None else None

    @property
    def keys_path(self) -> Path:
        return self.settings.state_dir / "wireguard.key"

    def datapath_status(self) -> DatapathStatus:
        if self.router is None or self.driver is None:
            return DatapathStatus()
        details = {key: value for key, value in self.driver.describe().items() if key not in ("driver", "peers")}
        details["policy"] = {
            "enforced": self.enforcer is not None,
            "error": self.policy_error or None,
            "endpoints": len(self.enforcer.endpoints) if self.enforcer is not None else 0,
            "not_enforced": self.enforcer.not_enforced() if self.enforcer is not None else {},
            "map_writes": dataclasses.asdict(self.enforcer.counts) if self.enforcer is not None else {},
        }
        details["services"] = {
            "load_balanced": self.lb is not None and not self.lb_error,
            "error": self.lb_error or None,
            "frontends": sum(len(plans) for plans in self.lb.plans.values()) if self.lb is not None else 0,
            "map_writes": dataclasses.asdict(self.lb.counts) if self.lb is not None else {},
        }
        return DatapathStatus(
            driver=self.driver.name,
            peers=sorted(self.router.applied),
            applies=self.router.applies,
            last_error=self.router.last_error or None,
            details=details,
        )

    def node_spec(self) -> NodeSpec:
        return NodeSpec(
            name=self.settings.node_name,
            internal_ips=self.settings.node_ips,
            pod_cidrs=self.settings.pod_cidrs,
            cilium_internal_ip=self.settings.cilium_internal_ip,
            health_ipv4=self.settings.health_ip,
            wireguard_public_key=self.keys.public_base64,
            boot_id=self.settings.boot_id,
        )

    def node_spec_without_key(self) -> Object:
        """This node's CiliumNode as its settings describe it (before its WireGuard key is read)."""
        settings = self.settings
        spec = NodeSpec(
            name=settings.node_name,
            internal_ips=settings.node_ips,
            pod_cidrs=settings.pod_cidrs,
            cilium_internal_ip=settings.cilium_internal_ip,
            health_ipv4=settings.health_ip,
        )
        return spec.object()

    async def _local_jobs(self) -> None:
        """Everything that needs the local ResourceStore, once its etcd answers."""
        config = self.settings.etcd

        def failed(exc: errors.KVStoreError) -> None:
            log.warning("cannot connect to the local etcd at %s: %s", config.describe(), exc)

        backend = await connect_until_up(lambda: etcd.connect(config), on_failure=failed)
        store: ResourceStore | None = None
        try:
            self.store = store = open_resource_store(
                self.settings.source, backend, self.settings.kubeconfig, self.settings.kube_context
            )
            namespaces = NamespaceLabels()
            self.allocator = IdentityAllocator(store, self.settings.cluster, namespace_labels=namespaces.labels)
            collector = IdentityCollector(store, self.settings.cluster, grace_period=self.settings.identity_gc_grace)
            node_ip = self.settings.node_ips[0] if self.settings.node_ips else ""
            self.endpoints = EndpointManager(store, self.allocator, node_ip=node_ip, pod_cidrs=self.settings.pod_cidrs,
                                             state_file=self.settings.state_dir / "endpoints.json")  # fmt: skip
            jobs: list[Coroutine[Any, Any, None]] = [
                # this connection's certificates rotated in place, as the mesh's sessions take theirs up
                follow_credentials(backend, what=f"the local etcd {config.describe()}"),
                NodePublisher(store, self.node_spec()).run(),
                EndpointKeeper(self.endpoints).run(),
                self.allocator.run(),
                collector.run(),
                Informer(store, kind_by_name("Service"), LocalServices(self.mesh.view)).run(),
                Informer(store, kind_by_name("Namespace"), namespaces).run(),
            ]
            if self.enforcer is not None:
                jobs.append(self._watch_policies(store, self.enforcer))
            if self.lb is not None:
                jobs.append(self._watch_services(store, self.lb))
            if self.settings.config_dir is not None:
                jobs.append(self._render_remotes(store, self.settings.config_dir))
            await run_together(jobs)
        finally:
            if store is not None:
                await store.close()
            await backend.close()

    async def _watch_policies(self, store: ResourceStore, enforcer: Enforcer) -> None:
        """The cluster's policies into the enforcer; once all three kinds are listed, it may enforce."""
        informers = [Informer(store, kind_by_name(kind), enforcer) for kind in POLICY_KINDS]
        tasks = [asyncio.create_task(informer.run(), name=f"policies-{informer.kind.plural}") for informer in informers]
        try:
            await asyncio.gather(*(informer.synced.wait() for informer in informers))
            self.policies_synced.set()
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks)

    async def _watch_services(self, store: ResourceStore, lb: LoadBalancer) -> None:
        """The cluster's Services and EndpointSlices into the load balancer; it writes once both are listed."""
        informers = [Informer(store, kind_by_name(kind), lb) for kind in ("Service", "EndpointSlice")]
        listed = asyncio.Event()
        tasks = [asyncio.create_task(informer.run(), name=f"lb-{informer.kind.plural}") for informer in informers]
        tasks.append(asyncio.create_task(lb.run(listed), name="lb"))
        try:
            await asyncio.gather(*(informer.synced.wait() for informer in informers))
            listed.set()
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks)

    async def _render_remotes(self, store: ResourceStore, directory: Path) -> None:
        renderer = RemoteRenderer(directory, local_cluster=self.settings.cluster.name)
        informer = Informer(store, kind_by_name("ClusterMeshRemote"), renderer)
        task = asyncio.create_task(informer.run())
        try:
            await informer.synced.wait()
            pruned = renderer.prune({name for _, name in informer.cache})
            if pruned:
                log.info("removed the rendered config of peers gone while we were down: %s", ", ".join(pruned))
            await task
        finally:
            await cancel_and_wait([task])

    async def run(self) -> None:
        servers: list[HttpEndpoint] = []
        if self.settings.api_socket is not None:
            routes = api.routes(
                self.mesh,
                lambda: self.endpoints,
                pods=self.pods,
                supernets=self.settings.pod_supernets,
                datapath=self.datapath_status,
                enforcer=lambda: self.enforcer,
                flows=self.flows,
                health=lambda: self.health,
                allocator=lambda: self.allocator,
                lb=lambda: self.lb,
                pod_labels=self._pod_labels if self.settings.source == "kubernetes" else None,
            )
            if self.settings.hubble_address is not None:  # a relay on this host learns the mesh's nodes here
                routes["/v1/peers"] = api.peers_route(self.mesh, self.settings.hubble_address[1])
            servers.append(HttpEndpoint(unix_path=self.settings.api_socket, routes=routes))
        if self.settings.metrics_address is not None:
            host, port = self.settings.metrics_address
            servers.append(HttpEndpoint(host, port, routes={"/metrics": metrics_route(self.registry)}))
        if self.settings.hubble_address is not None:
            host, port = self.settings.hubble_address
            flow_service = {"/v1/flows": api.flows_route(self.flows), "/v1/peers": api.peers_route(self.mesh, port)}
            tls = self.settings.hubble_tls
            servers.append(HttpEndpoint(host, port, routes=flow_service, tls=tls.context if tls else None))
        for server in servers:
            await server.start()
            scheme = "https" if server.tls is not None else "http"
            log.info("listening on %s", f"{scheme}://{server.address}" if server.unix_path is None else server.address)
        jobs = [self.mesh.run(), self._local_jobs()]
        if self.settings.hubble_tls is not None:
            jobs.append(self._follow_tls(self.settings.hubble_tls))
        if self.pods is not None:
            try:
                await self.pods.setup_node()
            except DatapathError as exc:  # the control plane still runs; pods cannot be attached, and say why
                log.error("cannot prepare this node for pods: %s", exc)
        if self.router is not None:
            jobs.append(self.router.run())
        if self.health is not None:
            jobs.append(self.health.run())
        if self.lb is not None and self.pods is not None and self.settings.dns:
            self.dns = DnsServer(self.pods.router_ip, self.lb.resolve, registry=self.registry)
            try:
                await self.dns.start()
            except OSError as exc:
                self.lb_error = f"no DNS for this node's pods on {self.pods.router_ip}:53: {exc}"
                log.error("%s", self.lb_error)
                self.dns = None
        if self.enforcer is not None and self.loaded is not None and self.flows is not None:
            jobs.append(self.enforcer.run())
            jobs.append(self._follow_ring(self.loaded.events_path, self.flows.add))
            jobs.append(self._follow_ring(self.loaded.sock_events_path, self.flows.add_sock))
        try:
            await run_together(jobs)
        finally:
            for server in servers:
                await server.stop()
            if self.dns is not None:
                await self.dns.stop()

    @staticmethod
    async def _follow_tls(tls: ServerTlsFiles) -> None:
        """Rotated flow-service certificates (or CAs added to the bundle) taken up without a restart."""
        while True:
            await asyncio.sleep(1.0)
            if tls.refresh():
                log.info("flow service: new connections use the rotated certificates")

    @staticmethod
    async def _follow_ring(path: Path, add: Callable[[list[bytes]], None]) -> None:
        """A ring buffer's records (the datapath's flows, the socket load balancer's translations) into the flow
        log, as they come."""
        reader = RingReader.pinned(str(path))
        try:
            async for batch in follow_records(reader):
                add(batch)
        finally:
            reader.close()


async def _run_until_signalled(agent: Agent) -> None:
    task = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("stopped")


FROM_NODE = "from-node"


async def pod_cidrs_from_node(
    kubeconfig: str | None, context: str | None, node: str, *, every: float = 2.0
) -> list[str]:
    """This node's pod CIDRs as Kubernetes assigned them (`--pod-cidr from-node`, as the chart runs the agent), waited
    for: a Node gets them from the controller manager a moment after it registers."""
    store = KubernetesStore.from_kubeconfig(kubeconfig, context)
    said = ""
    try:
        while True:
            try:
                cidrs = await store.node_pod_cidrs(node)
                if cidrs:
                    log.info("Node %s: pod CIDRs %s", node, ", ".join(cidrs))
                    return cidrs
                problem = f"Node {node} has no pod CIDR yet (kube-controller-manager --allocate-node-cidrs)"
            except ResourceError as exc:
                problem = str(exc)
            if problem != said:
                log.warning("waiting for this node's pod CIDRs: %s", problem)
                said = problem
            await asyncio.sleep(every)
    finally:
        await store.close()


def router_ip(pod_cidr: str) -> str:
    """The node's own address in its pod CIDR: the first host (pods reach the rest of the mesh through it)."""
    return str(next(ipaddress.ip_network(pod_cidr, strict=False).hosts()))


def make_driver(settings: AgentSettings, key_path: Path) -> Driver:
    if settings.datapath == "native":
        return NativeDriver()
    if not settings.node_ips or not settings.pod_cidrs:
        raise click.UsageError(f"--datapath {settings.datapath} needs --node-ip and --pod-cidr")
    if settings.datapath == "wireguard":
        return WireguardDriver(
            interface=settings.wireguard_interface,
            private_key=key_path,
            port=settings.wireguard_port,
            address=router_ip(settings.pod_cidrs[0]),
        )
    if settings.datapath == "vxlan":
        return VxlanDriver(node_ip=settings.node_ips[0], pod_cidr=settings.pod_cidrs[0])
    if settings.datapath == "ipsec":
        if settings.ipsec_cert is None or settings.ipsec_key is None or settings.ipsec_ca is None:
            raise click.UsageError("--datapath ipsec needs --ipsec-cert, --ipsec-key and --ipsec-ca")
        return IpsecDriver(node_ip=settings.node_ips[0], pod_cidrs=settings.pod_cidrs,
                           run_dir=settings.state_dir / "ipsec", cert=settings.ipsec_cert, key=settings.ipsec_key,
                           ca=settings.ipsec_ca)  # fmt: skip
    raise click.UsageError(f"unknown --datapath {settings.datapath!r}")


def _flow_service(params: dict[str, Any]) -> tuple[tuple[str, int] | None, ServerTlsFiles | None]:
    """The flow service's address and TLS context, or a clear ValueError (it never runs without mutual TLS)."""
    address = params["hubble_listen_address"]
    if not address:
        return None, None
    host, port = parse_address(f"0.0.0.0{address}" if address.startswith(":") else address)
    files = (params["hubble_tls_cert_file"], params["hubble_tls_key_file"])
    if None in files or not params["hubble_tls_client_ca_files"]:
        raise ValueError("--hubble-listen-address needs --hubble-tls-cert-file, --hubble-tls-key-file and "
                         "--hubble-tls-client-ca-files: the flow service speaks mutual TLS only")  # fmt: skip
    cert, key, cas = files[0], files[1], list(params["hubble_tls_client_ca_files"])
    return (host, port), ServerTlsFiles(cert, key, cas)


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--cluster-name", required=True, help="The local cluster's name.")
@click.option("--cluster-id", required=True, type=int, help="The local cluster's ID (1..255, or 1..511).")
@click.option("--max-connected-clusters", default="255", type=click.Choice(["255", "511"]), show_default=True)
@click.option("--node-name", default=socket.gethostname(), show_default=True)
@click.option("--node-ip", "node_ips", multiple=True, help="This node's InternalIP (repeat for IPv6).")
@click.option("--pod-cidr", "pod_cidrs", multiple=True,
              help="This node's pod CIDR (repeat for IPv6); `from-node`: the Node's spec.podCIDRs, read from "
                   "Kubernetes (with --source kubernetes).")  # fmt: skip
@click.option("--health-ip", default="", help="This node's health endpoint IP.")
@click.option("--cilium-internal-ip", default="", help="This node's router IP inside the pod network.")
@click.option("--kvstore-endpoints", required=True, multiple=True, help="The local cluster's etcd, https://HOST:PORT.")
@click.option("--kvstore-ca", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore-cert", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore-key", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--source", type=click.Choice(["standalone", "kubernetes"]), default="standalone", show_default=True)
@click.option("--kubeconfig", default=None)
@click.option("--kube-context", default=None)
@click.option(
    "--clustermesh-config",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The folder of remote cluster configs (Cilium's format, one file per cluster), watched for changes.",
)
@click.option("--clustermesh-cache-ttl", default=0.0, show_default=True,
              help="Seconds a disconnected cluster's services are kept (0: until it comes back).")  # fmt: skip
@click.option("--heartbeat-max-age", default=120.0, show_default=True, hidden=True)
@click.option("--api-socket", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/run/clustermesh/agent.sock"), show_default=True)  # fmt: skip
@click.option("--metrics-address", default=None, help="HOST:PORT for /metrics (port 0 picks one).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/lib/clustermesh"), show_default=True)  # fmt: skip
@click.option("--boot-id", default=None, help="Default: the kernel's boot ID.")
@click.option("--identity-gc-grace", default=900.0, show_default=True,
              help="Seconds an identity no endpoint uses is kept before it is marked for deletion (deleted a "
                   "minute later if still unused).")  # fmt: skip
@click.option(
    "--datapath",
    type=click.Choice(["none", "native", "wireguard", "ipsec", "vxlan"]),
    default="none",
    show_default=True,
    help="How pods of different nodes reach each other; 'none' runs the control plane only.",
)
@click.option("--wireguard-interface", default="cm_wg0", show_default=True,
              help="The WireGuard interface (its control socket is host-wide: unique per host).")  # fmt: skip
@click.option("--wireguard-port", default=51871, show_default=True)
@click.option(
    "--ipsec-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --datapath ipsec: this node's certificate (its SAN holds the node IP, its IKE identity).",
)
@click.option(
    "--ipsec-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --datapath ipsec: the certificate's private key.",
)
@click.option("--ipsec-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --datapath ipsec: the CA (or bundle) that peers' certificates must chain to.")  # fmt: skip
@click.option("--pod-supernet", "pod_supernets", multiple=True, default=["10.0.0.0/8"], show_default=True,
              help="What pods reach through their node (no default route is given to pods).")  # fmt: skip
@click.option("--enable-policy/--disable-policy", default=True, show_default=True,
              help="With a datapath: enforce network policies in eBPF, and tell flows.")  # fmt: skip
@click.option("--policy-default-local-cluster", default=True, show_default=True, type=bool, is_flag=False,
              flag_value=True, help="(Cilium's flag) A policy's peer selector without the cluster label selects "
              "the local cluster only; false: any cluster.")  # fmt: skip
@click.option("--dns/--no-dns", default=True, show_default=True,
              help="With a datapath: answer <svc>.<ns>.svc.cluster.local (and clusterset.local) for the node's pods "
              "on its router address, port 53.")  # fmt: skip
@click.option("--cgroup-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="(Cilium's flag) The cgroup v2 where this node's pods' processes live: the socket load balancer "
              "is attached there (default: the cgroup v2 mount).")  # fmt: skip
@click.option("--bpf-pin-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where this node's eBPF programs and maps are pinned (default "
              "/sys/fs/bpf/clustermesh/<cluster>-<node>).")  # fmt: skip
@click.option("--hubble-listen-address", default="",
              help="(Cilium's flag) HOST:PORT (or :PORT) of the flow service relays read (/v1/flows, /v1/peers), "
              "mutual TLS only; Hubble's port is 4244. Empty: off.")  # fmt: skip
@click.option("--hubble-tls-cert-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The flow service's certificate (its SAN: <node>.<cluster>.hubble-grpc.cilium.io).")  # fmt: skip
@click.option("--hubble-tls-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--hubble-tls-client-ca-files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The CA (repeat for several) a relay's client certificate must chain to.")  # fmt: skip
@click.option("--enable-health-checking/--disable-health-checking", "health_checking", default=True,
              show_default=True, help="(Cilium's flag) With a datapath: probe every other node of the mesh through "
              "it (ICMP to its router address, TCP to its health port); a cluster whose nodes cannot be reached is "
              "not ready.")  # fmt: skip
@click.option(
    "--cluster-health-port",
    "health_port",
    default=HEALTH_PORT,
    show_default=True,
    help="(Cilium's flag) The TCP port every agent's health prober listens on and connects to.",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def main(**params: Any) -> None:
    """Run the node agent: publish this node, read every cluster of the mesh, serve the status."""
    logging.basicConfig(level=params["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cluster = ClusterInfo(params["cluster_name"], params["cluster_id"], int(params["max_connected_clusters"]))
        endpoints = [url for value in params["kvstore_endpoints"] for url in value.split(",") if url]
        config = EtcdConfig(endpoints, params["kvstore_ca"], params["kvstore_cert"], params["kvstore_key"])
        metrics = parse_address(params["metrics_address"]) if params["metrics_address"] else None
        hubble, hubble_tls = _flow_service(params)
    except (ModelError, errors.KVStoreError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    settings = AgentSettings(
        cluster=cluster,
        node_name=params["node_name"],
        etcd=config,
        node_ips=list(params["node_ips"]),
        pod_cidrs=list(params["pod_cidrs"]),
        health_ip=params["health_ip"],
        cilium_internal_ip=params["cilium_internal_ip"],
        config_dir=params["clustermesh_config"],
        cache_ttl=params["clustermesh_cache_ttl"],
        heartbeat_max_age=params["heartbeat_max_age"],
        api_socket=params["api_socket"],
        metrics_address=metrics,
        state_dir=params["state_dir"],
        boot_id=params["boot_id"] if params["boot_id"] is not None else _boot_id(),
        source=params["source"],
        kubeconfig=params["kubeconfig"],
        kube_context=params["kube_context"],
        identity_gc_grace=params["identity_gc_grace"],
        datapath=params["datapath"],
        wireguard_interface=params["wireguard_interface"],
        wireguard_port=params["wireguard_port"],
        ipsec_cert=params["ipsec_cert"],
        ipsec_key=params["ipsec_key"],
        ipsec_ca=params["ipsec_ca"],
        pod_supernets=list(params["pod_supernets"]),
        enable_policy=params["enable_policy"],
        policy_default_local_cluster=params["policy_default_local_cluster"],
        bpf_pin_dir=params["bpf_pin_dir"],
        cgroup_root=params["cgroup_root"],
        dns=params["dns"],
        hubble_address=hubble,
        hubble_tls=hubble_tls,
        health_checking=params["health_checking"],
        health_port=params["health_port"],
    )
    if settings.pod_cidrs == [FROM_NODE]:
        if settings.source != "kubernetes":
            raise click.UsageError("--pod-cidr from-node reads the Node from Kubernetes: it needs --source kubernetes")
        settings = dataclasses.replace(settings, pod_cidrs=asyncio.run(
            pod_cidrs_from_node(settings.kubeconfig, settings.kube_context, settings.node_name)))  # fmt: skip
    try:
        agent = Agent(settings)
    except InvalidValue as exc:  # this node's own CIDRs and addresses, checked as every node's are
        raise click.UsageError(f"this node's --pod-cidr or --node-ip: {exc.reason}") from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(_run_until_signalled(agent))
