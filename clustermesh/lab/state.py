"""What a lab is, on disk and in a process: its state file, and the context every job of the lab works in.

The state folder `/run/clustermesh-lab/<lab>/` holds `lab.json` (clusters, nodes, pods), the PKI, each node's
folder (its agent's state and socket) and the processes' logs: every later command finds the lab there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certs
from clustermesh.lab import netns
from clustermesh.lab.layout import LabError, LabLayout, NodeLayout
from clustermesh.processes.child import Child
from kvstore.config import EtcdConfig

__all__ = ["BIN", "LabContext", "LabExists", "LabState", "Progress", "load", "require_root"]

BIN = Path(sys.executable).parent
Progress = Callable[[str], None]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, WireGuard): run it with sudo, or as root")


class LabExists(LabError):
    """`up` found a lab of that name: it refuses and leaves it alone."""


@dataclass
class LabState:
    """What a lab is made of, on disk in its state folder (lab.json), so that every later command finds it."""

    name: str
    clusters: int
    pods_per_node: int
    routing: str
    nodes: dict[str, list[int]] = field(default_factory=dict)  # "c1" -> node indexes
    #: "c1/pod-1-1" (made by `up`) or "c1/NS/NAME" (`lab pod add`) -> {"netns", "ip", "node"[, "namespace", "name",
    #: "labels"]}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent_args: list[str] = field(default_factory=list)  # more flags for every agent (`lab up --agent-arg`)
    #: "c1/NS/NAME" -> {"selector", "ports"}: the Services `lab service add` made, whose EndpointSlices it keeps
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "standalone"

    @property
    def layout(self) -> LabLayout:
        most = max((max(indexes) for indexes in self.nodes.values() if indexes), default=1)
        return LabLayout(self.name, self.clusters, most, self.pods_per_node, self.routing, self.source)

    def save(self, directory: Path) -> None:
        (directory / "lab.json").write_text(json.dumps(self.__dict__, indent=1, sort_keys=True))

    def node_layouts(self) -> list[NodeLayout]:
        layout = self.layout
        return [layout.cluster(int(c[1:])).node(n) for c, indexes in sorted(self.nodes.items()) for n in indexes]


def load(name: str) -> LabState:
    path = LabLayout(name, 1, 1, 1).state_dir / "lab.json"
    if not path.exists():
        raise LabError(f"no lab {name!r} here (no {path}): start one with `clustermesh lab up --name {name}`")
    return LabState(**json.loads(path.read_text()))


class LabContext:
    """One lab as the jobs of the lab see it (underlay, control plane, nodes, pods): its layout, its state, where
    its files are, and how to start a process in one of its namespaces."""

    def __init__(self, layout: LabLayout, *, progress: Progress = print) -> None:
        self.layout = layout
        self.progress = progress
        self.state_dir = layout.state_dir
        self.state = LabState(layout.name, layout.clusters, layout.pods, layout.routing, source=layout.source)
        self.ca: certs.Issued | None = None

    def pki(self, cluster: int) -> certs.ClusterPKI:
        return certs.ClusterPKI(self.state_dir / f"c{cluster}" / "pki")

    def node_dir(self, node: NodeLayout) -> Path:
        return self.state_dir / node.name

    def socket(self, node: NodeLayout) -> Path:
        return self.node_dir(node) / "agent.sock"

    def relay_socket(self, cluster: int) -> Path:
        return self.state_dir / f"c{cluster}" / "relay.sock"

    def kubeconfig(self, cluster: int, user: str) -> Path:
        """With `--source kubernetes`: the kubeconfig of `user` (apiserver, agent, admin; host: admin through the
        host's loopback) for the cluster's stand-in API server."""
        return self.state_dir / f"c{cluster}" / f"kubeconfig-{user}.yaml"

    def config(self, cluster: int, user: str) -> EtcdConfig:
        pki = self.pki(cluster)
        paths = pki.user(user)
        if not paths.cert.exists():
            certs.issue_user(pki, user)
        return EtcdConfig([self.layout.cluster(cluster).etcd_url], pki.ca.cert, paths.cert, paths.key)

    def child(self, name: str, namespace: str, command: list[str], ready: str) -> Child:
        child = Child(name, [*netns.nsenter(namespace), *command], self.state_dir / "logs" / f"{name}.log")
        child.start()
        child.wait_for(ready)
        return child
