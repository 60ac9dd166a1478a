"""Global services in the merged view: exports from every cluster, merged with the local Service's affinity."""

from __future__ import annotations

from agent.main import LocalServices
from agent.view import MergedView
from clustermesh.model import wire
from clustermesh.model.kinds import kind_by_name

SERVICE = kind_by_name("Service")

PORTS: wire.PortConfiguration = {"http": wire.L4Addr("TCP", 80)}


def export(cluster: str, *backends: str) -> wire.ClusterService:
    return wire.ClusterService(
        cluster=cluster,
        namespace="shop",
        name="echo",
        frontends={"10.96.0.10": PORTS},
        backends={ip: PORTS for ip in backends},
        shared=True,
        clusterID=int(cluster[1:]),
    )


def backends(view: MergedView) -> list[tuple[str, str]]:
    return [(b.cluster, b.ip) for b in view.services["shop/echo"].backends]


def test_affinity_set_before_any_export_applies_to_exports_that_come_later() -> None:
    view = MergedView("c1")
    view.set_local_service("shop", "echo", affinity="local", frontends=None)
    assert "shop/echo" not in view.services  # nothing exported yet: no service
    view.upsert("c2", "service", "k2", export("c2", "10.2.1.10"))
    assert backends(view) == [("c2", "10.2.1.10")]  # no local backend yet: the remote ones serve
    view.upsert("c1", "service", "k1", export("c1", "10.1.1.10"))
    assert backends(view) == [("c1", "10.1.1.10")]
    assert view.services["shop/echo"].affinity == "local"


def test_affinity_remote_and_none() -> None:
    view = MergedView("c1")
    view.upsert("c1", "service", "k1", export("c1", "10.1.1.10"))
    view.upsert("c2", "service", "k2", export("c2", "10.2.1.10"))
    assert backends(view) == [("c1", "10.1.1.10"), ("c2", "10.2.1.10")]
    view.set_local_service("shop", "echo", affinity="remote", frontends=None)
    assert backends(view) == [("c2", "10.2.1.10")]
    view.delete("c2", "service", "k2", export("c2", "10.2.1.10"))
    assert backends(view) == [("c1", "10.1.1.10")]  # no remote backend left: the local ones serve


def test_a_service_nobody_exports_or_configures_is_forgotten() -> None:
    view = MergedView("c1")
    view.set_local_service("shop", "echo", affinity="local", frontends=None)
    view.upsert("c2", "service", "k2", export("c2", "10.2.1.10"))
    view.clear_local_service("shop", "echo")
    view.delete("c2", "service", "k2", export("c2", "10.2.1.10"))
    assert "shop/echo" not in view.services
    view.upsert("c1", "service", "k1", export("c1", "10.1.1.10"))
    view.upsert("c2", "service", "k2", export("c2", "10.2.1.10"))
    assert view.services["shop/echo"].affinity == "none"  # the old affinity is not resurrected
    assert len(backends(view)) == 2


def local_service(annotations: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "shop", "annotations": annotations},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def test_the_local_services_affinity_annotation_reaches_the_view() -> None:
    """What the agent's informer of local Services does: the annotation, not a test, sets the affinity."""
    view = MergedView("c1")
    services = LocalServices(view)
    view.upsert("c1", "service", "k1", export("c1", "10.1.1.10"))
    view.upsert("c2", "service", "k2", export("c2", "10.2.1.10"))
    service = SERVICE
    services.on_upsert(
        service, local_service({"service.cilium.io/global": "true", "service.cilium.io/affinity": "Local"})
    )
    assert backends(view) == [("c1", "10.1.1.10")]
    services.on_upsert(
        service, local_service({"service.cilium.io/global": "true", "io.cilium/service-affinity": "remote"})
    )
    assert backends(view) == [("c2", "10.2.1.10")]
    services.on_upsert(
        service, local_service({"service.cilium.io/global": "false", "service.cilium.io/affinity": "local"})
    )
    assert backends(view) == [("c1", "10.1.1.10"), ("c2", "10.2.1.10")], "not global: no affinity of its own"
    services.on_upsert(
        service, local_service({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"})
    )
    services.on_delete(service, local_service({}))
    assert backends(view) == [("c1", "10.1.1.10"), ("c2", "10.2.1.10")]
    assert view.services["shop/echo"].affinity == "none"
