"""The IPAM of a node's pod CIDR: which address a pod gets, and that a restarted agent never hands out one in use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.datapath.ipam import IPAM, IPAMExhausted


def test_pods_start_at_dot_ten_and_get_the_lowest_free_address(tmp_path: Path) -> None:
    """.1 is the node's router IP and .2-.9 are kept for the node's own use: the first pod is .10."""
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    assert [ipam.allocate(f"container-{n}") for n in range(3)] == ["10.1.2.10", "10.1.2.11", "10.1.2.12"]


def test_a_cidr_given_with_host_bits_is_its_network(tmp_path: Path) -> None:
    """A pod CIDR written as the router IP with its prefix (10.1.2.1/24) still allocates from 10.1.2.0/24."""
    ipam = IPAM("10.1.2.1/24", tmp_path / "ipam.json")
    assert ipam.allocate("a") == "10.1.2.10"


def test_the_same_owner_gets_the_same_address(tmp_path: Path) -> None:
    """A CNI ADD retried for one container must not take a second address."""
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    first = ipam.allocate("a")
    ipam.allocate("b")
    assert ipam.allocate("a") == first
    assert len(set(ipam.allocated.values())) == 2


def test_a_released_address_is_reused_lowest_first(tmp_path: Path) -> None:
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    for owner in ("a", "b", "c"):
        ipam.allocate(owner)
    assert ipam.release("b") == "10.1.2.11"
    assert ipam.owner_of("10.1.2.11") is None
    assert ipam.allocate("d") == "10.1.2.11"
    assert ipam.owner_of("10.1.2.11") == "d"
    assert ipam.allocate("e") == "10.1.2.13"


def test_releasing_an_unknown_owner_changes_nothing(tmp_path: Path) -> None:
    """CNI DEL may come twice, or for a pod that never got an address."""
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    ipam.allocate("a")
    assert ipam.release("nobody") is None
    assert ipam.allocated == {"a": "10.1.2.10"}


def test_a_restarted_agent_keeps_the_allocations(tmp_path: Path) -> None:
    """A new IPAM over the same file knows every address in use and hands out none of them again."""
    path = tmp_path / "ipam.json"
    before = IPAM("10.1.2.0/24", path)
    for owner in ("a", "b", "c"):
        before.allocate(owner)
    before.release("b")

    after = IPAM("10.1.2.0/24", path)
    assert after.allocated == {"a": "10.1.2.10", "c": "10.1.2.12"}
    assert after.allocate("c") == "10.1.2.12"
    assert after.allocate("d") == "10.1.2.11"
    assert IPAM("10.1.2.0/24", path).owner_of("10.1.2.11") == "d"


def test_the_state_file_is_created_where_asked(tmp_path: Path) -> None:
    """The agent's state folder may not exist yet on a fresh node."""
    path = tmp_path / "state" / "node" / "ipam.json"
    IPAM("10.1.2.0/24", path).allocate("a")
    assert json.loads(path.read_text()) == {"a": "10.1.2.10"}


def test_an_exhausted_cidr_raises_with_the_cidr_and_the_count(tmp_path: Path) -> None:
    """A /28 has 14 hosts; 9 are reserved: 5 pods fit (.10 to .14), the sixth gets a clear error."""
    ipam = IPAM("10.1.2.0/28", tmp_path / "ipam.json")
    assert [ipam.allocate(f"p{n}") for n in range(5)] == [f"10.1.2.{n}" for n in range(10, 15)]
    with pytest.raises(IPAMExhausted, match=r"no free address left in 10\.1\.2\.0/28 \(5 in use\)"):
        ipam.allocate("p5")
    assert "p5" not in ipam.allocated
    ipam.release("p2")
    assert ipam.allocate("p5") == "10.1.2.12"


def test_the_broadcast_address_is_never_handed_out(tmp_path: Path) -> None:
    ipam = IPAM("10.1.2.0/28", tmp_path / "ipam.json")
    handed_out: set[str] = set()
    with pytest.raises(IPAMExhausted):
        while True:
            handed_out.add(ipam.allocate(f"p{len(handed_out)}"))
    assert "10.1.2.15" not in handed_out
    assert "10.1.2.0" not in handed_out


def test_a_reserved_address_found_in_use_is_not_handed_out(tmp_path: Path) -> None:
    """An address the node still routes to a pod (its owner unknown after the state was lost) stays taken."""
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    ipam.reserve("10.1.2.10")
    ipam.reserve("10.9.9.9")  # outside the pod CIDR: not ours, ignored
    assert ipam.allocate("a") == "10.1.2.11"
    assert "10.9.9.9" not in ipam.allocated.values()
    assert "10.1.2.10" in IPAM("10.1.2.0/24", tmp_path / "ipam.json").allocated.values()


def test_an_address_recovered_on_a_pods_interface_goes_with_that_pods_delete(tmp_path: Path) -> None:
    """The state was lost, the routes were found again: the container's DEL (or a repeated ADD) names the pod by
    its node-side interface, so its address is freed (or handed back) rather than kept for ever."""
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    ipam.reserve("10.1.2.10", device="lxc-a")
    ipam.reserve("10.1.2.11", device="lxc-b")
    assert ipam.release("container-x", device="lxc-other") is None  # another pod's interface frees nothing
    assert ipam.release("container-a", device="lxc-a") == "10.1.2.10"
    assert ipam.allocate("container-b", device="lxc-b") == "10.1.2.11"  # the same pod keeps its address
    assert ipam.allocate("container-c") == "10.1.2.10"
    assert IPAM("10.1.2.0/24", tmp_path / "ipam.json").allocated == {
        "container-b": "10.1.2.11",
        "container-c": "10.1.2.10",
    }


def test_reserving_an_allocated_address_keeps_its_owner(tmp_path: Path) -> None:
    ipam = IPAM("10.1.2.0/24", tmp_path / "ipam.json")
    ipam.allocate("a")
    ipam.reserve("10.1.2.10")
    assert ipam.allocated == {"a": "10.1.2.10"}


@pytest.mark.parametrize("content", ["{not json", '["10.1.2.10"]', '{"a": 10}'])
def test_an_unreadable_state_file_is_set_aside_not_overwritten(tmp_path: Path, content: str) -> None:
    """The broken file stays for a human to read; the IPAM starts empty (the routes tell it what is in use)."""
    path = tmp_path / "ipam.json"
    path.write_text(content)
    ipam = IPAM("10.1.2.0/24", path)
    assert ipam.allocated == {}
    assert (tmp_path / "ipam.json.corrupt").read_text() == content
    ipam.allocate("a")
    assert json.loads(path.read_text()) == {"a": "10.1.2.10"}
