"""The node's local endpoints: one CiliumEndpoint each, with the identity of its labels.

The CNI plugin asks the agent, over its local API, to create an endpoint when a pod starts and to delete it when
the pod goes. Creating allocates (or reuses) the identity of the pod's labels in this cluster's range and writes the
CiliumEndpoint into the cluster's ResourceStore; the apiserver publishes it to the mesh from there.

The endpoints this node hosts are remembered (in the agent's state folder, so a restart remembers them too), and
the `EndpointKeeper` writes back any of them that vanishes from the store while its pod lives: after the cluster's
etcd is wiped and brought back, the pods of every node come back into the mesh within seconds, with identities
allocated again, instead of never.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from certs.files import write_atomic
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model.addresses import ip_version
from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.model.validation import DNS1123_LABEL, DNS1123_SUBDOMAIN
from clustermesh.resources.informing import Informer, object_ref
from clustermesh.resources.store import NotFound, ResourceError, ResourceStore
from clustermesh.resources.writing import create_or_update

__all__ = ["EndpointKeeper", "EndpointManager", "EndpointRequest", "InvalidRequest"]

log = logging.getLogger(__name__)

CILIUM_ENDPOINT = kind_by_name("CiliumEndpoint")


class Allocator(Protocol):
    async def allocate(self, labels: Mapping[str, str], namespace: str) -> int: ...


class InvalidRequest(ValueError):
    """A request the agent refuses; the message names the field."""


class IdentityError(Exception):
    """Raised by an Allocator that cannot give an identity now (its range is full)."""


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
    """Creates and deletes this node's CiliumEndpoints, and remembers them (`hosted`). An address outside the node's
    pod CIDRs is refused: the rest of the mesh would refuse it too (admission), and it could take another node's
    pod."""

    def __init__(
        self,
        store: ResourceStore,
        allocator: Allocator,
        *,
        node_ip: str,
        pod_cidrs: list[str] | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.store = store
        self.allocator = allocator
        self.node_ip = node_ip
        self.pod_cidrs = [ipaddress.ip_network(cidr, strict=False) for cidr in pod_cidrs or []]
        self.state_file = state_file
        #: (namespace, name) -> the request, for every endpoint this node hosts
        self.hosted: dict[tuple[str, str], EndpointRequest] = self._load()

    def _load(self) -> dict[tuple[str, str], EndpointRequest]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            documents = json.loads(self.state_file.read_bytes())
            requests = [EndpointRequest.parse(document) for document in documents]
        except (OSError, ValueError, TypeError) as exc:  # InvalidRequest is a ValueError
            log.error("%s is unreadable (%s): the endpoints this node hosts are forgotten until their pods come back",
                      self.state_file, exc)  # fmt: skip
            return {}
        return {(request.namespace, request.name): request for request in requests}

    def _save(self) -> None:
        if self.state_file is None:
            return
        documents = [dataclasses.asdict(request) for _, request in sorted(self.hosted.items())]
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_file, json.dumps(documents, indent=1).encode(), mode=0o600)

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
        self.hosted[(request.namespace, request.name)] = request
        self._save()
        return stored

    async def delete(self, namespace: str, name: str) -> bool:
        if self.hosted.pop((namespace, name), None) is not None:
            self._save()
        try:
            await self.store.delete(CILIUM_ENDPOINT, name, namespace)
        except NotFound:
            return False
        return True


class EndpointKeeper:
    """Writes back this node's endpoints that vanish from the store while their pods live; an informer Handler of
    CiliumEndpoints. After its informer's first list, every hosted endpoint missing from it is written too (the
    store was wiped while the agent was down)."""

    def __init__(self, manager: EndpointManager, *, retry: float = 2.0) -> None:
        self.manager = manager
        self.retry = retry
        self.restored = 0
        self._missing: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        self._missing.discard(object_ref(obj))

    def on_delete(self, kind: Kind, obj: Object) -> None:
        ref = object_ref(obj)
        if ref in self.manager.hosted:
            self._missing.add(ref)
            self._wake.set()

    async def run(self) -> None:
        informer = Informer(self.manager.store, CILIUM_ENDPOINT, self)
        watching = asyncio.create_task(informer.run(), name="endpoint-keeper-informer")
        try:
            await informer.synced.wait()
            self._missing |= set(self.manager.hosted) - set(informer.cache)
            while True:
                self._wake.clear()
                failed = await self._restore()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry if failed else None):
                        await self._wake.wait()
        finally:
            await cancel_and_wait([watching])

    async def _restore(self) -> bool:
        """Write every missing hosted endpoint; whether one failed (and is tried again soon)."""
        failed = False
        for ref in sorted(self._missing):
            request = self.manager.hosted.get(ref)
            if request is None:  # the pod went meanwhile
                self._missing.discard(ref)
                continue
            try:
                await self.manager.create(request)
            except (ResourceError, IdentityError) as exc:
                log.warning("endpoint %s/%s not restored yet: %s", ref[0], ref[1], exc)
                failed = True
                continue
            self._missing.discard(ref)
            self.restored += 1
            log.info("endpoint %s/%s was gone from the store while its pod lives: written again", *ref)
        return failed
