"""The trust boundary, rule by rule: what one cluster's etcd may and may not make an agent believe.

Each row is one attack (or one honest edge case) and the exact phrase its reason starts with: that phrase is the
metric label and what `clustermesh status` shows.
"""

from __future__ import annotations

import pytest

from clustermesh.model import keys, wire
from clustermesh.model.admission import Claimant, Ownership, decoders_for
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import InvalidValue, NotOwned

C2 = ClusterInfo("c2", 2)
C2_511 = ClusterInfo("c2", 2, 511)


def node(name: str = "n1", cluster: str = "c2", cluster_id: int = 2, **fields: object) -> bytes:
    return wire.encode(wire.Node(Name=name, Cluster=cluster, ClusterID=cluster_id, **fields))  # type: ignore[arg-type]


def pair(ip: str, identity: int, mask: bytes | None = None) -> bytes:
    return wire.encode(wire.IPIdentityPair(IP=ip, Mask=mask, ID=identity))


def service(cluster: str = "c2", cluster_id: int = 2, name: str = "echo", backends: tuple[str, ...] = ()) -> bytes:
    return wire.encode(
        wire.ClusterService(
            cluster=cluster,
            namespace="shop",
            name=name,
            clusterID=cluster_id,
            shared=True,
            backends={ip: {"http": wire.L4Addr("TCP", 80)} for ip in backends},
        )
    )


# --- each value alone


DECODE_REJECTS = [
    # (prefix kind, key, value, reason prefix)
    ("node", keys.node_key("c2", "n1"), node(cluster="c1"), "cluster name mismatch: the node says 'c1'"),
    ("node", keys.node_key("c2", "n1"), node(cluster_id=1), "cluster ID mismatch: the node says 1"),
    ("node", keys.node_key("c2", "n1"), node(name="n2"), "name does not match key"),
    ("node", keys.node_key("c2", "n1") + "/deeper", node(), "invalid node key"),
    ("node", keys.node_key("c2", "n1"), b"{nope", "malformed JSON"),
    (
        "node",
        keys.node_key("c2", "n1"),
        b'{"Name":"n1","Cluster":"c2","ClusterID":2,"EncryptionKey":300}',
        "invalid Node",
    ),
    ("ip", keys.ip_key("10.2.1.1"), pair("10.2.1.2", 2 << 16), "IP does not match key"),
    ("ip", keys.ip_key("10.2.1.1"), pair("10.2.1.1", 1 << 16), "identity out of range: 65536"),
    ("ip", keys.ip_key("10.2.1.1"), pair("10.2.1.1", (3 << 16)), "identity out of range: 196608"),
    ("ip", keys.ip_key("10.2.1.1"), pair("10.2.1.1", 0), "identity out of range: 0"),
    ("ip", keys.ip_key("10.2.1.1"), b'{"IP":"10.2.1","ID":131072}', "invalid IPIdentityPair"),
    (
        "ip",
        keys.ip_key("10.2.0.0/16"),
        pair("10.2.0.0", 2 << 16, bytes([255, 255, 255, 0])),
        "IP does not match key",
    ),
    ("identity", keys.identity_key(1 << 16), b"k8s:io.cilium.k8s.policy.cluster=c2;", "identity out of range"),
    ("identity", keys.identities_key_prefix() + "x1", b"k8s:a=b;", "invalid identity key"),
    ("identity", keys.identity_key((2 << 16) + 1), b"k8s:io.cilium.k8s.policy.cluster=c1;", "cluster label mismatch"),
    ("identity", keys.identity_key((2 << 16) + 1), b"k8s:app=web;", "cluster label mismatch: "),
    ("identity", keys.identity_key((2 << 16) + 1), b"\xff\xfe", "malformed labels: not UTF-8"),
    (
        "identity",
        keys.identity_key((2 << 16) + 1),
        b"reserved:io.cilium.k8s.policy.cluster=c2;",
        "cluster label mismatch",
    ),
    ("service", keys.service_key("c2", "shop", "echo"), service(cluster="c1"), "cluster name mismatch"),
    ("service", keys.service_key("c2", "shop", "echo"), service(cluster_id=7), "cluster ID mismatch"),
    ("service", keys.service_key("c2", "shop", "other"), service(), "name does not match key"),
    ("service", keys.service_key("c2", "shop", "echo") + "/x", service(), "invalid service key"),
]


