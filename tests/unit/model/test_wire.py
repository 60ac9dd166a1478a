"""The wire types against vectors derived from Cilium's own clustermesh test scripts (written out here by hand:
the reference files are never read at test time). Each vector is compact JSON exactly as Go's json.Marshal writes it.
"""

from __future__ import annotations

import msgspec
import pytest

from clustermesh.model import wire
from clustermesh.model.errors import InvalidValue

NODE_1 = (
    b'{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},'
    b'{"Type":"InternalIP","IP":"fc00:c111::2"},{"Type":"CiliumInternalIP","IP":"10.244.0.10"},'
    b'{"Type":"CiliumInternalIP","IP":"fd00:10:244::e2d6"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},'
    b'"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="},'
    b'"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.0.134","IPv6HealthIP":"fd00:10:244::d812",'
    b'"IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,'
    b'"Labels":{"kubernetes.io/hostname":"test-node-1"},'
    b'"Annotations":{"network.cilium.io/wg-pub-key":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI="},'
    b'"NodeIdentity":0,"WireguardPubKey":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI=",'
    b'"BootID":"570d3fd1-93db-4862-ba99-6a3c2c10c38f"}'
)
NODE_2 = (
    b'{"Name":"test-node-2","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.3"},'
    b'{"Type":"InternalIP","IP":"fc00:c111::3"},{"Type":"CiliumInternalIP","IP":"10.244.1.130"},'
    b'{"Type":"CiliumInternalIP","IP":"fd00:10:244:1::9089"}],"IPv4AllocCIDR":{"IP":"10.244.1.0","Mask":"////AA=="},'
    b'"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244:1::","Mask":"//////////8AAAAAAAAAAA=="},'
    b'"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.1.153","IPv6HealthIP":"fd00:10:244:1::835d",'
    b'"IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":7,'
    b'"Labels":{"kubernetes.io/hostname":"test-node-2"},"Annotations":null,"NodeIdentity":0,"WireguardPubKey":"",'
    b'"BootID":"c1d2cda2-aca0-4033-abca-3843298860b9"}'
)
IP_FOO = (
    b'{"IP":"10.244.1.79","Mask":null,"HostIP":"172.18.0.3","ID":199472,"Key":0,"Metadata":"",'
    b'"K8sNamespace":"foo","K8sPodName":"cep-001","K8sServiceAccount":"default"}'
)
IP_BAR_V6 = (
    b'{"IP":"fd00:10:244:2::e024","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"",'
    b'"K8sNamespace":"bar","K8sPodName":"cep-002","K8sServiceAccount":"default"}'
)
SERVICE_NO_BACKENDS = (
    b'{"cluster":"cluster3","namespace":"test","name":"echo",'
    b'"frontends":{"10.96.50.104":{"http":{"Protocol":"TCP","Port":80}}},"backends":{},"labels":{},'
    b'"selector":{"name":"echo"},"includeExternal":true,"shared":true,"clusterID":3}'
)
SERVICE_WITH_ZONES = (
    b'{"cluster":"cluster3","namespace":"test","name":"echo",'
    b'"frontends":{"10.96.50.104":{"http":{"Protocol":"TCP","Port":80}}},'
    b'"backends":{"10.244.1.1":{"http":{"Protocol":"TCP","Port":8080}}},'
    b'"zones":{"10.244.1.1":{"zone":"zone1","forZones":[{"name":"zone1"}]}},"labels":{},'
    b'"selector":{"name":"echo"},"includeExternal":true,"shared":true,"clusterID":3}'
)
SERVICE_UNNAMED_PORT = (
    b'{"cluster":"cluster3","namespace":"test","name":"echo",'
    b'"frontends":{"10.96.50.104":{"":{"Protocol":"TCP","Port":80}}},'
    b'"backends":{"10.244.1.1":{"":{"Protocol":"TCP","Port":9090}}},"labels":{},'
    b'"selector":{"name":"echo"},"includeExternal":true,"shared":true,"clusterID":3}'
)
CLUSTER_CONFIG = (
    b'{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}'
)

ROUND_TRIPS = [
    (wire.Node, NODE_1),
    (wire.Node, NODE_2),
    (wire.IPIdentityPair, IP_FOO),
    (wire.IPIdentityPair, IP_BAR_V6),
    (wire.ClusterService, SERVICE_NO_BACKENDS),
    (wire.ClusterService, SERVICE_WITH_ZONES),
    (wire.ClusterService, SERVICE_UNNAMED_PORT),
    (wire.ClusterConfig, CLUSTER_CONFIG),
]


@pytest.mark.parametrize(("kind", "data"), ROUND_TRIPS, ids=lambda v: getattr(v, "__name__", None))
def test_decode_then_encode_gives_back_the_same_bytes(kind: type[msgspec.Struct], data: bytes) -> None:
    assert wire.encode(wire.decode(kind, "k", data)) == data


