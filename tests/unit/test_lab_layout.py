"""The lab's names and addresses: what `lab up` builds, what `lab down` finds again by name, and the errors a user
gets for a bad name, size or pod reference."""

from __future__ import annotations

import ipaddress
from itertools import combinations
from pathlib import Path

import pytest

from agent.datapath.ipam import IPAM
from clustermesh.lab.layout import MAX_CLUSTERS, MAX_NODES, MAX_PODS, LabError, LabLayout, validate_lab_name

IFNAMSIZ = 15  # the longest interface name Linux takes


@pytest.mark.parametrize("name", ["a", "lab", "a1", "abcdefgh", "x9y8z7w6"])
def test_good_lab_names_are_accepted(name: str) -> None:
    assert validate_lab_name(name) == name
    assert LabLayout(name, 1, 1, 1).name == name


@pytest.mark.parametrize(
    "name", ["", "1lab", "Lab", "my-lab", "my_lab", "abcdefghi", "lab.1", "lab 1", " lab", "ünï", "lab/x"]
)
def test_bad_lab_names_are_rejected_with_the_rule(name: str) -> None:
    with pytest.raises(LabError) as raised:
        validate_lab_name(name)
    assert str(raised.value).startswith(f"lab name {name!r} is invalid: 1 to 8 lower-case letters and digits")
    with pytest.raises(LabError):
        LabLayout(name, 1, 1, 1)


def test_a_lab_name_with_a_trailing_newline_is_rejected() -> None:
    """`$` matches before a final newline: "lab\\n" passes and would name namespaces "lab\\n-world" and so on."""
    with pytest.raises(LabError):
        validate_lab_name("lab\n")


def test_the_names_and_addresses_of_a_cluster_a_node_and_a_pod() -> None:
    layout = LabLayout("lab", clusters=3, nodes=4, pods=5)
    assert layout.world_netns == "lab-world"

    cluster = layout.cluster(2)
    assert (cluster.name, cluster.id, cluster.bridge) == ("c2", 2, "br2")
    assert (cluster.subnet, cluster.gateway) == ("192.168.2.0/24", "192.168.2.1")
    assert (cluster.control_plane_netns, cluster.control_plane_ip) == ("lab-c2-cp", "192.168.2.2")
    assert cluster.etcd_url == "https://192.168.2.2:2379"

    node = cluster.node(3)
    assert (node.name, node.netns, node.ip) == ("c2-node-3", "lab-c2-n3", "192.168.2.13")
    assert (node.pod_cidr, node.router_ip) == ("10.2.3.0/24", "10.2.3.1")
    assert (node.world_veth, node.wireguard_interface) == ("v2n3", "lab2n3")

    pod = node.pods(5)[0]
    assert (pod.name, pod.netns) == ("pod-3-1", "lab-c2-pod-3-1")


def test_every_address_is_in_its_subnet_and_none_is_used_twice() -> None:
    layout = LabLayout("lab", MAX_CLUSTERS, MAX_NODES, 3)
    underlay: list[str] = []
    pod_cidrs: list[ipaddress.IPv4Network] = []
    for cluster in layout.all_clusters():
        subnet = ipaddress.ip_network(cluster.subnet)
        underlay += [cluster.gateway, cluster.control_plane_ip]
        for node in (cluster.node(n) for n in range(1, layout.nodes + 1)):
            assert ipaddress.ip_address(node.ip) in subnet
            assert ipaddress.ip_address(node.router_ip) in ipaddress.ip_network(node.pod_cidr)
            underlay.append(node.ip)
            pod_cidrs.append(ipaddress.IPv4Network(node.pod_cidr))
    assert len(set(underlay)) == len(underlay)
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("192.168.0.0/16") for ip in underlay)
    assert not any(a.overlaps(b) for a, b in combinations(pod_cidrs, 2)), "pod CIDRs of two nodes overlap"
    assert all(cidr.subnet_of(ipaddress.IPv4Network("10.0.0.0/8")) for cidr in pod_cidrs)


def test_the_sizes_the_lab_knows() -> None:
    layout = LabLayout("lab", clusters=2, nodes=3, pods=4)
    assert [c.name for c in layout.all_clusters()] == ["c1", "c2"]
    assert [n.name for n in layout.all_nodes()] == [f"c{c}-node-{n}" for c in (1, 2) for n in (1, 2, 3)]
    pods = layout.all_pods()
    assert len(pods) == 2 * 3 * 4
    assert len({p.netns for p in pods}) == len(pods)


def lab_names(name: str) -> tuple[set[str], set[str]]:
    """Every namespace and every WireGuard interface a lab of the largest size makes."""
    layout = LabLayout(name, MAX_CLUSTERS, MAX_NODES, 3)
    namespaces = {layout.world_netns}
    namespaces |= {c.control_plane_netns for c in layout.all_clusters()}
    namespaces |= {n.netns for n in layout.all_nodes()}
    namespaces |= {p.netns for p in layout.all_pods()}
    return namespaces, {n.wireguard_interface for n in layout.all_nodes()}


