"""Validation of Kubernetes-shaped objects on their way into a ResourceStore.

Each kind's schema is checked as far as the mesh reads it (names, label syntax, IP addresses, CIDRs, ports, the
shapes of lists and maps), so that a bad object is refused when it is applied, with a message that names the object
and the field, instead of being skipped later with a log line nobody reads:

    CiliumNode "node-1": spec.addresses[1].ip: "10.0.0" is not an IP address

Unknown fields are kept (Kubernetes objects carry many the mesh does not read).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from clustermesh.model.addresses import ip_version
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Object, kind_by_name
from clustermesh.model.policies import PolicyError, parse_policy

__all__ = ["InvalidObject", "validate_object"]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PROTOCOLS = ("TCP", "UDP", "SCTP")


class InvalidObject(ModelError):
    """An object that breaks its kind's schema; `field` is the path to the culprit."""

    def __init__(self, kind: str, name: str, field: str, reason: str) -> None:
        where = f"{kind} {name!r}" if name else kind or "object"
        super().__init__(f"{where}: {field}: {reason}" if field else f"{where}: {reason}")
        self.kind = kind
        self.name = name
        self.field = field
        self.reason = reason


class _Checker:
    """Walks an object, raising InvalidObject at the first problem with its full path."""

    def __init__(self, obj: Object) -> None:
        self.obj = obj
        metadata = obj.get("metadata")
        self.kind = str(obj.get("kind", ""))
        self.name = str(metadata.get("name", "")) if isinstance(metadata, dict) else ""

    def fail(self, path: str, reason: str) -> None:
        raise InvalidObject(self.kind, self.name, path, reason)

    def mapping(self, value: Any, path: str, *, required: bool = False) -> dict[str, Any]:
        if value is None:
            if required:
                self.fail(path, "is required")
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, not {type(value).__name__}")
        return value  # type: ignore[no-any-return]

    def sequence(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list, not {type(value).__name__}")
        return value  # type: ignore[no-any-return]

    def string(self, value: Any, path: str, *, required: bool = False) -> str:
        if value is None:
            if required:
                self.fail(path, "is required")
            return ""
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {type(value).__name__}")
        return value  # type: ignore[no-any-return]

    def integer(self, value: Any, path: str, *, low: int, high: int, required: bool = False) -> int | None:
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, not {value!r}")
        if not low <= value <= high:
            self.fail(path, f"{value} is out of range {low}..{high}")
        return int(value)

    def boolean(self, value: Any, path: str) -> None:
        if value is not None and not isinstance(value, bool):
            self.fail(path, f"must be true or false, not {value!r}")

    def ip(self, value: Any, path: str, *, required: bool = False, family: int | None = None) -> None:
        text = self.string(value, path, required=required)
        if not text:
            return
        version = ip_version(text)
        if not version:
            self.fail(path, f"{text!r} is not an IP address")
        if family is not None and version != family:
            self.fail(path, f"{text!r} is not an IPv{family} address")

    def cidr(self, value: Any, path: str) -> None:
        text = self.string(value, path, required=True)
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.fail(path, f"{text!r} is not a CIDR")

    def dns_label(self, value: Any, path: str, *, required: bool = False) -> None:
        text = self.string(value, path, required=required)
        if text and (len(text) > 63 or not DNS1123_LABEL.match(text)):
            self.fail(path, f"{text!r} is not a valid name: lower-case letters, digits and '-', at most 63")

    def labels(self, value: Any, path: str, *, values: bool = True) -> None:
        for key, item in self.mapping(value, path).items():
            self.qualified_name(key, f"{path}[{key}]")
            text = self.string(item, f"{path}[{key}]")
            if values and (len(text) > 63 or not LABEL_VALUE.match(text)):
                self.fail(f"{path}[{key}]", f"{text!r} is not a valid label value")

    def qualified_name(self, key: Any, path: str) -> None:
        if not isinstance(key, str) or not key:
            self.fail(path, "a label or annotation key must be a non-empty string")
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
            self.fail(path, f"the key's prefix {prefix!r} is not a DNS subdomain")
        if len(name) > 63 or not LABEL_NAME.match(name):
            self.fail(path, f"{key!r} is not a valid key (name part: letters, digits, '-', '_', '.')")

    def port(self, value: Any, path: str) -> None:
        port = self.mapping(value, path)
        if "port" in port:
            self.integer(port.get("port"), f"{path}.port", low=1, high=65535)
        protocol = self.string(port.get("protocol"), f"{path}.protocol")
        if protocol and protocol not in PROTOCOLS:
            self.fail(f"{path}.protocol", f"{protocol!r} must be one of {', '.join(PROTOCOLS)}")
        name = self.string(port.get("name"), f"{path}.name")
        if name:
            self.dns_label(name, f"{path}.name")


def _metadata(check: _Checker, *, namespaced: bool, numeric_name: bool = False) -> None:
    metadata = check.mapping(check.obj.get("metadata"), "metadata", required=True)
    name = check.string(metadata.get("name"), "metadata.name", required=True)
    if numeric_name:
        if not name.isdigit():
            check.fail("metadata.name", f"{name!r} must be the identity's number")
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        check.fail("metadata.name", f"{name!r} is not a valid name: lower-case letters, digits, '-' and '.'")
    namespace = metadata.get("namespace")
    if namespaced:
        check.dns_label(namespace, "metadata.namespace")
    elif namespace:
        check.fail("metadata.namespace", f"{check.kind} is cluster-wide and takes no namespace")
    check.labels(metadata.get("labels"), "metadata.labels")
    for key, value in check.mapping(metadata.get("annotations"), "metadata.annotations").items():
        check.qualified_name(key, f"metadata.annotations[{key}]")
        check.string(value, f"metadata.annotations[{key}]")


def _namespace(check: _Checker) -> None:
    check.dns_label(check.obj["metadata"]["name"], "metadata.name", required=True)


def _service(check: _Checker) -> None:
    spec = check.mapping(check.obj.get("spec"), "spec")
    cluster_ip = check.string(spec.get("clusterIP"), "spec.clusterIP")
    if cluster_ip and cluster_ip != "None":
        check.ip(cluster_ip, "spec.clusterIP")
    for i, ip in enumerate(check.sequence(spec.get("clusterIPs"), "spec.clusterIPs")):
        if ip != "None":
            check.ip(ip, f"spec.clusterIPs[{i}]", required=True)
    for i, port in enumerate(check.sequence(spec.get("ports"), "spec.ports")):
        check.port(port, f"spec.ports[{i}]")
        check.integer(port.get("port"), f"spec.ports[{i}].port", low=1, high=65535, required=True)
    for key, value in check.mapping(spec.get("selector"), "spec.selector").items():
        check.string(value, f"spec.selector[{key}]")


def _endpoint_slice(check: _Checker) -> None:
    obj = check.obj
    address_type = check.string(obj.get("addressType"), "addressType", required=True)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        check.fail("addressType", f"{address_type!r} must be IPv4, IPv6 or FQDN")
    family = {"IPv4": 4, "IPv6": 6}.get(address_type)
    for i, item in enumerate(check.sequence(obj.get("endpoints"), "endpoints")):
        path = f"endpoints[{i}]"
        endpoint = check.mapping(item, path)
        addresses = check.sequence(endpoint.get("addresses"), f"{path}.addresses")
        if not addresses:
            check.fail(f"{path}.addresses", "needs at least one address")
        for j, address in enumerate(addresses):
            if family is not None:
                check.ip(address, f"{path}.addresses[{j}]", required=True, family=family)
        conditions = check.mapping(endpoint.get("conditions"), f"{path}.conditions")
        for condition in ("ready", "serving", "terminating"):
            check.boolean(conditions.get(condition), f"{path}.conditions.{condition}")
        check.string(endpoint.get("nodeName"), f"{path}.nodeName")
        check.string(endpoint.get("zone"), f"{path}.zone")
        hints = check.mapping(endpoint.get("hints"), f"{path}.hints")
        for j, zone in enumerate(check.sequence(hints.get("forZones"), f"{path}.hints.forZones")):
            check.string(check.mapping(zone, f"{path}.hints.forZones[{j}]").get("name"),
                         f"{path}.hints.forZones[{j}].name", required=True)  # fmt: skip
    for i, port in enumerate(check.sequence(obj.get("ports"), "ports")):
        check.port(port, f"ports[{i}]")


def _cilium_node(check: _Checker) -> None:
    spec = check.mapping(check.obj.get("spec"), "spec")
    for i, item in enumerate(check.sequence(spec.get("addresses"), "spec.addresses")):
        address = check.mapping(item, f"spec.addresses[{i}]")
        check.string(address.get("type"), f"spec.addresses[{i}].type", required=True)
        check.ip(address.get("ip"), f"spec.addresses[{i}].ip", required=True)
    ipam = check.mapping(spec.get("ipam"), "spec.ipam")
    for i, cidr in enumerate(check.sequence(ipam.get("podCIDRs"), "spec.ipam.podCIDRs")):
        check.cidr(cidr, f"spec.ipam.podCIDRs[{i}]")
    for section in ("health", "ingress"):
        block = check.mapping(spec.get(section), f"spec.{section}")
        check.ip(block.get("ipv4"), f"spec.{section}.ipv4", family=4)
        check.ip(block.get("ipv6"), f"spec.{section}.ipv6", family=6)
    encryption = check.mapping(spec.get("encryption"), "spec.encryption")
    check.integer(encryption.get("key"), "spec.encryption.key", low=0, high=255)
    check.integer(spec.get("nodeIdentity"), "spec.nodeIdentity", low=0, high=2**32 - 1)
    check.string(spec.get("bootid"), "spec.bootid")


def _cilium_endpoint(check: _Checker) -> None:
    status = check.mapping(check.obj.get("status"), "status")
    identity = check.mapping(status.get("identity"), "status.identity")
    check.integer(identity.get("id"), "status.identity.id", low=0, high=2**32 - 1)
    for i, label in enumerate(check.sequence(identity.get("labels"), "status.identity.labels")):
        check.string(label, f"status.identity.labels[{i}]", required=True)
    networking = check.mapping(status.get("networking"), "status.networking")
    check.ip(networking.get("node"), "status.networking.node")
    for i, item in enumerate(check.sequence(networking.get("addressing"), "status.networking.addressing")):
        pair = check.mapping(item, f"status.networking.addressing[{i}]")
        check.ip(pair.get("ipv4"), f"status.networking.addressing[{i}].ipv4", family=4)
        check.ip(pair.get("ipv6"), f"status.networking.addressing[{i}].ipv6", family=6)
    encryption = check.mapping(status.get("encryption"), "status.encryption")
    check.integer(encryption.get("key"), "status.encryption.key", low=0, high=255)
    check.integer(status.get("id"), "status.id", low=0, high=2**32 - 1)
    check.string(status.get("service-account"), "status.service-account")


def _cilium_identity(check: _Checker) -> None:
    labels = check.mapping(check.obj.get("security-labels"), "security-labels")
    for key, value in labels.items():
        check.string(value, f"security-labels[{key}]")


def _policy(check: _Checker) -> None:
    """A policy is checked by reading it as the agents will (`clustermesh.model.policies`): whatever they could
    not enforce as written is refused now, with the field."""
    try:
        parse_policy(check.obj)
    except PolicyError as exc:
        check.fail(exc.field, exc.reason)


def _remote(check: _Checker) -> None:
    spec = check.mapping(check.obj.get("spec"), "spec", required=True)
    check.integer(spec.get("clusterID"), "spec.clusterID", low=1, high=511, required=True)
    endpoints = check.sequence(spec.get("endpoints"), "spec.endpoints")
    if not endpoints:
        check.fail("spec.endpoints", "needs at least one https:// endpoint")
    for field in ("ca", "cert", "key"):
        check.string(spec.get(field), f"spec.{field}", required=True)


_VALIDATORS: dict[str, Callable[[_Checker], None]] = {
    "Namespace": _namespace,
    "Service": _service,
    "EndpointSlice": _endpoint_slice,
    "CiliumNode": _cilium_node,
    "CiliumEndpoint": _cilium_endpoint,
    "CiliumIdentity": _cilium_identity,
    "CiliumNetworkPolicy": _policy,
    "NetworkPolicy": _policy,
    "CiliumClusterwideNetworkPolicy": _policy,
    "ClusterMeshRemote": _remote,
}


def validate_object(obj: Any) -> Object:
    """Check `obj` against its kind; return it with defaults filled in (the `default` namespace)."""
    if not isinstance(obj, dict):
        raise InvalidObject("", "", "", f"an object must be a mapping, not {type(obj).__name__}")
    check = _Checker(obj)
    kind_name = check.string(obj.get("kind"), "kind", required=True)
    try:
        kind = kind_by_name(kind_name)
    except ModelError as exc:
        raise InvalidObject(kind_name, check.name, "kind", str(exc)) from None
    api_version = check.string(obj.get("apiVersion"), "apiVersion", required=True)
    if api_version != kind.api_version:
        check.fail("apiVersion", f"{api_version!r} is not served for {kind.name}; use {kind.api_version!r}")
    metadata = check.mapping(obj.get("metadata"), "metadata", required=True)
    if kind.namespaced and not metadata.get("namespace"):
        metadata["namespace"] = "default"
    _metadata(check, namespaced=kind.namespaced, numeric_name=kind.name == "CiliumIdentity")
    _VALIDATORS[kind.name](check)
    return obj
