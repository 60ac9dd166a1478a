"""Services in the lab: a Service applied to a cluster, and its EndpointSlice kept filled from the lab's pods, as
Kubernetes' endpoint-slice controller keeps it.

`add_service` applies the Service (its ports named `<protocol>-<port>`, so that the same command in another cluster
names them alike: remote backends attach by port name) and waits for its ClusterIP. Whenever the lab's pods change
(`lab pod add|delete|ready|unready`, `lab service add`), `sync_slices` writes, per Service of the lab, one
EndpointSlice (`<service>-lab`) of the pods of its namespace and cluster whose labels match its selector, each ready
unless made unready. Everything goes through `lab env`'s loopback bridge, as from a user's shell.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from clustermesh.contexts import ContextFile
from clustermesh.lab.bridge import host_contexts
from clustermesh.lab.layout import LabError
from clustermesh.lab.state import LabContext
from clustermesh.model.kinds import kind_by_name
from clustermesh.model.serviceips import cluster_ip
from clustermesh.resources.store import ResourceStore
from clustermesh.resources.writing import create_or_update
from kvstore import etcd

__all__ = ["add_service", "parse_ports", "service_manifest", "sync_slices"]

SERVICE, SLICE = kind_by_name("Service"), kind_by_name("EndpointSlice")
_PORT = re.compile(r"^(\d{1,5})(?::(\d{1,5}))?(?:/(tcp|udp))?$", re.IGNORECASE)
DEFAULT_LABELS = {"app": "lab"}  # what `lab up`'s pods carry


def parse_ports(values: list[str]) -> list[dict[str, Any]]:
    """`80`, `80/udp`, `80:8080/tcp` (service port, target port) -> Service ports, named `<protocol>-<port>`."""
    ports = []
    for value in values:
        found = _PORT.match(value.strip())
        if found is None or not 1 <= int(found.group(1)) <= 65535:
            raise LabError(f"port {value!r}: expected PORT[:TARGET][/tcp|/udp], as 80 or 53/udp")
        number, target, protocol = int(found.group(1)), int(found.group(2) or found.group(1)), (found.group(3) or "tcp")
        ports.append({"name": f"{protocol.lower()}-{number}", "port": number, "targetPort": target,
                      "protocol": protocol.upper()})  # fmt: skip
    if not ports:
        raise LabError("a Service needs a port: --port 80")
    return ports


def service_manifest(name: str, namespace: str, selector: dict[str, str], ports: list[dict[str, Any]], *,
                     is_global: bool, shared: bool, affinity: str | None) -> dict[str, Any]:  # fmt: skip
    annotations = {}
    if is_global:
        annotations["service.cilium.io/global"] = "true"
        if not shared:
            annotations["service.cilium.io/shared"] = "false"
        if affinity:
            annotations["service.cilium.io/affinity"] = affinity
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"selector": selector, "ports": ports}}  # fmt: skip


async def _store(ctx: LabContext, cluster: int) -> tuple[Any, ResourceStore]:
    config = host_contexts(ctx)
    context = ContextFile.load(config).get(f"c{cluster}")
    backend = await etcd.connect(context.etcd_config(config.parent))
    return backend, context.open_store(backend)


def _pods_of(ctx: LabContext, cluster: int, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
    found = []
    for key, pod in sorted(ctx.state.pods.items()):
        if not key.startswith(f"c{cluster}/") or pod.get("namespace", "default") != namespace:
            continue
        labels = pod.get("labels") or DEFAULT_LABELS
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            found.append(pod)
    return found


def endpoint_slice(name: str, namespace: str, ports: list[dict[str, Any]],
                   pods: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-lab", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by": "clustermesh-lab"}},
            "ports": [{"name": p["name"], "port": p["targetPort"], "protocol": p["protocol"]} for p in ports],
            "endpoints": [{"addresses": [pod["ip"]], "nodeName": pod["node"],
                           "conditions": {"ready": pod.get("ready", True), "serving": pod.get("ready", True),
                                          "terminating": False}} for pod in pods]}  # fmt: skip


async def sync_slices(ctx: LabContext, cluster: int) -> None:
    """Each lab Service of the cluster's EndpointSlice, from the pods there now."""
    services = {k: v for k, v in ctx.state.services.items() if k.startswith(f"c{cluster}/")}
    if not services:
        return
    backend, store = await _store(ctx, cluster)
    try:
        for key, service in services.items():
            _, namespace, name = key.split("/")
            pods = _pods_of(ctx, cluster, namespace, service["selector"])
            await create_or_update(store, endpoint_slice(name, namespace, service["ports"], pods))
    finally:
        await store.close()
        await backend.close()


async def _cluster_ip(store: ResourceStore, name: str, namespace: str) -> str:
    """The Service's ClusterIP, once the cluster's apiserver has given it (watched, not polled)."""
    listed = await store.list(SERVICE)
    for obj in listed.items:
        if (obj["metadata"]["name"], obj["metadata"].get("namespace")) == (name, namespace) and cluster_ip(obj):
            return str(cluster_ip(obj))
    async for event in store.watch(SERVICE, listed.resource_version):
        metadata = event.object["metadata"]
        if (metadata["name"], metadata.get("namespace")) == (name, namespace) and cluster_ip(event.object):
            return str(cluster_ip(event.object))
    raise LabError(f"the watch of Services ended before {namespace}/{name} got a ClusterIP")


async def add_service(ctx: LabContext, cluster: int, name: str, namespace: str, selector: dict[str, str],
                      ports: list[dict[str, Any]], *, is_global: bool, shared: bool, affinity: str | None,
                      timeout: float = 15.0) -> dict[str, Any]:  # fmt: skip
    """Apply the Service, fill its EndpointSlice, and wait for its ClusterIP; what `lab service add -o json`
    prints."""
    if f"c{cluster}" not in ctx.state.nodes:
        raise LabError(
            f"lab {ctx.layout.name} has no cluster c{cluster} (clusters: {', '.join(sorted(ctx.state.nodes))})"
        )
    manifest = service_manifest(name, namespace, selector, ports, is_global=is_global, shared=shared,
                                affinity=affinity)  # fmt: skip
    backend, store = await _store(ctx, cluster)
    try:
        await create_or_update(store, manifest)
        ctx.state.services[f"c{cluster}/{namespace}/{name}"] = {"selector": selector, "ports": ports}
        ctx.state.save(ctx.state_dir)
        await sync_slices(ctx, cluster)
        try:
            async with asyncio.timeout(timeout):
                ip = await _cluster_ip(store, name, namespace)
        except TimeoutError:
            raise LabError(f"Service {namespace}/{name} got no ClusterIP within {timeout:.0f} s") from None
    finally:
        await store.close()
        await backend.close()
    return {"name": name, "namespace": namespace, "cluster": f"c{cluster}", "cluster_ip": ip,
            "ports": [f"{p['port']}/{p['protocol']}" for p in ports],
            "backends": [p["ip"] for p in _pods_of(ctx, cluster, namespace, selector)]}  # fmt: skip
