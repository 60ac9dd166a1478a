"""The node's local endpoints: one CiliumEndpoint each, with the identity of its labels.

The CNI plugin (next issue) asks the agent, over its local API, to create an endpoint when a pod starts and to delete
it when the pod goes. Creating allocates (or reuses) the identity of the pod's labels in this cluster's range and
writes the CiliumEndpoint into the cluster's ResourceStore; the apiserver publishes it to the mesh from there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from clustermesh.model.addresses import ip_version
from clustermesh.model.kinds import Object, kind_by_name
from clustermesh.model.validation import DNS1123_LABEL, DNS1123_SUBDOMAIN
from clustermesh.resources.store import NotFound, ResourceStore
from clustermesh.resources.writing import create_or_update

__all__ = ["EndpointManager", "EndpointRequest", "InvalidRequest"]

CILIUM_ENDPOINT = kind_by_name("CiliumEndpoint")


class Allocator(Protocol):
    async def allocate(self, labels: Mapping[str, str], namespace: str) -> int: ...


class InvalidRequest(ValueError):
    """A request the agent refuses; the message names the field."""


@dataclass(frozen=True)
class EndpointRequest:
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    ipv4: str = ""
    ipv6: str = ""
    service_account: str = "default"

    @classmethod
    def parse(cls, document: Any) -> EndpointRequest:
        if not isinstance(document, dict):
            raise InvalidRequest("the request must be a JSON object")
        namespace = document.get("namespace") or "default"
        name = document.get("name")
        if not isinstance(name, str) or not DNS1123_SUBDOMAIN.match(name):
            raise InvalidRequest(f"name: {name!r} is not a valid name")
        if not isinstance(namespace, str) or not DNS1123_LABEL.match(namespace):
            raise InvalidRequest(f"namespace: {namespace!r} is not a valid namespace")
        labels = document.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise InvalidRequest("labels: must map strings to strings")
        ipv4, ipv6 = str(document.get("ipv4") or ""), str(document.get("ipv6") or "")
        if ipv4 and ip_version(ipv4) != 4:
            raise InvalidRequest(f"ipv4: {ipv4!r} is not an IPv4 address")
        if ipv6 and ip_version(ipv6) != 6:
            raise InvalidRequest(f"ipv6: {ipv6!r} is not an IPv6 address")
        if not ipv4 and not ipv6:
            raise InvalidRequest("an endpoint needs an ipv4 or an ipv6 address")
        return cls(namespace, name, dict(labels), ipv4, ipv6, str(document.get("serviceAccount") or "default"))


class EndpointManager:
    """Creates and deletes this node's CiliumEndpoints. An address outside the node's pod CIDRs is refused: the rest
    of the mesh would refuse it too (admission), and it could take another node's pod."""

    def __init__(
        self, store: ResourceStore, allocator: Allocator, *, node_ip: str, pod_cidrs: list[str] | None = None
    ) -> None:
        self.store = store
        self.allocator = allocator
        self.node_ip = node_ip
        self.pod_cidrs = [ipaddress.ip_network(cidr, strict=False) for cidr in pod_cidrs or []]

    def check_addresses(self, request: EndpointRequest) -> None:
        """Each address of the request must lie in one of this node's pod CIDRs (when the node has any)."""
        if not self.pod_cidrs:
            return
        for ip in filter(None, (request.ipv4, request.ipv6)):
            address = ipaddress.ip_address(ip)
            if not any(address in cidr for cidr in self.pod_cidrs):
                cidrs = ", ".join(map(str, self.pod_cidrs))
                raise InvalidRequest(f"{ip} is not in this node's pod CIDRs ({cidrs})")

    def _object(self, request: EndpointRequest, identity: int) -> Object:
        addressing: dict[str, str] = {}
        if request.ipv4:
            addressing["ipv4"] = request.ipv4
        if request.ipv6:
            addressing["ipv6"] = request.ipv6
        return {
            "apiVersion": CILIUM_ENDPOINT.api_version,
            "kind": CILIUM_ENDPOINT.name,
            "metadata": {"name": request.name, "namespace": request.namespace, "labels": dict(request.labels)},
            "status": {
                "identity": {"id": identity, "labels": [f"k8s:{k}={v}" for k, v in sorted(request.labels.items())]},
                "networking": {"addressing": [addressing], "node": self.node_ip},
                "service-account": request.service_account,
                "state": "ready",
            },
        }

    async def create(self, request: EndpointRequest) -> Object:
        """Create (or replace) the endpoint; its object, with the identity it got."""
        self.check_addresses(request)
        identity = await self.allocator.allocate(request.labels, request.namespace)
        _, stored = await create_or_update(self.store, self._object(request, identity))
        return stored

    async def delete(self, namespace: str, name: str) -> bool:
        try:
            await self.store.delete(CILIUM_ENDPOINT, name, namespace)
        except NotFound:
            return False
        return True
