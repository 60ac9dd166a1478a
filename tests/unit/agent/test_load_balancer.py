"""The load balancer's maps over the in-memory double: what a Service, its EndpointSlices and other clusters'
exports put there, and that a change writes only the entries of the Service it touches."""

from __future__ import annotations

from typing import Any

from agent.services import LoadBalancer
from agent.view import MergedView
from bpf.lbmaps import TCP, LbBackend, LbBackendMap, LbFrontendKey, LbRevNatMap, LbService, LbServiceMap, lb_memory_map
from clustermesh.model import keys, wire
from clustermesh.model.kinds import kind_by_name

SERVICE, SLICE = kind_by_name("Service"), kind_by_name("EndpointSlice")


class Maps:
    def __init__(self) -> None:
        self.lb_services = LbServiceMap(lb_memory_map("lb-services"))
        self.lb_backends = LbBackendMap(lb_memory_map("lb-backends"))
        self.lb_revnat = LbRevNatMap(lb_memory_map("lb-revnat"))


def service(name: str, ip: str, *, global_: bool = False) -> dict[str, Any]:
    annotations = {"service.cilium.io/global": "true"} if global_ else {}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}  # fmt: skip


def slice_(name: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}  # fmt: skip


def make() -> tuple[LoadBalancer, MergedView, Maps]:
    view = MergedView("c1")
    maps = Maps()
    return LoadBalancer(view, maps, "c1", 1), view, maps


def slots(maps: Maps, ip: str) -> list[str]:
    """The backends in a frontend's slots, in order."""
    entries = maps.lb_services.items()
    head = entries[LbFrontendKey(ip, 80, TCP)]
    backends = maps.lb_backends.items()
    found = []
    for slot in range(1, head.backends + 1):
        backend = backends[entries[LbFrontendKey(ip, 80, TCP, slot)].backend_id]
        found.append(f"{backend.address}:{backend.port}")
    return found


def test_a_service_and_its_slices_fill_the_maps_and_their_deletion_empties_them() -> None:
    lb, _, maps = make()
    lb.on_upsert(SERVICE, service("web", "10.96.1.2"))
    lb.on_upsert(SLICE, slice_("web", "10.1.1.10", "10.1.1.11"))
    lb.sync()
    assert slots(maps, "10.96.1.2") == ["10.1.1.10:8080", "10.1.1.11:8080"]
    assert list(maps.lb_revnat.items().values()) == [("10.96.1.2", 80)]
    lb.on_delete(SERVICE, service("web", "10.96.1.2"))
    lb.sync()
    assert maps.lb_services.items() == {} and maps.lb_backends.items() == {} and maps.lb_revnat.items() == {}


def test_a_slice_relabelled_to_another_service_leaves_the_first_and_a_deleted_one_leaves_its_own() -> None:
    lb, _, maps = make()
    lb.on_upsert(SERVICE, service("web", "10.96.1.2"))
    lb.on_upsert(SERVICE, service("api", "10.96.1.3"))
    moved = slice_("web", "10.1.1.10")
    lb.on_upsert(SLICE, moved)
    lb.on_upsert(SLICE, slice_("api", "10.1.1.20"))
    lb.sync()
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = "api"  # web-x now belongs to api
    lb.on_upsert(SLICE, moved)
    lb.sync()
    assert slots(maps, "10.96.1.2") == [] and sorted(slots(maps, "10.96.1.3")) == ["10.1.1.10:8080", "10.1.1.20:8080"]
    lb.on_delete(SLICE, slice_("api", "10.1.1.20"))
    lb.sync()
    assert slots(maps, "10.96.1.3") == ["10.1.1.10:8080"]
    assert sorted(b.address for b in maps.lb_backends.items().values()) == ["10.1.1.10"], "unused backend removed"


def test_a_service_with_no_ready_backend_has_a_frontend_with_none() -> None:
    lb, _, maps = make()
    lb.on_upsert(SERVICE, service("web", "10.96.1.2"))
    lb.sync()
    assert maps.lb_services.get(LbFrontendKey("10.96.1.2", 80, TCP)) == LbService(0, 0, 1), "refused, not unknown"


def test_one_backend_changing_among_many_services_writes_that_service_only() -> None:
    lb, _, maps = make()
    for i in range(200):
        lb.on_upsert(SERVICE, service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 2}"))
        lb.on_upsert(SLICE, slice_(f"s{i}", f"10.1.{i // 250}.{i % 250 + 2}", f"10.1.9.{i % 250 + 2}"))
    lb.sync()
    before = lb.counts.service_writes + lb.counts.backend_writes + lb.counts.revnat_writes
    lb.on_upsert(SLICE, slice_("s7", "10.1.0.9"))  # one of its two backends gone
    lb.sync()
    after = lb.counts.service_writes + lb.counts.backend_writes + lb.counts.revnat_writes
    assert slots(maps, "10.96.0.9") == ["10.1.0.9:8080"]
    assert after - before == 3, "its head (count 1) and the removed slot; the removed backend"


def test_a_global_service_gets_the_other_clusters_backends_by_port_name() -> None:
    lb, view, maps = make()
    export = wire.ClusterService(cluster="c2", namespace="shop", name="web", shared=True, clusterID=2,
                                 backends={"10.2.1.10": {"http": wire.L4Addr(Protocol="TCP", Port=9090)}})  # fmt: skip
    view.upsert("c2", "service", keys.service_key("c2", "shop", "web"), export)
    lb.on_upsert(SERVICE, service("web", "10.96.1.2", global_=True))
    lb.on_upsert(SLICE, slice_("web", "10.1.1.10"))
    lb.sync()
    assert slots(maps, "10.96.1.2") == ["10.1.1.10:8080", "10.2.1.10:9090"]
    assert {b.cluster_id for b in maps.lb_backends.items().values()} == {1, 2}
    assert LbBackend("10.2.1.10", 9090, TCP, 0, 2) in maps.lb_backends.items().values()
    [described] = lb.describe()
    assert [(b["cluster"], b["in_use"]) for b in described["backends"]] == [("c1", True), ("c2", True)]  # type: ignore[index]
