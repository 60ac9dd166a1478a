"""Which backends a Service's frontends load-balance to: the cluster's own, and with Cilium's annotations those of
the other clusters, as Cilium selects them.

A frontend is the Service's ClusterIP with one of its ports. Its local backends come from the Service's
EndpointSlices (the port of the same name); an endpoint is *active* when ready (an unset condition counts as true),
*terminating* when it is terminating but still serving, and left out otherwise. A global Service (its
`service.cilium.io/global`) also gets the backends of every other cluster that exports a Service of the same
namespace and name (shared), matched by port name, all active (Cilium's importer marks them so). Then the affinity
(`service.cilium.io/affinity`, Cilium's `ClusterMeshSelectBackends`):

    unset or none   local and remote
    local           local always; remote too when no local backend is active
    remote          remote always; local too when there is no remote backend

An unknown value counts as none (cilium#46623: Cilium 1.18 dropped every remote backend for `none`). New connections
go to the active backends selected, or, when none is active, to the terminating ones that still serve. Pure: the
agent (`agent.services`) turns the result into the load balancer's maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from clustermesh.model import converters, wire
from clustermesh.model.addresses import canonical_ip
from clustermesh.model.kinds import Object
from clustermesh.model.serviceips import cluster_ip

__all__ = [
    "ACTIVE",
    "AFFINITIES",
    "TERMINATING",
    "Backend",
    "Frontend",
    "FrontendPlan",
    "plan_service",
]

ACTIVE, TERMINATING = "active", "terminating"
AFFINITIES = ("", "none", "local", "remote")


@dataclass(frozen=True, order=True)
class Frontend:
    ip: str
    port: int
    protocol: str  # TCP, UDP
    port_name: str = ""

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class Backend:
    cluster: str
    ip: str
    port: int
    protocol: str
    state: str = ACTIVE

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class FrontendPlan:
    """One frontend: every backend known for it, and those new connections go to."""

    service: str  # namespace/name
    frontend: Frontend
    backends: tuple[Backend, ...]
    used: tuple[Backend, ...]
    affinity: str
    is_global: bool


def _local_backends(slices: Iterable[Object], port_name: str, protocol: str, cluster: str) -> list[Backend]:
    found: dict[str, Backend] = {}
    for endpoint_slice in slices:
        if endpoint_slice.get("addressType", "IPv4") != "IPv4":
            continue
        port = next((p for p in endpoint_slice.get("ports") or []
                     if str(p.get("name") or "") == port_name and str(p.get("protocol") or "TCP") == protocol),
                    None)  # fmt: skip
        if port is None or port.get("port") is None:
            continue
        for endpoint in endpoint_slice.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready") is not False
            serving = conditions.get("serving", conditions.get("ready")) is not False
            terminating = conditions.get("terminating") is True
            if ready and not terminating:
                state = ACTIVE
            elif terminating and serving:
                state = TERMINATING
            else:
                continue  # not ready: no connection goes there
            for address in endpoint.get("addresses") or []:
                try:
                    ip = canonical_ip(str(address))
                except ValueError:
                    continue
                if ":" in ip:
                    continue  # the datapath is IPv4
                found[ip] = Backend(cluster, ip, int(port["port"]), protocol, state)
    return sorted(found.values())


def _remote_backends(
    exports: Mapping[str, wire.ClusterService], local: str, port_name: str, protocol: str
) -> list[Backend]:
    found = []
    for cluster, export in sorted(exports.items()):
        if cluster == local or not export.shared:
            continue
        for ip, ports in sorted((export.backends or {}).items()):
            port = (ports or {}).get(port_name)
            if port is None or port.Protocol != protocol or ":" in ip:
                continue
            found.append(Backend(cluster, ip, int(port.Port), protocol, ACTIVE))
    return found


def _select(local: list[Backend], remote: list[Backend], affinity: str, is_global: bool) -> list[Backend]:
    if not is_global:
        return local
    local_active = [b for b in local if b.state == ACTIVE]
    if affinity == "local":
        return local + (remote if not local_active and remote else [])
    if affinity == "remote":
        return (local if not remote and local else []) + remote
    return local + remote


def _for_new_connections(selected: list[Backend]) -> tuple[Backend, ...]:
    active = [b for b in selected if b.state == ACTIVE]
    return tuple(active or [b for b in selected if b.state == TERMINATING])


def plan_service(
    service: Object, slices: Iterable[Object], exports: Mapping[str, wire.ClusterService], local_cluster: str
) -> list[FrontendPlan]:
    """The frontends of one Service of the local cluster (none without a ClusterIP, or headless), each with its
    backends; `exports` are the ClusterServices of the same namespace/name, by cluster."""
    ip = cluster_ip(service)
    if ip is None or ip.lower() == "none" or ":" in ip:
        return []
    metadata = service.get("metadata") or {}
    name = f"{metadata.get('namespace') or 'default'}/{metadata.get('name', '')}"
    is_global = converters.is_global_service(service)
    affinity = converters.service_affinity(service) if is_global else ""
    if affinity not in AFFINITIES:
        affinity = "none"  # as Cilium after cilium#46635: an unknown value is none
    slices = list(slices)
    plans = []
    for port in (service.get("spec") or {}).get("ports") or []:
        protocol = str(port.get("protocol") or "TCP")
        if protocol not in ("TCP", "UDP") or port.get("port") is None:
            continue
        port_name = str(port.get("name") or "")
        local = _local_backends(slices, port_name, protocol, local_cluster)
        remote = _remote_backends(exports, local_cluster, port_name, protocol) if is_global else []
        selected = _select(local, remote, affinity, is_global)
        frontend = Frontend(canonical_ip(ip), int(port["port"]), protocol, port_name)
        plans.append(FrontendPlan(name, frontend, tuple(local + remote), _for_new_connections(selected),
                                  affinity or "none", is_global))  # fmt: skip
    return plans
