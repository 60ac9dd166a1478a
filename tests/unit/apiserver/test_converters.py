"""The converters' corner cases (the reference behaviour end to end is in tests/integration)."""

from __future__ import annotations

from clustermesh.model import converters, wire
from clustermesh.model.clusters import ClusterInfo

CLUSTER = ClusterInfo("c1", 1)


def test_secondary_pod_cidrs_and_missing_maps() -> None:
    node = converters.cilium_node_to_node(
        {"metadata": {"name": "n"}, "spec": {"ipam": {"podCIDRs": ["10.0.0.0/24", "10.0.1.0/24", "fd00::/64"]}}},
        CLUSTER,
    )
    assert str(node.IPv4AllocCIDR) == "10.0.0.0/24"
    assert [str(c) for c in node.IPv4SecondaryAllocCIDRs or []] == ["10.0.1.0/24"]
    assert str(node.IPv6AllocCIDR) == "fd00::/64" and node.IPv6SecondaryAllocCIDRs is None
    assert node.Labels is None and node.Annotations is None and node.IPAddresses is None
    assert (node.ClusterID, node.Cluster, node.Source) == (1, "c1", "custom-resource")


def test_endpoint_without_identity_has_id_zero_and_canonical_ips() -> None:
    pairs = converters.cilium_endpoint_to_ip_pairs(
        {
            "metadata": {"name": "p", "namespace": "ns"},
            "status": {"networking": {"addressing": [{"ipv6": "FD00:0:0::1"}], "node": "10.0.0.1"}},
        }
    )
    assert [(p.IP, p.ID, p.key_name()) for p in pairs] == [("fd00::1", 0, "fd00::1")]


def test_identity_needs_labels_and_a_namespace() -> None:
    assert converters.cilium_identity_to_labels({"metadata": {"name": "300"}}) is None
    labelled = {"security-labels": {"k8s:app": "x", "k8s:io.kubernetes.pod.namespace": "shop"}}
    assert converters.identity_namespace(labelled) == "shop"
    assert converters.identity_namespace({"security-labels": {"k8s:app": "x"}}) is None


def test_service_annotations_and_defaults() -> None:
    def svc(annotations: dict[str, str]) -> dict[str, object]:
        return {"metadata": {"name": "s", "namespace": "n", "annotations": annotations}, "spec": {}}

    assert not converters.is_global_service(svc({}))
    assert converters.is_shared_service(svc({"service.cilium.io/global": "true"}))
    assert converters.is_shared_service(svc({"io.cilium/global-service": "TRUE"}))
    not_shared = {"service.cilium.io/global": "true", "service.cilium.io/shared": "false"}
    assert not converters.is_shared_service(svc(not_shared))
    assert not converters.is_shared_service(svc({"service.cilium.io/shared": "true"}))
    assert converters.is_global_namespace(None)
    assert not converters.is_global_namespace({"metadata": {"annotations": {"clustermesh.cilium.io/global": "False"}}})


def test_headless_service_has_no_frontends_and_terminating_but_serving_backends_count() -> None:
    service = {
        "metadata": {"name": "s", "namespace": "n", "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]},
    }
    slices = [
        {
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": False, "serving": True, "terminating": True}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": False}},
                {"addresses": ["10.0.0.3"], "hostname": "db-0"},
            ],
            "ports": [{"port": 5432, "protocol": "TCP"}, {"port": 9, "protocol": "ICMP"}],
        },
        {"addressType": "FQDN", "endpoints": [{"addresses": ["db.example"]}]},
    ]
    exported = converters.service_to_cluster_service(service, slices, CLUSTER)
    assert exported is not None
    assert exported.frontends == {}
    assert exported.backends == {
        "10.0.0.1": {"": wire.L4Addr(Protocol="TCP", Port=5432)},
        "10.0.0.3": {"": wire.L4Addr(Protocol="TCP", Port=5432)},
    }
    assert exported.hostnames == {"10.0.0.3": "db-0"}
