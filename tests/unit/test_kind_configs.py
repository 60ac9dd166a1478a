"""The kind configs (kind-configs/) load as kind v1alpha4 would load them, and are laid out as Cilium's clustermesh
CI lays its own: no default CNI, no kube-proxy, distinct subnets per cluster, a node image pinned by digest. The
checker itself is shown to refuse what kind refuses."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kindconfig import validate_kind_config

CONFIGS = Path(__file__).parents[2] / "kind-configs"
SETS = {"two-clusters": 2, "three-clusters": 3}


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/cluster*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_config_loads_as_kind_v1alpha4_would_load_it(path: Path) -> None:
    config = load(path)
    assert validate_kind_config(config) == []
    networking = config["networking"]
    assert networking["disableDefaultCNI"] is True, "the mesh's agent is the CNI"
    assert networking["kubeProxyMode"] == "none", "the mesh's load balancer replaces kube-proxy"
    for node in config["nodes"]:
        assert "@sha256:" in node["image"], "the node image is pinned by digest"


@pytest.mark.parametrize(("folder", "count"), SETS.items())
def test_each_set_has_its_clusters_with_subnets_that_do_not_overlap(folder: str, count: int) -> None:
    configs = [load(path) for path in sorted((CONFIGS / folder).glob("cluster*.yaml"))]
    assert len(configs) == count
    assert len({c["name"] for c in configs}) == count
    subnets = [ipaddress.ip_network(c["networking"][key]) for c in configs for key in ("podSubnet", "serviceSubnet")]
    for one, other in itertools.combinations(subnets, 2):
        assert not one.overlaps(other), f"{one} and {other}"


BASE = {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4"}


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({**BASE, "networking": {"disableDefaultCni": True}}, "networking.disableDefaultCni: unknown field"),
        ({**BASE, "nodes": [{"role": "worker"}]}, "at least one control-plane"),
        ({**BASE, "nodes": [{"role": "master"}]}, "nodes[0].role"),
        ({**BASE, "networking": {"kubeProxyMode": "userspace"}}, "kubeProxyMode"),
        ({**BASE, "networking": {"podSubnet": "10.1.0.0/33"}}, "is not a CIDR"),
        ({**BASE, "networking": {"ipFamily": "dual", "podSubnet": "10.1.0.0/16"}}, "does not match ipFamily dual"),
        ({**BASE, "name": "Cluster_1"}, "name:"),
        ({**BASE, "networking": {"apiServerPort": 70000}}, "out of -1..65535"),
        ({**BASE, "apiVersion": "kind.x-k8s.io/v1alpha3"}, "kind/apiVersion"),
        ({**BASE, "nodes": [{"role": "control-plane", "extraPortMappings": [
            {"containerPort": 80, "hostPort": 8080}, {"containerPort": 81, "hostPort": 8080}]}]}, "host port 8080"),
        ({**BASE, "nodes": [{"role": "control-plane", "image": 5}]}, "nodes[0].image: expected str"),
    ],
)  # fmt: skip
def test_the_checker_refuses_what_kind_refuses(config: dict[str, Any], problem: str) -> None:
    found = validate_kind_config(config)
    assert any(problem in text for text in found), found


def test_a_minimal_config_is_valid() -> None:
    assert validate_kind_config(dict(BASE)) == []
