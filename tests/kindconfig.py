"""kind's cluster config (kind.x-k8s.io/v1alpha4), checked as kind itself loads it, with no kind and no Docker.

The field sets are those of kind's Go types (`sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go`); decoding is
strict, as kind's loader is (yaml.v3 with KnownFields: an unknown field is an error); then the rules of kind's
`validate.go`: a cluster name of `[a-z0-9.-]`, an API server port in -1..65535, an IP family of ipv4/ipv6/dual
with one pod and one service subnet of each family it names, a kube-proxy mode of iptables/ipvs/nftables/none, at
least one control-plane node, roles control-plane/worker, and no host port mapped twice. Every problem is returned,
each naming its field.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

__all__ = ["validate_kind_config"]

CLUSTER_FIELDS = {
    "kind": str, "apiVersion": str, "name": str, "nodes": list, "networking": dict, "featureGates": dict,
    "runtimeConfig": dict, "kubeadmConfigPatches": list, "kubeadmConfigPatchesJSON6902": list,
    "containerdConfigPatches": list, "containerdConfigPatchesJSON6902": list,
}  # fmt: skip
NODE_FIELDS = {
    "role": str, "image": str, "labels": dict, "extraMounts": list, "extraPortMappings": list, "gpus": str,
    "kubeadmConfigPatches": list, "kubeadmConfigPatchesJSON6902": list,
}  # fmt: skip
NETWORKING_FIELDS = {
    "ipFamily": str, "apiServerPort": int, "apiServerAddress": str, "podSubnet": str, "serviceSubnet": str,
    "disableDefaultCNI": bool, "kubeProxyMode": str, "dnsSearch": list,
}  # fmt: skip
MOUNT_FIELDS = {"containerPath": str, "hostPath": str, "readOnly": bool, "selinuxRelabel": bool, "propagation": str}
PORT_FIELDS = {"containerPort": int, "hostPort": int, "listenAddress": str, "protocol": str}
PATCH_FIELDS = {"group": str, "version": str, "kind": str, "patch": str}

ROLES = {"control-plane", "worker"}
FAMILIES = {"ipv4", "ipv6", "dual"}
PROXY_MODES = {"iptables", "ipvs", "nftables", "none"}
PROPAGATIONS = {"None", "HostToContainer", "Bidirectional"}
PROTOCOLS = {"TCP", "UDP", "SCTP"}
NAME = re.compile(r"^[a-z0-9.-]+$")


def _fields(value: Any, fields: dict[str, type], where: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
        return {}
    for key, item in value.items():
        expected = fields.get(key)
        if expected is None:
            problems.append(f"{where}.{key}: unknown field (kind decodes strictly)")
        elif not isinstance(item, expected) or (expected is int and isinstance(item, bool)):
            problems.append(f"{where}.{key}: expected {expected.__name__}, got {type(item).__name__}")
    return value


def _subnets(text: str, where: str, family: str, problems: list[str]) -> None:
    versions = []
    for part in (p.strip() for p in text.split(",")):
        try:
            versions.append(ipaddress.ip_network(part, strict=False).version)
        except ValueError:
            problems.append(f"{where}: {part!r} is not a CIDR")
            return
    wanted = {"ipv4": [4], "ipv6": [6], "dual": [4, 6]}[family]
    if sorted(versions) != wanted:
        problems.append(f"{where}: {text!r} does not match ipFamily {family} (one subnet of each family it names)")


def validate_kind_config(document: Any) -> list[str]:
    """Every problem kind would report loading this config; empty when it loads."""
    problems: list[str] = []
    cluster = _fields(document, CLUSTER_FIELDS, "Cluster", problems)
    if cluster.get("kind") != "Cluster" or cluster.get("apiVersion") != "kind.x-k8s.io/v1alpha4":
        problems.append("kind/apiVersion: expected Cluster, kind.x-k8s.io/v1alpha4")
    name = cluster.get("name")
    if isinstance(name, str) and not NAME.match(name):
        problems.append(f"name: {name!r} must match {NAME.pattern}")
    networking = _fields(cluster.get("networking", {}), NETWORKING_FIELDS, "networking", problems)
    family = networking.get("ipFamily", "ipv4")
    if family not in FAMILIES:
        problems.append(f"networking.ipFamily: {family!r} is not one of {sorted(FAMILIES)}")
        family = "ipv4"
    port = networking.get("apiServerPort", 0)
    if isinstance(port, int) and not -1 <= port <= 65535:
        problems.append(f"networking.apiServerPort: {port} is out of -1..65535")
    mode = networking.get("kubeProxyMode", "iptables")
    if mode not in PROXY_MODES:
        problems.append(f"networking.kubeProxyMode: {mode!r} is not one of {sorted(PROXY_MODES)}")
    for key in ("podSubnet", "serviceSubnet"):
        if isinstance(networking.get(key), str):
            _subnets(networking[key], f"networking.{key}", family, problems)
    nodes = cluster.get("nodes") or [{"role": "control-plane"}]
    roles = []
    host_ports: set[tuple[str, int, str]] = set()
    for index, raw in enumerate(nodes if isinstance(nodes, list) else []):
        where = f"nodes[{index}]"
        node = _fields(raw, NODE_FIELDS, where, problems)
        role = node.get("role", "control-plane")
        roles.append(role)
        if role not in ROLES:
            problems.append(f"{where}.role: {role!r} is not one of {sorted(ROLES)}")
        for number, mount in enumerate(node.get("extraMounts") or []):
            found = _fields(mount, MOUNT_FIELDS, f"{where}.extraMounts[{number}]", problems)
            if found.get("propagation", "None") not in PROPAGATIONS:
                problems.append(f"{where}.extraMounts[{number}].propagation: {found['propagation']!r}")
        for number, mapping in enumerate(node.get("extraPortMappings") or []):
            found = _fields(mapping, PORT_FIELDS, f"{where}.extraPortMappings[{number}]", problems)
            protocol = found.get("protocol", "TCP")
            if protocol not in PROTOCOLS:
                problems.append(f"{where}.extraPortMappings[{number}].protocol: {protocol!r}")
            host_port = found.get("hostPort", 0)
            if host_port:
                address = found.get("listenAddress", "0.0.0.0")
                clash = {(a, p, q) for a, p, q in host_ports if p == host_port and q == protocol
                         and (a == address or "0.0.0.0" in (a, address))}  # fmt: skip
                if clash:
                    problems.append(f"{where}.extraPortMappings[{number}]: host port {host_port}/{protocol} twice")
                host_ports.add((address, host_port, protocol))
        for number, patch in enumerate(node.get("kubeadmConfigPatchesJSON6902") or []):
            _fields(patch, PATCH_FIELDS, f"{where}.kubeadmConfigPatchesJSON6902[{number}]", problems)
    if "control-plane" not in roles:
        problems.append("nodes: at least one control-plane node is needed")
    for number, patch in enumerate(cluster.get("kubeadmConfigPatchesJSON6902") or []):
        _fields(patch, PATCH_FIELDS, f"kubeadmConfigPatchesJSON6902[{number}]", problems)
    return problems
