"""ClusterIPs: each Service of a cluster gets one from the cluster's service CIDR, and keeps it.

As Kubernetes' apiserver does: the address is the server's to give (`clustermesh-apiserver --service-cluster-ip-range`),
a manifest applied again without one keeps the one it has, and a manifest that asks to change it is refused
(`spec.clusterIP: field is immutable`). A headless Service (`clusterIP: None`) gets none. Pure: the apiserver's
allocator (`apiserver.serviceips`) and the standalone store's update use these.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Object

__all__ = ["PoolExhausted", "ServiceIPPool", "cluster_ip", "keep_cluster_ip", "needs_cluster_ip"]


class PoolExhausted(ModelError):
    """Every address of the service CIDR is taken."""


def cluster_ip(service: Object) -> str | None:
    """The Service's ClusterIP, None when it has none yet; "None" for a headless one."""
    spec = service.get("spec") or {}
    value = spec.get("clusterIP")
    return str(value) if value else None


def needs_cluster_ip(service: Object) -> bool:
    """A Service with no address yet that is not headless (an ExternalName Service gets none either)."""
    spec = service.get("spec") or {}
    return cluster_ip(service) is None and spec.get("type") != "ExternalName"


def keep_cluster_ip(previous: Object, wanted: Object) -> Object:
    """`wanted` with the ClusterIP `previous` has, when it names none; an error when it names another."""
    kept = cluster_ip(previous)
    asked = cluster_ip(wanted)
    if kept is None or asked == kept:
        return wanted
    if asked is not None:
        raise ModelError(f"spec.clusterIP: field is immutable (it is {kept}; {asked} was asked)")
    updated = copy.deepcopy(wanted)
    spec: dict[str, Any] = updated.setdefault("spec", {})
    spec["clusterIP"] = kept
    previous_ips = (previous.get("spec") or {}).get("clusterIPs")
    if previous_ips and not spec.get("clusterIPs"):
        spec["clusterIPs"] = list(previous_ips)
    return updated


class ServiceIPPool:
    """The addresses of one service CIDR, and which Service (`namespace/name`) holds each."""

    def __init__(self, cidr: str) -> None:
        try:
            self.network = ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise ModelError(f"service CIDR {cidr!r}: {exc}") from None
        if self.network.num_addresses < 4:
            raise ModelError(f"service CIDR {cidr}: too small (a /30 at least)")
        self.holders: dict[str, str] = {}  # address -> owner
        self.addresses: dict[str, str] = {}  # owner -> address
        self._cursor = 0  # where the next search starts, from the first usable address

    def __contains__(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in self.network
        except ValueError:
            return False

    def note(self, owner: str, ip: str) -> None:
        """An address the owner holds already (from the store)."""
        if ip in self:
            self.release(owner)
            self.holders[ip] = owner
            self.addresses[owner] = ip

    def release(self, owner: str) -> None:
        ip = self.addresses.pop(owner, None)
        if ip is not None and self.holders.get(ip) == owner:
            del self.holders[ip]

    def allocate(self, owner: str) -> str:
        """The owner's address: the one it holds, else the next free one after the last given (the network's first
        host is skipped, as Kubernetes keeps it for its own `kubernetes` Service)."""
        if owner in self.addresses:
            return self.addresses[owner]
        first = int(self.network.network_address) + 2
        last = int(self.network.broadcast_address) - 1
        size = last - first + 1
        for step in range(size):
            candidate = first + (self._cursor + step) % size
            ip = str(ipaddress.ip_address(candidate))
            if ip not in self.holders:
                self._cursor = (candidate - first + 1) % size
                self.note(owner, ip)
                return ip
        raise PoolExhausted(f"service CIDR {self.network}: every address is taken ({len(self.holders)} Services)")
