"""Backend selection for a Service's frontends: EndpointSlice conditions, remote backends by port name, shared,
and Cilium's affinity table (with `none` meaning every cluster, not Cilium 1.18's bug)."""

from __future__ import annotations

from typing import Any

import pytest

from clustermesh.model import wire
from clustermesh.model.loadbalancing import ACTIVE, TERMINATING, Backend, Frontend, plan_service

HTTP: dict[str, Any] = {"name": "http", "port": 80, "protocol": "TCP"}
DNS: dict[str, Any] = {"name": "dns", "port": 53, "protocol": "UDP"}


def service(affinity: str | None = None, global_: bool = True, **spec: Any) -> dict[str, Any]:
    annotations = {"service.cilium.io/global": "true"} if global_ else {}
    if affinity is not None:
        annotations["service.cilium.io/affinity"] = affinity
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
            "spec": {"clusterIP": "10.96.1.2", "ports": [HTTP, DNS], **spec}}  # fmt: skip


def slice_(*endpoints: tuple[str, dict[str, bool]]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{**HTTP, "port": 8080}, {**DNS, "port": 5353}],
            "endpoints": [{"addresses": [ip], "conditions": conditions} for ip, conditions in endpoints]}  # fmt: skip


def export(cluster: str, *ips: str, shared: bool = True, port_name: str = "http") -> wire.ClusterService:
    port = wire.L4Addr(Protocol="TCP", Port=9090)
    return wire.ClusterService(cluster=cluster, namespace="shop", name="web", shared=shared,
                               backends={ip: {port_name: port} for ip in ips})  # fmt: skip


READY: dict[str, bool] = {"ready": True}
LOCAL = slice_(("10.1.1.10", READY))
EXPORTS = {"c2": export("c2", "10.2.1.10"), "c3": export("c3", "10.3.1.10")}


def used(svc: dict[str, Any], slices: list[dict[str, Any]], exports: dict[str, wire.ClusterService]) -> list[str]:
    [http, _] = plan_service(svc, slices, exports, "c1")
    assert http.frontend == Frontend("10.96.1.2", 80, "TCP", "http")
    return [f"{b.cluster}/{b.ip}:{b.port}" for b in http.used]


@pytest.mark.parametrize(("affinity", "local", "expected"), [
    (None, [LOCAL], ["c1/10.1.1.10:8080", "c2/10.2.1.10:9090", "c3/10.3.1.10:9090"]),
    ("none", [LOCAL], ["c1/10.1.1.10:8080", "c2/10.2.1.10:9090", "c3/10.3.1.10:9090"]),
    ("typo", [LOCAL], ["c1/10.1.1.10:8080", "c2/10.2.1.10:9090", "c3/10.3.1.10:9090"]),
    ("local", [LOCAL], ["c1/10.1.1.10:8080"]),
    ("local", [slice_(("10.1.1.10", {"ready": False}))], ["c2/10.2.1.10:9090", "c3/10.3.1.10:9090"]),
    ("local", [], ["c2/10.2.1.10:9090", "c3/10.3.1.10:9090"]),
    ("remote", [LOCAL], ["c2/10.2.1.10:9090", "c3/10.3.1.10:9090"]),
])  # fmt: skip
def test_affinity(affinity: str | None, local: list[dict[str, Any]], expected: list[str]) -> None:
    assert used(service(affinity), local, EXPORTS) == expected


def test_remote_affinity_falls_back_to_local_when_no_cluster_exports_backends() -> None:
    assert used(service("remote"), [LOCAL], {}) == ["c1/10.1.1.10:8080"]


def test_a_service_that_is_not_global_stays_local_and_unshared_exports_are_ignored() -> None:
    assert used(service(global_=False), [LOCAL], EXPORTS) == ["c1/10.1.1.10:8080"]
    assert used(service(), [LOCAL], {"c2": export("c2", "10.2.1.10", shared=False)}) == ["c1/10.1.1.10:8080"]


def test_remote_backends_match_by_port_name_not_number() -> None:
    exports = {"c2": export("c2", "10.2.1.10", port_name="web")}
    assert used(service(), [LOCAL], exports) == ["c1/10.1.1.10:8080"], "no port named http in c2's export"


def test_terminating_backends_take_new_connections_only_when_none_is_active() -> None:
    terminating = ("10.1.1.11", {"ready": False, "serving": True, "terminating": True})
    gone = ("10.1.1.12", {"ready": False, "serving": False, "terminating": True})
    [http, _] = plan_service(service(global_=False), [slice_(("10.1.1.10", READY), terminating, gone)], {}, "c1")
    assert [(b.ip, b.state) for b in http.backends] == [("10.1.1.10", ACTIVE), ("10.1.1.11", TERMINATING)]
    assert [b.ip for b in http.used] == ["10.1.1.10"]
    [http, _] = plan_service(service(global_=False), [slice_(terminating, gone)], {}, "c1")
    assert [b.ip for b in http.used] == ["10.1.1.11"]
    [http, _] = plan_service(service("local"), [slice_(terminating)], EXPORTS, "c1")
    assert [b.cluster for b in http.used] == ["c2", "c3"], "a terminating local backend is not an active one"


def test_udp_ports_and_services_without_an_address() -> None:
    [_, dns] = plan_service(service(global_=False), [LOCAL], {}, "c1")
    assert dns.frontend == Frontend("10.96.1.2", 53, "UDP", "dns")
    assert dns.used == (Backend("c1", "10.1.1.10", 5353, "UDP"),)
    assert plan_service(service(clusterIP="None"), [LOCAL], {}, "c1") == []
    assert plan_service({**service(), "spec": {"ports": [{"port": 80}]}}, [LOCAL], {}, "c1") == []