@pytest.mark.parametrize(("kind", "key", "value", "reason"), DECODE_REJECTS)
def test_a_value_alone_is_rejected_with_its_reason(kind: str, key: str, value: bytes, reason: str) -> None:
    decode = getattr(decoders_for(C2), kind)
    with pytest.raises(InvalidValue) as caught:
        decode(key, value)
    assert caught.value.reason.startswith(reason), caught.value.reason
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("cluster", "identity", "accepted"),
    [
        (C2, 1, True),  # reserved identities are shared by every cluster
        (C2, 255, True),
        (C2, 256, False),  # the first of cluster 0's range: nobody's
        (C2, 2 << 16, True),  # the first of c2's range
        (C2, (3 << 16) - 1, True),  # the last
        (C2, 3 << 16, False),
        (C2_511, 2 << 15, True),  # 511 clusters: 15 bits per cluster
        (C2_511, (3 << 15) - 1, True),
        (C2_511, 3 << 15, False),
        (C2_511, 2 << 16, False),  # c2's range in 255 mode is c4's in 511 mode
    ],
)
def test_ipcache_identity_ranges_in_both_mesh_sizes(cluster: ClusterInfo, identity: int, accepted: bool) -> None:
    decode = decoders_for(cluster).ip
    key = keys.ip_key("10.2.1.1")
    if accepted:
        assert identity == decode(key, pair("10.2.1.1", identity)).ID
    else:
        with pytest.raises(InvalidValue, match="identity out of range"):
            decode(key, pair("10.2.1.1", identity))


def test_identity_in_range_with_the_cluster_label_is_accepted() -> None:
    entry = decoders_for(C2_511).identity(
        keys.identity_key((2 << 15) + 5), b"k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c2;"
    )
    assert entry.id == (2 << 15) + 5


# --- ownership of addresses


def make_node(name: str, cluster: str, *cidrs: str, ips: tuple[str, ...] = (), health: str = "") -> wire.Node:
    v4 = [wire.ip_net(c) for c in cidrs if ":" not in c]
    v6 = [wire.ip_net(c) for c in cidrs if ":" in c]
    return wire.Node(
        Name=name,
        Cluster=cluster,
        IPAddresses=[wire.Address(Type="InternalIP", IP=ip) for ip in ips] or None,
        IPv4AllocCIDR=v4[0] if v4 else None,
        IPv4SecondaryAllocCIDRs=v4[1:] or None,
        IPv6AllocCIDR=v6[0] if v6 else None,
        IPv4HealthIP=health,
    )


def mesh() -> Ownership:
    """c1 is local and has n1 (10.1.1.0/24, 192.168.1.11); c2 has n1 (10.2.1.0/24, 192.168.2.11)."""
    ownership = Ownership("c1", ["10.0.0.0/8", "fd00::/8"])
    ownership.admit_node("c1", keys.node_key("c1", "n1"), make_node("n1", "c1", "10.1.1.0/24", ips=("192.168.1.11",)))
    ownership.admit_node("c2", keys.node_key("c2", "n1"), make_node("n1", "c2", "10.2.1.0/24", ips=("192.168.2.11",)))
    ownership.take_changes()
    return ownership


