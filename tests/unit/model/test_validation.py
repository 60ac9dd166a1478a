from __future__ import annotations

import copy
from typing import Any

import pytest

from clustermesh.model.validation import InvalidObject, validate_object

NODE: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNode",
    "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
    "spec": {"addresses": [{"type": "InternalIP", "ip": "10.0.0.1"}], "ipam": {"podCIDRs": ["10.1.0.0/24"]}},
}


def test_a_valid_object_passes_and_namespaced_kinds_default_to_default() -> None:
    assert validate_object(copy.deepcopy(NODE)) == NODE
    service = validate_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}})
    assert service["metadata"]["namespace"] == "default"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (lambda o: o["spec"]["addresses"][0].update(ip="10.0.0"), "spec.addresses[0].ip", "not an IP address"),
        (lambda o: o["spec"]["ipam"].update(podCIDRs=["10.1.0.0/33"]), "spec.ipam.podCIDRs[0]", "not a CIDR"),
        (lambda o: o["metadata"].update(name="Node_1"), "metadata.name", "not a valid name"),
        (lambda o: o["metadata"]["labels"].update({"bad key!": "x"}), "metadata.labels[bad key!]", "not a valid key"),
        (lambda o: o["metadata"]["labels"].update({"a": "x" * 64}), "metadata.labels[a]", "not a valid label value"),
        (lambda o: o.update(apiVersion="v1"), "apiVersion", "use 'cilium.io/v2'"),
        (lambda o: o["metadata"].update(namespace="x"), "metadata.namespace", "cluster-wide"),
        (lambda o: o["spec"].update(encryption={"key": 256}), "spec.encryption.key", "out of range 0..255"),
        (lambda o: o["spec"].update(addresses="10.0.0.1"), "spec.addresses", "must be a list"),
        (
            lambda o: o["spec"]["health"] if False else o["spec"].update(health={"ipv4": "fd00::1"}),
            "spec.health.ipv4",
            "not an IPv4 address",
        ),
    ],
)
def test_errors_name_the_object_and_the_field(change: Any, field: str, reason: str) -> None:
    obj = copy.deepcopy(NODE)
    change(obj)
    with pytest.raises(InvalidObject) as caught:
        validate_object(obj)
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert str(caught.value).startswith("CiliumNode ")


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p"}}, "kind"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 0}]}},
         "spec.ports[0].port"),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
          "spec": {"ports": [{"port": 80, "protocol": "ICMP"}]}}, "spec.ports[0].protocol"),
        ({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "e"},
          "addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]}, "endpoints[0].addresses[0]"),
        ({"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": "web"}}, "metadata.name"),
        ({"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint", "metadata": {"name": "e"},
          "status": {"identity": {"id": "x"}}}, "status.identity.id"),
        ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}}, "metadata.name"),
        ({"apiVersion": "v1", "kind": "Namespace"}, "metadata"),
    ],
)  # fmt: skip
def test_other_kinds_are_checked_too(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as caught:
        validate_object(obj)
    assert caught.value.field == field, str(caught.value)


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidObject, match="must be a mapping"):
        validate_object(["a"])
