"""The exporter's global services: each one made of the EndpointSlices that name it, as slices come, move and go."""

from __future__ import annotations

import json

from apiserver.exporting import Exporter, StateStores
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.kinds import Object, kind_by_name
from kvstore.memory import MemoryBackend
from kvstore.syncing import SyncStore

SERVICE, SLICE = kind_by_name("Service"), kind_by_name("EndpointSlice")
PREFIX = "cilium/state/services/v1/c1/"


def exporter() -> Exporter:
    backend = MemoryBackend()
    stores = StateStores(*(SyncStore(backend, prefix=f"test/{name}/") for name in ("n", "i", "d")),
                         SyncStore(backend, prefix=PREFIX))  # fmt: skip
    return Exporter(ClusterInfo("c1", 1), stores)


def service(name: str) -> Object:
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "annotations": {"service.cilium.io/global": "true"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": ports}}  # fmt: skip


def endpoint_slice(name: str, service_name: str, address: str) -> Object:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "endpoints": [{"addresses": [address]}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}  # fmt: skip


def backends(exp: Exporter, name: str) -> list[str]:
    value = exp.stores.services.held().get(PREFIX + f"shop/{name}")
    return sorted(json.loads(value)["backends"]) if value is not None else []


def test_a_slice_counts_for_the_service_it_names_now() -> None:
    exp = exporter()
    for name in ("web", "api"):
        exp.on_upsert(SERVICE, service(name))
    exp.on_upsert(SLICE, endpoint_slice("s1", "web", "10.1.1.10"))
    exp.on_upsert(SLICE, endpoint_slice("s2", "web", "10.1.1.11"))
    assert backends(exp, "web") == ["10.1.1.10", "10.1.1.11"] and backends(exp, "api") == []
    exp.on_upsert(SLICE, endpoint_slice("s2", "api", "10.1.1.11"))  # relabelled: it moves to the other service
    assert backends(exp, "web") == ["10.1.1.10"] and backends(exp, "api") == ["10.1.1.11"]
    exp.on_delete(SLICE, endpoint_slice("s2", "api", "10.1.1.11"))
    assert backends(exp, "api") == [] and backends(exp, "web") == ["10.1.1.10"]
    assert set(exp.slices) == {("shop", "web")}, "a service with no slice left holds no entry"