NODE_REJECTS = [
    # (cluster, node, error type, reason prefix)
    ("c2", make_node("n2", "c2", "0.0.0.0/0"), InvalidValue, "pod CIDR outside the mesh: 0.0.0.0/0"),
    ("c2", make_node("n2", "c2", "10.0.0.0/7"), InvalidValue, "pod CIDR outside the mesh"),
    ("c2", make_node("n2", "c2", "192.168.1.0/24"), InvalidValue, "pod CIDR outside the mesh"),
    ("c2", make_node("n2", "c2", "10.2.2.0/24", "11.0.0.0/24"), InvalidValue, "pod CIDR outside the mesh: 11"),
    ("c2", make_node("n2", "c2", "fe80::/64"), InvalidValue, "pod CIDR outside the mesh"),
    (
        "c2",
        make_node("n2", "c2", "10.1.1.0/24"),
        NotOwned,
        "pod CIDR conflict: 10.1.1.0/24 overlaps a pod CIDR of c1/n1",
    ),
    ("c2", make_node("n2", "c2", "10.1.1.128/25"), NotOwned, "pod CIDR conflict"),  # inside c1's
    ("c2", make_node("n2", "c2", "10.1.0.0/16"), NotOwned, "pod CIDR conflict"),  # around c1's
    ("c2", make_node("n2", "c2", "10.1.1.255/32"), NotOwned, "pod CIDR conflict"),  # c1's last address
    (
        "c2",
        make_node("n2", "c2", "10.2.1.0/24"),
        NotOwned,
        "pod CIDR conflict: 10.2.1.0/24 overlaps a pod CIDR of c2/n1",
    ),
    ("c3", make_node("n1", "c3", "10.2.1.0/28"), NotOwned, "pod CIDR conflict"),  # first claim holds
    (
        "c2",
        make_node("n2", "c2", "10.2.2.0/24", ips=("192.168.1.11",)),
        NotOwned,
        "node address conflict: 192.168.1.11 is an address of c1/n1",
    ),
    (
        "c2",
        make_node("n2", "c2", "10.2.2.0/24", ips=("10.1.1.1",)),
        NotOwned,
        "node address conflict: 10.1.1.1 is in a pod CIDR of c1/n1",
    ),
    ("c3", make_node("n1", "c3", "10.3.1.0/24", health="10.2.1.2"), NotOwned, "node address conflict: 10.2.1.2"),
]


@pytest.mark.parametrize(("cluster", "value", "error", "reason"), NODE_REJECTS)
def test_a_node_may_not_claim_what_is_not_its_own(
    cluster: str, value: wire.Node, error: type[InvalidValue], reason: str
) -> None:
    ownership = mesh()
    key = keys.node_key(cluster, value.Name)
    with pytest.raises(InvalidValue) as caught:
        ownership.admit_node(cluster, key, value)
    assert type(caught.value) is error
    assert caught.value.reason.startswith(reason), caught.value.reason
    assert ownership.owner("10.1.1.1") == Claimant("c1", "n1"), "nothing changed hands"
    assert ownership.owner("10.2.1.1") == Claimant("c2", "n1")
    assert ownership.take_changes() == ({}, set(), False)


def test_a_node_may_claim_next_door_and_ipv6() -> None:
    ownership = mesh()
    ownership.admit_node("c2", "k", make_node("n2", "c2", "10.1.2.0/24", "fd00:2::/64", ips=("192.168.2.12",)))
    assert ownership.owner("10.1.2.0") == Claimant("c2", "n2")
    assert ownership.owner("10.1.1.255") == Claimant("c1", "n1")
    assert ownership.owner("fd00:2::17") == Claimant("c2", "n2")
    assert ownership.owner("192.168.2.12") == Claimant("c2", "n2")
    assert ownership.owner("10.1.3.0") is None


def test_a_node_may_move_its_own_cidr_and_the_old_one_is_free() -> None:
    ownership = mesh()
    ownership.admit_node("c2", "k", make_node("n1", "c2", "10.2.0.0/16", ips=("192.168.2.11",)))  # grows over itself
    assert ownership.owner("10.2.200.1") == Claimant("c2", "n1")
    ownership.admit_node("c2", "k", make_node("n1", "c2", "10.2.9.0/24", ips=("192.168.2.11",)))
    assert ownership.owner("10.2.1.1") is None
    evicted, shrunk, changed = ownership.take_changes()
    assert (evicted, shrunk, changed) == ({}, {"c2"}, True)


