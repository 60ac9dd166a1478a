"""The lab's cgroups (v2): one per node, where its agent attaches the socket load balancer (`--cgroup-root`), and one
per pod below it, where every process of the pod runs (`lab exec` moves itself there before it becomes the command).

    <cgroup2 mount>/clustermesh-lab/<lab>/<node>/<pod's namespace>

A pod's processes are in its cgroup as a container's are; a process a test starts with plain `nsenter` is not,
and its connections to a ClusterIP are not load-balanced (the per-packet path would catch them). Removing a node
or the lab stops what is left in its cgroups and removes them, deepest first.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from bpf.loader import cgroup2_mount
from clustermesh.lab import netns

__all__ = ["join", "lab_cgroup", "make", "node_cgroup", "pod_cgroup", "remove_tree"]


def lab_cgroup(lab: str) -> Path:
    return cgroup2_mount() / "clustermesh-lab" / lab


def node_cgroup(lab: str, node: str) -> Path:
    return lab_cgroup(lab) / node


def pod_cgroup(lab: str, node: str, pod_netns: str) -> Path:
    return node_cgroup(lab, node) / pod_netns


def make(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def join(path: Path, pid: int | None = None) -> None:
    """Move a process (this one by default) into the cgroup; the children it starts afterwards are in it too."""
    (path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def _processes(path: Path) -> list[int]:
    pids = []
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(line) for line in procs.read_text().split()]
    return pids


def remove_tree(path: Path) -> bool:
    """Stop whatever still runs below `path`, then remove its cgroups, deepest first; whether there were any."""
    if not path.exists():
        return False
    netns.stop_processes(_processes(path))
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()
    return True
