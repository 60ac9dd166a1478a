"""The lab's names and addresses, derived from its name and size, in one place (pure: no I/O).

    world namespace   <lab>-world       the underlay: a bridge per cluster (br<c>, 192.168.<c>.1/24), routing
                                        between them; no default route anywhere
    control plane     <lab>-c<c>-cp     etcd and the apiserver of cluster c, 192.168.<c>.2
    node              <lab>-c<c>-n<n>   the agent of node n, 192.168.<c>.<10+n>, pod CIDR 10.<c>.<n>.0/24,
                                        router IP 10.<c>.<n>.1
    pod               <lab>-c<c>-<pod>  pod-<n>-<k>, IP 10.<c>.<n>.<9+k> (the first .10)

Every name the lab makes carries the lab's name: namespaces (`<lab>-...`), WireGuard interfaces (`<lab><c>n<n>`:
their control sockets live in the host's /var/run/wireguard, shared by every namespace) and the state folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClusterLayout", "LabLayout", "NodeLayout", "PodLayout", "validate_lab_name"]

LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
STATE_ROOT = Path("/run/clustermesh-lab")
#: Where the lab's nodes pin their eBPF programs and maps: one folder per lab, one per node in it.
BPF_ROOT = Path("/sys/fs/bpf/clustermesh-lab")
POD_SUPERNET = "10.0.0.0/8"
UNDERLAY_SUPERNET = "192.168.0.0/16"
WIREGUARD_PORT = 51871
MAX_CLUSTERS = 9
MAX_NODES = 9
MAX_PODS = 200


class LabError(Exception):
    """Something a user of the lab can fix; the message says what."""


def validate_lab_name(name: str) -> str:
    if not LAB_NAME.fullmatch(name):
        raise LabError(
            f"lab name {name!r} is invalid: 1 to 8 lower-case letters and digits, starting with a letter "
            "(it prefixes every interface name, and those are limited to 15 characters)"
        )
    return name


@dataclass(frozen=True)
class PodLayout:
    cluster: int
    node: int
    index: int
    lab: str

    @property
    def name(self) -> str:
        return f"pod-{self.node}-{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lab}-c{self.cluster}-{self.name}"

    @property
    def ip(self) -> str:
        return f"10.{self.cluster}.{self.node}.{9 + self.index}"  # the node's IPAM hands out .10 first


@dataclass(frozen=True)
class NodeLayout:
    cluster: int
    index: int
    lab: str

    @property
    def name(self) -> str:
        return f"c{self.cluster}-node-{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lab}-c{self.cluster}-n{self.index}"

    @property
    def ip(self) -> str:
        return f"192.168.{self.cluster}.{10 + self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.cluster}.{self.index}.0/24"

    @property
    def router_ip(self) -> str:
        return f"10.{self.cluster}.{self.index}.1"

    @property
    def world_veth(self) -> str:
        return f"v{self.cluster}n{self.index}"

    @property
    def wireguard_interface(self) -> str:
        return f"{self.lab}{self.cluster}n{self.index}"

    def pods(self, count: int) -> list[PodLayout]:
        return [PodLayout(self.cluster, self.index, k, self.lab) for k in range(1, count + 1)]


@dataclass(frozen=True)
class ClusterLayout:
    index: int
    lab: str

    @property
    def name(self) -> str:
        return f"c{self.index}"

    @property
    def id(self) -> int:
        return self.index

    @property
    def bridge(self) -> str:
        return f"br{self.index}"

    @property
    def gateway(self) -> str:
        return f"192.168.{self.index}.1"

    @property
    def subnet(self) -> str:
        return f"192.168.{self.index}.0/24"

    @property
    def control_plane_netns(self) -> str:
        return f"{self.lab}-c{self.index}-cp"

    @property
    def control_plane_ip(self) -> str:
        return f"192.168.{self.index}.2"

    @property
    def control_plane_veth(self) -> str:
        return f"v{self.index}cp"

    @property
    def service_cidr(self) -> str:
        """Where the cluster's Services get their ClusterIP (inside the pod supernet: pods route it to their node)."""
        return f"10.96.{self.index}.0/24"

    @property
    def etcd_url(self) -> str:
        return f"https://{self.control_plane_ip}:2379"

    def node(self, index: int) -> NodeLayout:
        return NodeLayout(self.index, index, self.lab)


@dataclass(frozen=True)
class LabLayout:
    name: str
    clusters: int
    nodes: int
    pods: int
    routing: str = "wireguard"
    #: where each cluster's resources live: its etcd's registry/ prefix, or a stand-in Kubernetes API server
    source: str = "standalone"

    def __post_init__(self) -> None:
        validate_lab_name(self.name)
        for what, value, limit in (("clusters", self.clusters, MAX_CLUSTERS), ("nodes", self.nodes, MAX_NODES),
                                   ("pods", self.pods, MAX_PODS)):  # fmt: skip
            if not 1 <= value <= limit:
                raise LabError(f"--{what} {value} is out of range 1..{limit}")
        if self.routing not in ("wireguard", "ipsec", "vxlan", "native"):
            raise LabError(f"--routing {self.routing!r}: choose wireguard, ipsec, vxlan or native")
        if self.source not in ("standalone", "kubernetes"):
            raise LabError(f"--source {self.source!r}: choose standalone or kubernetes")

    @property
    def world_netns(self) -> str:
        return f"{self.name}-world"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def bpf_dir(self) -> Path:
        return BPF_ROOT / self.name

    def cluster(self, index: int) -> ClusterLayout:
        return ClusterLayout(index, self.name)

    def all_clusters(self) -> list[ClusterLayout]:
        return [self.cluster(c) for c in range(1, self.clusters + 1)]

    def all_nodes(self) -> list[NodeLayout]:
        return [c.node(n) for c in self.all_clusters() for n in range(1, self.nodes + 1)]

    def all_pods(self) -> list[PodLayout]:
        return [pod for node in self.all_nodes() for pod in node.pods(self.pods)]

    def find_pod(self, reference: str) -> PodLayout:
        """`c1/pod-1-1` -> its layout; a clear error naming what exists otherwise."""
        cluster, _, pod = reference.partition("/")
        for candidate in self.all_pods():
            if f"c{candidate.cluster}" == cluster and candidate.name == pod:
                return candidate
        known = ", ".join(f"c{p.cluster}/{p.name}" for p in self.all_pods()[:6])
        raise LabError(f"no pod {reference!r} in lab {self.name} (pods look like: {known}, ...)")
