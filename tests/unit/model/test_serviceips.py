"""ClusterIPs: given from the service CIDR, kept across a manifest applied again, never changed."""

from __future__ import annotations

import pytest

from clustermesh.model.errors import ModelError
from clustermesh.model.serviceips import PoolExhausted, ServiceIPPool, keep_cluster_ip, needs_cluster_ip


def service(ip: str | None = None, **spec: object) -> dict[str, object]:
    body: dict[str, object] = {"ports": [{"port": 80}], **spec}
    if ip is not None:
        body["clusterIP"] = ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": body}


def test_addresses_are_given_in_order_skipping_the_first_and_kept_per_owner() -> None:
    pool = ServiceIPPool("10.96.1.0/29")  # hosts .1-.6; .1 is kept back
    assert [pool.allocate(f"ns/s{i}") for i in range(5)] == [f"10.96.1.{i}" for i in range(2, 7)]
    assert pool.allocate("ns/s0") == "10.96.1.2", "an owner keeps its address"
    with pytest.raises(PoolExhausted, match="every address is taken"):
        pool.allocate("ns/late")
    pool.release("ns/s3")
    assert pool.allocate("ns/late") == "10.96.1.5"


def test_addresses_in_the_store_are_noted_and_never_given_twice() -> None:
    pool = ServiceIPPool("10.96.1.0/24")
    pool.note("ns/old", "10.96.1.2")
    pool.note("ns/elsewhere", "192.168.0.9")  # not ours: ignored
    assert pool.allocate("ns/new") == "10.96.1.3"
    assert "192.168.0.9" not in pool.holders


def test_a_manifest_applied_again_keeps_its_address_and_cannot_change_it() -> None:
    stored = service("10.96.1.7")
    assert keep_cluster_ip(stored, service())["spec"]["clusterIP"] == "10.96.1.7"  # type: ignore[index]
    assert keep_cluster_ip(stored, service("10.96.1.7")) == service("10.96.1.7")
    with pytest.raises(ModelError, match=r"spec\.clusterIP: field is immutable"):
        keep_cluster_ip(stored, service("10.96.1.8"))
    assert keep_cluster_ip(service(), service("10.96.1.8"))["spec"]["clusterIP"] == "10.96.1.8"  # type: ignore[index]


def test_headless_and_external_name_services_get_no_address() -> None:
    assert needs_cluster_ip(service())
    assert not needs_cluster_ip(service("None"))
    assert not needs_cluster_ip(service(type="ExternalName"))
    with pytest.raises(ModelError, match="too small"):
        ServiceIPPool("10.96.1.0/31")
    with pytest.raises(ModelError, match="service CIDR"):
        ServiceIPPool("10.96.1.300/24")
