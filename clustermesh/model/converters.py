"""Pure conversions from a cluster's resources to the wire values of `cilium/state/...` (Cilium's converters).

Each function takes Kubernetes-shaped objects and returns what Cilium's clustermesh-apiserver would write, byte for
byte once encoded (`clustermesh.model.wire.encode`), or None when the object is not exported. Nothing here does I/O;
`apiserver.exporting` decides when to call them and what to do with the result. They are in the core model because
agents use them too (a node's own services, before they are in etcd).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from msgspec import UNSET

from clustermesh.model import wire
from clustermesh.model.addresses import canonical_ip
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.kinds import Object
from clustermesh.model.labels import NAMESPACE_LABEL, format_label_string, labels_from_security_map

__all__ = [
    "GLOBAL_NAMESPACE_ANNOTATION",
    "GLOBAL_SERVICE_ANNOTATION",
    "SHARED_SERVICE_ANNOTATION",
    "WIREGUARD_KEY_ANNOTATION",
    "cilium_endpoint_to_ip_pairs",
    "cilium_identity_to_labels",
    "cilium_node_to_node",
    "cluster_config",
    "identity_namespace",
    "is_global_namespace",
    "is_global_service",
    "is_shared_service",
    "service_affinity",
    "service_proxy_name",
    "service_frontends",
    "service_to_cluster_service",
]

GLOBAL_NAMESPACE_ANNOTATION = "clustermesh.cilium.io/global"
GLOBAL_SERVICE_ANNOTATION = "service.cilium.io/global"
GLOBAL_SERVICE_ALIAS = "io.cilium/global-service"
SHARED_SERVICE_ANNOTATION = "service.cilium.io/shared"
SHARED_SERVICE_ALIAS = "io.cilium/shared-service"
WIREGUARD_KEY_ANNOTATION = "network.cilium.io/wg-pub-key"
AFFINITY_ANNOTATION = "service.cilium.io/affinity"
AFFINITY_ALIAS = "io.cilium/service-affinity"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
MESH_CONTROLLER = "endpointslice-mesh-controller.cilium.io"
SOURCE_CUSTOM_RESOURCE = "custom-resource"


def _metadata(obj: Object) -> dict[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _annotation(obj: Object, *names: str) -> str | None:
    annotations = _metadata(obj).get("annotations") or {}
    for name in names:
        if name in annotations:
            return str(annotations[name])
    return None


def cluster_config(cluster: ClusterInfo) -> wire.ClusterConfig:
    return wire.ClusterConfig(
        id=cluster.id,
        capabilities=wire.ClusterConfigCapabilities(
            syncedCanaries=True,
            maxConnectedClusters=cluster.max_connected_clusters,
            serviceExportsEnabled=False,
        ),
    )


# --- nodes


def _split_cidrs(cidrs: Iterable[str]) -> tuple[list[wire.IPNet], list[wire.IPNet]]:
    v4: list[wire.IPNet] = []
    v6: list[wire.IPNet] = []
    for cidr in cidrs:
        net = wire.ip_net(cidr)
        (v4 if ipaddress.ip_network(cidr, strict=False).version == 4 else v6).append(net)
    return v4, v6


def cilium_node_to_node(obj: Object, cluster: ClusterInfo) -> wire.Node:
    metadata = _metadata(obj)
    spec = obj.get("spec") or {}
    ipam = spec.get("ipam") or {}
    cidrs = list(ipam.get("podCIDRs") or [])
    for pool in (ipam.get("pools") or {}).get("allocated") or []:
        cidrs.extend(pool.get("cidrs") or [])
    v4, v6 = _split_cidrs(cidrs)
    health = spec.get("health") or {}
    ingress = spec.get("ingress") or {}
    annotations = metadata.get("annotations")
    labels = metadata.get("labels")
    return wire.Node(
        Name=str(metadata["name"]),
        Cluster=cluster.name,
        IPAddresses=[wire.Address(Type=str(a["type"]), IP=str(a["ip"])) for a in spec.get("addresses") or []] or None,
        IPv4AllocCIDR=v4[0] if v4 else None,
        IPv4SecondaryAllocCIDRs=v4[1:] or None,
        IPv6AllocCIDR=v6[0] if v6 else None,
        IPv6SecondaryAllocCIDRs=v6[1:] or None,
        IPv4HealthIP=str(health.get("ipv4") or ""),
        IPv6HealthIP=str(health.get("ipv6") or ""),
        IPv4IngressIP=str(ingress.get("ipv4") or ""),
        IPv6IngressIP=str(ingress.get("ipv6") or ""),
        ClusterID=cluster.id,
        Source=SOURCE_CUSTOM_RESOURCE,
        EncryptionKey=int((spec.get("encryption") or {}).get("key") or 0),
        Labels=dict(labels) if isinstance(labels, dict) else None,
        Annotations=dict(annotations) if isinstance(annotations, dict) else None,
        NodeIdentity=int(spec.get("nodeIdentity") or 0),
        WireguardPubKey=str((annotations or {}).get(WIREGUARD_KEY_ANNOTATION, "")),
        BootID=str(spec.get("bootid") or ""),
    )


# --- endpoints


def cilium_endpoint_to_ip_pairs(obj: Object) -> list[wire.IPIdentityPair]:
    """One ipcache entry per IPv4 and IPv6 address of the endpoint."""
    metadata = _metadata(obj)
    status = obj.get("status") or {}
    networking = status.get("networking") or {}
    identity = (status.get("identity") or {}).get("id") or 0
    pairs = []
    for addressing in networking.get("addressing") or []:
        for family in ("ipv4", "ipv6"):
            ip = addressing.get(family)
            if not ip:
                continue
            pairs.append(
                wire.make_ip_pair(
                    ip=canonical_ip(str(ip)),
                    host_ip=str(networking.get("node") or ""),
                    identity=int(identity),
                    encryption_key=int((status.get("encryption") or {}).get("key") or 0),
                    namespace=str(metadata.get("namespace") or ""),
                    pod_name=str(metadata.get("name") or ""),
                    service_account=str(status.get("service-account") or ""),
                )
            )
    return pairs


# --- identities


def cilium_identity_to_labels(obj: Object) -> str | None:
    """The label string of an identity, or None if it has no security labels (Cilium ignores those)."""
    security_labels = obj.get("security-labels") or {}
    if not security_labels:
        return None
    return format_label_string(labels_from_security_map(security_labels))


def identity_namespace(obj: Object) -> str | None:
    """The namespace an identity belongs to: its `k8s:io.kubernetes.pod.namespace` security label."""
    security_labels = obj.get("security-labels") or {}
    for label in labels_from_security_map(security_labels):
        if label.key == NAMESPACE_LABEL:
            return label.value
    return None


# --- namespaces and services


def is_global_namespace(namespace: Object | None, *, default: bool = True) -> bool:
    """`clustermesh.cilium.io/global`, else `default` (also when the Namespace object does not exist)."""
    value = _annotation(namespace, GLOBAL_NAMESPACE_ANNOTATION) if namespace is not None else None
    return default if value is None else value.lower() == "true"


def service_proxy_name(service: Object) -> str:
    """The `service.kubernetes.io/service-proxy-name` label: which proxy handles the service ("" : the default)."""
    labels = _metadata(service).get("labels") or {}
    value = labels.get(SERVICE_PROXY_NAME_LABEL)
    return str(value) if value else ""


def is_global_service(service: Object) -> bool:
    value = _annotation(service, GLOBAL_SERVICE_ANNOTATION, GLOBAL_SERVICE_ALIAS)
    return value is not None and value.lower() == "true"


def service_affinity(service: Object) -> str:
    """`local`, `remote`, or "" (none: every cluster's backends), from the local Service's annotation."""
    return (_annotation(service, AFFINITY_ANNOTATION, AFFINITY_ALIAS) or "").lower()


def is_shared_service(service: Object) -> bool:
    """Shared defaults to true for a global service; a service that is not global is never shared."""
    if not is_global_service(service):
        return False
    value = _annotation(service, SHARED_SERVICE_ANNOTATION, SHARED_SERVICE_ALIAS)
    return True if value is None else value.lower() == "true"


def _is_headless(service: Object) -> bool:
    spec = service.get("spec") or {}
    labels = _metadata(service).get("labels") or {}
    return HEADLESS_LABEL in labels or str(spec.get("clusterIP") or "").lower() == "none"


def _port_configuration(ports: Iterable[Mapping[str, Any]]) -> dict[str, wire.L4Addr | None]:
    config: dict[str, wire.L4Addr | None] = {}
    for port in ports:
        number = port.get("port")
        protocol = str(port.get("protocol") or "TCP")
        if number is None or protocol not in ("TCP", "UDP", "SCTP"):
            continue
        config[str(port.get("name") or "")] = wire.L4Addr(Protocol=protocol, Port=int(number))
    return config


def _ready_or_serving(endpoint: Mapping[str, Any]) -> bool:
    conditions = endpoint.get("conditions") or {}
    ready = conditions.get("ready")
    serving = conditions.get("serving")
    return ready is not False or serving is not False  # an unset condition counts as true


def slice_belongs_to(endpoint_slice: Object, namespace: str, name: str) -> bool:
    metadata = _metadata(endpoint_slice)
    labels = metadata.get("labels") or {}
    return (
        metadata.get("namespace") == namespace
        and labels.get(SERVICE_NAME_LABEL) == name
        and labels.get("endpointslice.kubernetes.io/managed-by") != MESH_CONTROLLER
    )


def service_frontends(service: Object) -> dict[str, dict[str, wire.L4Addr | None]]:
    """ClusterIP -> port name -> protocol and port, for a service that is not headless."""
    if _is_headless(service):
        return {}
    spec = service.get("spec") or {}
    port_config = _port_configuration(spec.get("ports") or [])
    return {
        str(ip): port_config
        for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
        if ip and str(ip).lower() != "none"
    }


def service_to_cluster_service(
    service: Object, endpoint_slices: Iterable[Object], cluster: ClusterInfo
) -> wire.ClusterService | None:
    """The ClusterService a global, shared service exports, with the backends of its EndpointSlices; None when
    the service is not exported."""
    if not is_shared_service(service):
        return None
    metadata = _metadata(service)
    spec = service.get("spec") or {}
    frontends = service_frontends(service)
    backends: dict[str, dict[str, wire.L4Addr | None]] = {}
    hostnames: dict[str, str] = {}
    zones: dict[str, wire.BackendZone] = {}
    for endpoint_slice in endpoint_slices:
        if endpoint_slice.get("addressType") not in ("IPv4", "IPv6"):
            continue
        ports = _port_configuration(endpoint_slice.get("ports") or [])
        for endpoint in endpoint_slice.get("endpoints") or []:
            if not _ready_or_serving(endpoint):
                continue
            for address in endpoint.get("addresses") or []:
                ip = canonical_ip(str(address))
                backends[ip] = dict(ports)
                if endpoint.get("hostname"):
                    hostnames[ip] = str(endpoint["hostname"])
                if endpoint.get("zone"):
                    for_zones = (endpoint.get("hints") or {}).get("forZones") or []
                    zones[ip] = wire.BackendZone(
                        zone=str(endpoint["zone"]),
                        forZones=[wire.ForZone(name=str(zone["name"])) for zone in for_zones],
                    )
    return wire.ClusterService(
        cluster=cluster.name,
        namespace=str(metadata["namespace"]),
        name=str(metadata["name"]),
        frontends=frontends,
        backends=backends,
        hostnames=hostnames or UNSET,
        zones=zones or UNSET,
        labels=dict(metadata.get("labels") or {}),
        selector=dict(spec.get("selector") or {}),
        includeExternal=True,
        shared=True,
        clusterID=cluster.id,
    )
