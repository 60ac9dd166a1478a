"""The lab's state file (lab.json): what `lab up` writes is what every later command (status, exec, node add,
down) reads back, and a lab that is not there is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from clustermesh.lab import layout
from clustermesh.lab.lab import LabState, load
from clustermesh.lab.layout import LabError


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The labs' state folders under tmp_path instead of /run/clustermesh-lab."""
    monkeypatch.setattr(layout, "STATE_ROOT", tmp_path)
    return tmp_path


def a_state() -> LabState:
    return LabState(
        name="lab",
        clusters=2,
        pods_per_node=2,
        routing="ipsec",
        nodes={"c1": [1, 2], "c2": [1, 3]},  # c2-node-2 was removed, c2-node-3 added
        pods={"c1/pod-1-1": {"netns": "lab-c1-pod-1-1", "ip": "10.1.1.10", "node": "c1-node-1"}},
    )


def test_a_saved_state_loads_back_equal(state_root: Path) -> None:
    state = a_state()
    (state_root / "lab").mkdir()
    state.save(state_root / "lab")
    loaded = load("lab")
    assert loaded == state
    assert loaded.nodes["c2"] == [1, 3]


def test_the_loaded_layout_covers_every_node_that_exists(state_root: Path) -> None:
    """A node added at run time (index 3) makes the layout 3 nodes wide; the gap left by a removal is no node."""
    (state_root / "lab").mkdir()
    a_state().save(state_root / "lab")
    loaded = load("lab")
    assert (loaded.layout.name, loaded.layout.clusters, loaded.layout.nodes) == ("lab", 2, 3)
    assert (loaded.layout.pods, loaded.layout.routing) == (2, "ipsec")
    assert [n.name for n in loaded.node_layouts()] == ["c1-node-1", "c1-node-2", "c2-node-1", "c2-node-3"]
    assert [n.netns for n in loaded.node_layouts()][-1] == "lab-c2-n3"


def test_a_state_without_nodes_still_has_a_layout() -> None:
    """Between `lab up` writing its first state and the nodes being recorded, or after every node was removed."""
    state = LabState("lab", 1, 1, "wireguard", nodes={"c1": []})
    assert state.layout.nodes == 1
    assert state.node_layouts() == []


def test_loading_a_lab_that_is_not_there_says_how_to_start_one(state_root: Path) -> None:
    with pytest.raises(LabError) as raised:
        load("nolab")
    message = str(raised.value)
    assert "no lab 'nolab' here" in message
    assert str(state_root / "nolab" / "lab.json") in message
    assert "`clustermesh lab up --name nolab`" in message


def test_loading_a_lab_by_a_bad_name_is_a_lab_error(state_root: Path) -> None:
    """A name that could never be a lab is refused before any path is built from it."""
    with pytest.raises(LabError, match="is invalid"):
        load("../etc")


def test_pods_are_found_by_cluster_namespace_and_name_or_by_the_old_form() -> None:
    from clustermesh.lab.pods import find_pod, pod_key

    state = a_state()
    state.pods[pod_key(2, "shop", "web")] = {"netns": "lab-c2-shop.web", "ip": "10.2.1.11", "node": "c2-node-1"}
    assert find_pod(state, "c1/pod-1-1")[0] == "c1/pod-1-1"
    assert find_pod(state, "c1/default/pod-1-1")[0] == "c1/pod-1-1"  # the pods `up` makes live in default
    assert find_pod(state, "c2/shop/web")[1]["ip"] == "10.2.1.11"
    with pytest.raises(LabError, match="no pod 'c1/shop/web'"):
        find_pod(state, "c1/shop/web")
    with pytest.raises(LabError, match="CLUSTER/NAMESPACE/NAME"):
        find_pod(state, "c1/a/b/c")


def test_pod_labels_are_kubernetes_labels_or_a_clear_error() -> None:
    from clustermesh.lab.pods import parse_labels

    assert parse_labels("app=web,tier=db, example.com/team=a") == {"app": "web", "tier": "db", "example.com/team": "a"}
    assert parse_labels("") == {}
    for bad in ("app", "app=we b", "=x", "a=b;c", "app=x:y"):
        with pytest.raises(LabError, match="expected key=value"):
            parse_labels(bad)