def test_the_local_cluster_takes_over_and_names_what_it_evicts() -> None:
    ownership = mesh()
    ownership.admit_node("c1", "k", make_node("n2", "c1", "10.2.0.0/16", ips=("192.168.2.11",)))
    evicted, shrunk, changed = ownership.take_changes()
    assert list(evicted) == [Claimant("c2", "n1")]
    assert (
        evicted[Claimant("c2", "n1")] == "pod CIDR conflict: 10.2.0.0/16 overlaps a pod CIDR of c1/n2 (local: it wins)"
    )
    assert shrunk == {"c2"} and changed
    assert ownership.owner("10.2.1.1") == Claimant("c1", "n2")
    with pytest.raises(NotOwned, match="pod CIDR conflict"):  # and it cannot come back while c1 holds it
        ownership.admit_node("c2", "k", make_node("n1", "c2", "10.2.1.0/24"))


def test_released_addresses_can_be_claimed_again() -> None:
    ownership = mesh()
    ownership.release_node("c2", "n1")
    assert ownership.owner("10.2.1.1") is None and ownership.owner("192.168.2.11") is None
    ownership.admit_node("c3", "k", make_node("n1", "c3", "10.2.1.0/24", ips=("192.168.2.11",)))
    assert ownership.owner("10.2.1.1") == Claimant("c3", "n1")


def test_a_pinned_node_keeps_its_addresses_when_its_published_node_goes() -> None:
    ownership = Ownership("c1", ["10.0.0.0/8"])
    ownership.pin_node("c1", make_node("n1", "c1", "10.1.1.0/24"))
    ownership.admit_node("c1", "k", make_node("n1", "c1", "10.1.1.0/24", ips=("192.168.1.11",)))
    ownership.release_node("c1", "n1")  # the local etcd was wiped
    assert ownership.owner("10.1.1.1") == Claimant("c1", "n1")
    with pytest.raises(NotOwned):
        ownership.admit_node("c2", "k", make_node("n9", "c2", "10.1.1.0/24"))


IP_CASES = [
    # (cluster, key IP or CIDR, admitted?)
    ("c2", "10.2.1.0", True),  # the network address of its CIDR
    ("c2", "10.2.1.255", True),
    ("c2", "10.2.2.0", False),  # just outside
    ("c2", "192.168.2.11", True),  # a node address of its own
    ("c2", "10.1.1.10", False),  # c1's pod
    ("c2", "192.168.1.11", False),  # c1's node
    ("c1", "10.1.1.10", True),
    ("c2", "8.8.8.8", False),
    ("c2", "10.2.1.0/25", True),  # a CIDR entry inside its pod CIDR
    ("c2", "10.2.0.0/16", False),  # a CIDR entry reaching beyond it
    ("c2", "10.1.1.0/24", False),
]


@pytest.mark.parametrize(("cluster", "ip", "admitted"), IP_CASES)
def test_an_endpoint_lies_in_its_own_cluster(cluster: str, ip: str, admitted: bool) -> None:
    ownership = mesh()
    address, _, length = ip.partition("/")
    mask = wire.ip_net(ip).Mask if length else None
    value = wire.IPIdentityPair(IP=address, Mask=mask, ID=2 << 16)
    if admitted:
        ownership.admit_ip(cluster, keys.ip_key(ip), value)
    else:
        with pytest.raises(NotOwned, match="address not owned") as caught:
            ownership.admit_ip(cluster, keys.ip_key(ip), value)
        assert caught.value.value is value, "the decoded value travels with the refusal, to be held"


def test_a_service_backend_lies_in_its_own_cluster() -> None:
    ownership = mesh()
    good = wire.ClusterService(cluster="c2", namespace="shop", name="echo", backends={"10.2.1.7": {}})
    ownership.admit_service("c2", "k", good)
    bad = wire.ClusterService(cluster="c2", namespace="shop", name="echo", backends={"10.2.1.7": {}, "10.1.1.7": {}})
    with pytest.raises(NotOwned, match=r"address not owned: backend 10\.1\.1\.7 belongs to c1/n1, not to c2"):
        ownership.admit_service("c2", "k", bad)
