"""The node's own CiliumNode: what the rest of the mesh knows of this node, kept in the cluster's ResourceStore.

Published at start and checked again every `resync` seconds: if it was deleted or changed by someone else, it is
written back. Addresses, pod CIDRs, health IP, WireGuard public key and boot ID come from the agent's settings.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from clustermesh.model.converters import WIREGUARD_KEY_ANNOTATION
from clustermesh.model.kinds import Object, kind_by_name
from clustermesh.resources.store import ResourceError, ResourceStore
from clustermesh.resources.writing import create_or_update

__all__ = ["NodeSpec", "publish_node", "run_node_publisher"]

log = logging.getLogger(__name__)

CILIUM_NODE = kind_by_name("CiliumNode")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    internal_ips: list[str]
    pod_cidrs: list[str]
    cilium_internal_ip: str = ""
    health_ipv4: str = ""
    wireguard_public_key: str = ""
    boot_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def object(self) -> Object:
        addresses = [{"type": "InternalIP", "ip": ip} for ip in self.internal_ips]
        if self.cilium_internal_ip:
            addresses.append({"type": "CiliumInternalIP", "ip": self.cilium_internal_ip})
        metadata: dict[str, object] = {
            "name": self.name,
            "labels": {"kubernetes.io/hostname": self.name, **self.labels},
        }
        if self.wireguard_public_key:
            metadata["annotations"] = {WIREGUARD_KEY_ANNOTATION: self.wireguard_public_key}
        spec: dict[str, object] = {"addresses": addresses, "ipam": {"podCIDRs": list(self.pod_cidrs)}}
        if self.health_ipv4:
            spec["health"] = {"ipv4": self.health_ipv4}
        if self.boot_id:
            spec["bootid"] = self.boot_id
        return {"apiVersion": CILIUM_NODE.api_version, "kind": CILIUM_NODE.name, "metadata": metadata, "spec": spec}


def _same(current: Object, wanted: Object) -> bool:
    def core(obj: Object) -> tuple[object, object, object]:
        metadata = obj.get("metadata") or {}
        return metadata.get("labels"), metadata.get("annotations"), obj.get("spec")

    return core(current) == core(wanted)


async def publish_node(store: ResourceStore, spec: NodeSpec) -> str:
    """Create or update the node's CiliumNode; 'created', 'updated' or 'unchanged'."""
    written, _ = await create_or_update(store, spec.object(), same=_same)
    return written


async def run_node_publisher(store: ResourceStore, spec: NodeSpec, *, resync: float = 60.0) -> None:
    delay = resync
    while True:
        try:
            outcome = await publish_node(store, spec)
            if outcome != "unchanged":
                log.info("CiliumNode %s %s", spec.name, outcome)
            delay = resync
        except ResourceError as exc:
            log.warning("cannot publish CiliumNode %s: %s", spec.name, exc)
            delay = min(resync, 2.0)
        await asyncio.sleep(delay)