LABS = ["a", "a1", "a11", "a1n1", "a1c1", "ac1", "b", "world", "c1"]


def test_two_labs_never_share_a_namespace_or_a_wireguard_interface() -> None:
    """Two labs run side by side on one host; `lab down` of one must not touch the other's."""
    names = {lab: lab_names(lab) for lab in LABS}
    for one, other in combinations(LABS, 2):
        assert not names[one][0] & names[other][0], f"labs {one} and {other} share namespaces"
        assert not names[one][1] & names[other][1], f"labs {one} and {other} share WireGuard interfaces"


def test_the_prefix_lab_down_looks_for_finds_exactly_its_own_namespaces() -> None:
    """`lab down a` removes the namespaces starting with `a-`: none of lab a1's, and every one of its own."""
    every = {lab: lab_names(lab)[0] for lab in LABS}
    union = set().union(*every.values())
    for lab, namespaces in every.items():
        assert {ns for ns in union if ns.startswith(f"{lab}-")} == namespaces


def test_interface_names_fit_the_kernel_limit_for_the_longest_lab_name() -> None:
    layout = LabLayout("abcdefgh", MAX_CLUSTERS, MAX_NODES, 1)
    for cluster in layout.all_clusters():
        assert len(cluster.bridge) <= IFNAMSIZ
        assert len(cluster.control_plane_veth) <= IFNAMSIZ
    for node in layout.all_nodes():
        assert len(node.wireguard_interface) <= IFNAMSIZ
        assert len(node.world_veth) <= IFNAMSIZ


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((0, 1, 1), "--clusters 0 is out of range 1..9"),
        ((MAX_CLUSTERS + 1, 1, 1), "--clusters 10 is out of range 1..9"),
        ((1, 0, 1), "--nodes 0 is out of range 1..9"),
        ((1, MAX_NODES + 1, 1), "--nodes 10 is out of range 1..9"),
        ((1, 1, 0), "--pods 0 is out of range 1..200"),
        ((1, 1, MAX_PODS + 1), "--pods 201 is out of range 1..200"),
        ((1, 1, -1), "--pods -1 is out of range 1..200"),
    ],
)
def test_sizes_out_of_range_are_rejected(sizes: tuple[int, int, int], message: str) -> None:
    with pytest.raises(LabError) as raised:
        LabLayout("lab", *sizes)
    assert str(raised.value) == message


def test_the_largest_lab_is_accepted() -> None:
    layout = LabLayout("lab", MAX_CLUSTERS, MAX_NODES, MAX_PODS)
    assert len(layout.all_nodes()) == MAX_CLUSTERS * MAX_NODES


@pytest.mark.parametrize("routing", ["wireguard", "ipsec", "vxlan", "native"])
def test_each_known_routing_is_accepted(routing: str) -> None:
    assert LabLayout("lab", 1, 1, 1, routing).routing == routing


@pytest.mark.parametrize("routing", ["bgp", "WireGuard", ""])
def test_an_unknown_routing_is_rejected_with_the_choices(routing: str) -> None:
    with pytest.raises(LabError) as raised:
        LabLayout("lab", 1, 1, 1, routing)
    assert str(raised.value) == f"--routing {routing!r}: choose wireguard, ipsec, vxlan or native"


def test_find_pod_finds_a_pod_by_cluster_and_name() -> None:
    layout = LabLayout("lab", 2, 2, 2)
    pod = layout.find_pod("c2/pod-1-2")
    assert (pod.cluster, pod.node, pod.index) == (2, 1, 2)
    assert pod.netns == "lab-c2-pod-1-2"


@pytest.mark.parametrize("reference", ["c3/pod-1-1", "c1/pod-1-3", "pod-1-1", "c1/pod-3-1", "c1/", "/pod-1-1"])
def test_find_pod_names_the_pods_that_exist(reference: str) -> None:
    layout = LabLayout("lab", 2, 2, 2)
    with pytest.raises(LabError) as raised:
        layout.find_pod(reference)
    message = str(raised.value)
    assert message.startswith(f"no pod {reference!r} in lab lab")
    assert "c1/pod-1-1" in message
    assert "c1/pod-1-2" in message


def test_the_layout_pod_ip_is_the_address_the_node_gives_that_pod(tmp_path: Path) -> None:
    """The lab attaches pod-<n>-1, pod-<n>-2, ... in order on a fresh node, and the node's IPAM hands out addresses
    lowest first from .10: the address the layout announces for each pod is the one its node gives it."""
    node = LabLayout("lab", 1, 1, 3).cluster(1).node(1)
    ipam = IPAM(node.pod_cidr, tmp_path / "ipam.json")
    for pod in node.pods(3):
        assert ipam.allocate(pod.name) == pod.ip