def test_node_built_like_the_apiserver_encodes_like_cilium() -> None:
    node = wire.Node(
        Name="test-node-2",
        Cluster="cluster3",
        IPAddresses=[
            wire.Address(Type="InternalIP", IP="172.18.0.3"),
            wire.Address(Type="InternalIP", IP="fc00:c111::3"),
            wire.Address(Type="CiliumInternalIP", IP="10.244.1.130"),
            wire.Address(Type="CiliumInternalIP", IP="fd00:10:244:1::9089"),
        ],
        IPv4AllocCIDR=wire.ip_net("10.244.1.0/24"),
        IPv6AllocCIDR=wire.ip_net("fd00:10:244:1::/64"),
        IPv4HealthIP="10.244.1.153",
        IPv6HealthIP="fd00:10:244:1::835d",
        ClusterID=3,
        Source="custom-resource",
        EncryptionKey=7,
        Labels={"kubernetes.io/hostname": "test-node-2"},
        BootID="c1d2cda2-aca0-4033-abca-3843298860b9",
    )
    assert wire.encode(node) == NODE_2
    assert node.key_name() == "cluster3/test-node-2"


def test_ipcache_entry_built_for_an_endpoint_omits_empty_optional_fields() -> None:
    pair = wire.make_ip_pair(
        ip="10.244.1.79", host_ip="172.18.0.3", identity=199472, namespace="foo", pod_name="cep-001",
        service_account="default",
    )  # fmt: skip
    assert wire.encode(pair) == IP_FOO
    bare = wire.make_ip_pair(ip="10.0.0.1", host_ip="", identity=2)
    assert wire.encode(bare) == b'{"IP":"10.0.0.1","Mask":null,"HostIP":"","ID":2,"Key":0,"Metadata":""}'


def test_ipcache_key_is_the_ip_or_the_cidr() -> None:
    assert wire.decode(wire.IPIdentityPair, "k", IP_FOO).key_name() == "10.244.1.79"
    cidr = wire.IPIdentityPair(IP="10.0.0.0", Mask=bytes([255, 255, 0, 0]), ID=2)
    assert cidr.key_name() == "10.0.0.0/16"


def test_service_without_frontends_decodes_with_empty_maps_like_go() -> None:
    # A remote ClusterService as a third party may write it: missing maps are empty, not null (Go starts from
    # NewClusterService before unmarshalling).
    data = (
        b'{"name":"echo","namespace":"test","includeExternal":true,"shared":true,"cluster":"cluster2",'
        b'"clusterID":2,"backends":{"20.0.0.2":{"tcp":{"Protocol":"TCP","Port":9090}}}}'
    )
    service = wire.decode(wire.ClusterService, "k", data)
    assert service.frontends == {} and service.labels == {}
    assert service.backends == {"20.0.0.2": {"tcp": wire.L4Addr(Protocol="TCP", Port=9090)}}
    assert service.key_name() == "cluster2/test/echo"


def test_cluster_config_as_the_apiserver_writes_it() -> None:
    config = wire.ClusterConfig(
        id=3,
        capabilities=wire.ClusterConfigCapabilities(
            syncedCanaries=True, maxConnectedClusters=255, serviceExportsEnabled=False
        ),
    )
    assert wire.encode(config) == CLUSTER_CONFIG
    cached = msgspec.structs.replace(config, capabilities=msgspec.structs.replace(config.capabilities, cached=True))
    assert b'"cached":true' in wire.encode(cached)


def test_strings_are_escaped_like_go() -> None:
    node = wire.Node(Name="a", Labels={"note": "<b> & \u2028"})
    encoded = wire.encode(node)
    assert b'"note":"\\u003cb\\u003e \\u0026 \\u2028"' in encoded
    assert wire.decode(wire.Node, "k", encoded) == node


@pytest.mark.parametrize(
    ("kind", "data", "reason"),
    [
        (wire.Node, b'{"Name":', "malformed JSON"),
        (wire.Node, b'{"Name":1}', "Expected `str`"),
        (wire.Node, b'{"IPv4HealthIP":"10.1"}', "is not an IP address"),
        (wire.Node, b'{"ClusterID":-1}', ">= 0"),
        (wire.Node, b'{"IPv4AllocCIDR":{"IP":"10.0.0.0","Mask":"AAA="}}', "mask has 2 bytes"),
        (wire.IPIdentityPair, b'{"IP":"not-an-ip"}', "is not an IP address"),
        (wire.IPIdentityPair, b'{"IP":"10.0.0.1","ID":4294967296}', "<= 4294967295"),
        (wire.IPIdentityPair, b'{"IP":"10.0.0.1","Key":256}', "<= 255"),
        (wire.IPIdentityPair, b"[]", "Expected `object`"),
        (wire.ClusterService, b'{"backends":{"nope":{}}}', "is not an IP address"),
        (wire.ClusterService, b'{"backends":{"10.0.0.1":{"x":{"Protocol":"TCP","Port":70000}}}}', "<= 65535"),
        (wire.ClusterConfig, b'{"id":"3"}', "Expected `int`"),
    ],
)
def test_malformed_values_raise_one_typed_error_naming_key_and_reason(
    kind: type[msgspec.Struct], data: bytes, reason: str
) -> None:
    with pytest.raises(InvalidValue) as caught:
        wire.decode(kind, "cilium/state/some/key", data)
    assert caught.value.key == "cilium/state/some/key"
    assert reason in caught.value.reason
    assert str(caught.value).startswith("cilium/state/some/key: ")
