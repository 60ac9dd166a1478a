"""The node's own CiliumNode: what the rest of the mesh knows of this node, kept in the cluster's ResourceStore.

Published at start, and written back as soon as an informer sees it deleted or changed by someone else (the
cluster's etcd wiped and brought back, an operator's mistake), and checked every `resync` seconds besides.
Addresses, pod CIDRs, health IP, WireGuard public key and boot ID come from the agent's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model.converters import WIREGUARD_KEY_ANNOTATION
from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.resources.informing import Informer, object_ref
from clustermesh.resources.store import ResourceError, ResourceStore
from clustermesh.resources.writing import create_or_update

__all__ = ["NodePublisher", "NodeSpec", "publish_node", "run_node_publisher"]

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


class NodePublisher:
    """Keeps the node's CiliumNode as `spec` says; an informer Handler of CiliumNodes (only its own matters)."""

    def __init__(self, store: ResourceStore, spec: NodeSpec, *, resync: float = 60.0, retry: float = 2.0) -> None:
        self.store = store
        self.spec = spec
        self.resync = resync
        self.retry = retry
        self.published = 0  # writes made (created or updated)
        self._wanted = spec.object()
        self._wake = asyncio.Event()

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        if object_ref(obj)[1] == self.spec.name and not _same(obj, self._wanted):
            log.warning("CiliumNode %s was changed by someone else: writing it back", self.spec.name)
            self._wake.set()

    def on_delete(self, kind: Kind, obj: Object) -> None:
        if object_ref(obj)[1] == self.spec.name:
            log.warning("CiliumNode %s is gone from the store (deleted, or the etcd was wiped): publishing it again",
                        self.spec.name)  # fmt: skip
            self._wake.set()

    async def publish_once(self) -> bool:
        """Write the node if it is not as wanted; whether that worked (False: try again soon)."""
        try:
            outcome = await publish_node(self.store, self.spec)
        except ResourceError as exc:
            log.warning("cannot publish CiliumNode %s: %s", self.spec.name, exc)
            return False
        if outcome != "unchanged":
            self.published += 1
            log.info("CiliumNode %s %s", self.spec.name, outcome)
        return True

    async def run(self) -> None:
        informer = Informer(self.store, CILIUM_NODE, self)
        watching = asyncio.create_task(informer.run(), name="node-publisher-informer")
        try:
            while True:
                self._wake.clear()
                delay = self.resync if await self.publish_once() else self.retry
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            await cancel_and_wait([watching])


async def run_node_publisher(store: ResourceStore, spec: NodeSpec, *, resync: float = 60.0) -> None:
    await NodePublisher(store, spec, resync=resync).run()
