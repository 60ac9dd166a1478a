"""The lab: real clusters out of network namespaces on one host, with no Docker (DESIGN section 7).

`up` builds, in order: the PKI (one CA for the lab), the underlay (the world namespace with a bridge per cluster and
routing between them; no default route anywhere), per cluster a control-plane namespace with etcd (mTLS) and the
apiserver, per node a namespace with its agent (and its tunnel), the clusters joined with `clustermesh connect`, and
the pods, attached by the CNI plugin the way a kubelet would. Everything it starts runs in a lab namespace and is
recorded in the lab's state folder, `/run/clustermesh-lab/<lab>/`.

`down` removes everything whose name carries the lab's: the processes living in its namespaces (found through
/proc, so a crashed or `kill -9`ed lab is cleaned up too), the namespaces, WireGuard control sockets left behind,
and the state folder.

Nothing here sends a packet from the host's own network namespace to a lab address: the steps that talk to an etcd
run after this process has moved into the lab's world namespace (`netns.enter`), and the agents are asked over
unix sockets. So a process builds or changes one lab in its life: the threads gRPC starts stay in that lab's world
(the CLI, the demo, the tests and the bench each run `clustermesh lab ...` as a process of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certs
from clustermesh import connecting
from clustermesh.contexts import Context, ContextFile
from clustermesh.lab import netns
from clustermesh.lab.layout import (
    MAX_NODES,
    POD_SUPERNET,
    UNDERLAY_SUPERNET,
    WIREGUARD_PORT,
    LabError,
    LabLayout,
    NodeLayout,
)
from clustermesh.model.api import AgentStatus, DatapathStatus
from clustermesh.model.kinds import kind_by_name
from clustermesh.processes.child import Child
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from clustermesh.resources.standalone import StandaloneStore
from clustermesh.status import AgentUnreachable, fetch_status
from kvstore import etcd, users
from kvstore.config import EtcdConfig
from kvstore.errors import KVStoreError

__all__ = ["Lab", "LabError", "LabExists", "down", "load"]

BIN = Path(sys.executable).parent
Progress = Callable[[str], None]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, WireGuard): run it with sudo, or as root")


@dataclass
class LabState:
    """What a lab is made of, on disk in its state folder (lab.json), so that every later command finds it."""

    name: str
    clusters: int
    pods_per_node: int
    routing: str
    nodes: dict[str, list[int]] = field(default_factory=dict)  # "c1" -> node indexes
    pods: dict[str, dict[str, str]] = field(default_factory=dict)  # "c1/pod-1-1" -> {"netns", "ip", "node"}

    @property
    def layout(self) -> LabLayout:
        most = max((max(indexes) for indexes in self.nodes.values() if indexes), default=1)
        return LabLayout(self.name, self.clusters, most, self.pods_per_node, self.routing)

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


CNI_TRY_AGAIN = 11  # the CNI spec's "try again later" (the agent is starting)


class CNIFailed(LabError):
    """The CNI plugin answered an error; `code` is its CNI error code."""

    def __init__(self, message: str, code: object) -> None:
        super().__init__(message)
        self.code = code


class LabExists(LabError):
    """`up` found a lab of that name: it refuses and leaves it alone."""


class Lab:
    def __init__(self, layout: LabLayout, *, progress: Progress = print) -> None:
        self.layout = layout
        self.progress = progress
        self.state_dir = layout.state_dir
        self.state = LabState(layout.name, layout.clusters, layout.pods, layout.routing)
        self.ca: certs.Issued | None = None

    @classmethod
    def existing(cls, name: str, *, progress: Progress = print) -> Lab:
        """The lab `name` as `up` left it (its state folder), to inspect or change."""
        state = load(name)
        lab = cls(state.layout, progress=progress)
        lab.state = state
        return lab

    # --- paths

    def pki(self, cluster: int) -> certs.ClusterPKI:
        return certs.ClusterPKI(self.state_dir / f"c{cluster}" / "pki")

    def node_dir(self, node: NodeLayout) -> Path:
        return self.state_dir / node.name

    def socket(self, node: NodeLayout) -> Path:
        return self.node_dir(node) / "agent.sock"

    def config(self, cluster: int, user: str) -> EtcdConfig:
        pki = self.pki(cluster)
        paths = pki.user(user)
        if not paths.cert.exists():
            certs.issue_user(pki, user)
        return EtcdConfig([self.layout.cluster(cluster).etcd_url], pki.ca.cert, paths.cert, paths.key)

    def _child(self, name: str, namespace: str, command: list[str], ready: str) -> Child:
        child = Child(name, [*netns.nsenter(namespace), *command], self.state_dir / "logs" / f"{name}.log")
        child.start()
        child.wait_for(ready)
        return child

    # --- up

    def up(self) -> LabState:
        require_root()
        layout = self.layout
        leftovers = netns.list_netns(f"{layout.name}-")
        if self.state_dir.exists() or leftovers:
            raise LabExists(
                f"lab {layout.name} exists already ({self.state_dir}"
                + (f", namespaces {', '.join(leftovers[:3])}" if leftovers else "")
                + f"): `clustermesh lab down --name {layout.name}` first"
            )
        started = time.monotonic()
        self.state_dir.mkdir(parents=True)
        self.state.nodes = {c.name: list(range(1, layout.nodes + 1)) for c in layout.all_clusters()}
        self.state.save(self.state_dir)
        self._pki()
        self._underlay()
        for cluster in layout.all_clusters():
            self._start_control_plane(cluster.index)
        netns.enter(layout.world_netns)
        asyncio.run(self._init_users())
        for cluster in layout.all_clusters():
            self._start_apiserver(cluster.index)
        for node in self.state.node_layouts():
            self._add_node_namespace(node)
            self._start_agent(node)
        asyncio.run(self._connect_all())
        for node in self.state.node_layouts():
            for pod in node.pods(layout.pods):
                self._add_pod(node, pod.name)
        self.state.save(self.state_dir)
        asyncio.run(self.wait_ready())
        self.progress(f"lab {layout.name} is up in {time.monotonic() - started:.1f} s")
        return self.state

    def _pki(self) -> None:
        self.ca = certs.create_ca(f"{self.layout.name}-mesh-ca")
        for cluster in self.layout.all_clusters():
            certs.create_cluster_pki(self.pki(cluster.index).directory, cluster.name,
                                     server_hosts=[cluster.control_plane_ip], ca=self.ca)  # fmt: skip
        self.progress(f"PKI: one CA for the lab, a folder per cluster in {self.state_dir}")

    def _underlay(self) -> None:
        layout = self.layout
        world = layout.world_netns
        netns.ip("netns", "add", world)
        netns.ip("link", "set", "lo", "up", netns=world)
        # /proc/sys/net is the namespace of whoever writes it (sysctl(8) is not on every machine: procps)
        netns.run(*netns.nsenter(world), "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        for cluster in layout.all_clusters():
            netns.ip("link", "add", cluster.bridge, "type", "bridge", netns=world)
            netns.ip("addr", "add", f"{cluster.gateway}/24", "dev", cluster.bridge, netns=world)
            netns.ip("link", "set", cluster.bridge, "up", netns=world)
            self._attach(cluster.control_plane_netns, cluster.control_plane_veth, cluster.bridge,
                         f"{cluster.control_plane_ip}/24", cluster.gateway)  # fmt: skip
        self.progress(
            f"underlay: namespace {world} routes between "
            + ", ".join(f"{c.bridge} {c.subnet}" for c in layout.all_clusters())
            + " (no default route anywhere)"
        )

    def _attach(self, namespace: str, world_veth: str, bridge: str, address: str, gateway: str) -> None:
        """A namespace on a cluster's bridge: a veth, an address, a route to the underlay (never a default)."""
        world = self.layout.world_netns
        netns.ip("netns", "add", namespace)
        netns.ip("link", "set", "lo", "up", netns=namespace)
        netns.ip("link", "add", world_veth, "netns", world, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        netns.ip("link", "set", world_veth, "master", bridge, "up", netns=world)
        netns.ip("addr", "add", address, "dev", "eth0", netns=namespace)
        netns.ip("link", "set", "eth0", "up", netns=namespace)
        netns.ip("route", "add", UNDERLAY_SUPERNET, "via", gateway, netns=namespace)

    def _start_control_plane(self, index: int) -> None:
        cluster = self.layout.cluster(index)
        pki = self.pki(index)
        spec = EtcdSpec(
            name=cluster.name, data_dir=self.state_dir / cluster.name / "etcd", ca_file=pki.ca.cert,
            cert_file=pki.server.cert, key_file=pki.server.key, host=cluster.control_plane_ip, client_port=2379,
            peer_port=2380, wrapper=netns.nsenter(cluster.control_plane_netns),
            log_file=self.state_dir / "logs" / f"etcd-{cluster.name}.log",
        )  # fmt: skip
        process = EtcdProcess(spec)
        process.start()
        self.progress(
            f"{cluster.name}: etcd on {cluster.etcd_url} in {cluster.control_plane_netns} (pid {process.pid})"
        )

    async def _init_users(self) -> None:
        contexts = ContextFile(self.state_dir / "contexts.yaml")
        for cluster in self.layout.all_clusters():
            config = self.config(cluster.index, "root")
            backend = await etcd.connect(config)
            try:
                await users.ensure_cluster_users(backend, cluster.name)
            finally:
                await backend.close()
            contexts.add(Context(cluster.name, config.endpoints, str(config.ca_file), str(config.cert_file),
                                 str(config.key_file)))  # fmt: skip
        contexts.save()

    def _start_apiserver(self, index: int) -> None:
        cluster = self.layout.cluster(index)
        config = self.config(index, f"admin-{cluster.name}")
        child = self._child(
            f"apiserver-{cluster.name}",
            cluster.control_plane_netns,
            [
                str(BIN / "clustermesh-apiserver"), "--cluster-name", cluster.name, "--cluster-id", str(cluster.id),
                "--source", "standalone", "--kvstore-endpoints", cluster.etcd_url,
                "--kvstore-ca", str(config.ca_file), "--kvstore-cert", str(config.cert_file),
                "--kvstore-key", str(config.key_file),
                "--health-address", f"{cluster.control_plane_ip}:9880",
                "--metrics-address", f"{cluster.control_plane_ip}:9962",
            ],
            r"every prefix synced",
        )  # fmt: skip
        self.progress(f"{cluster.name}: clustermesh-apiserver (pid {child.pid}), cluster ID {cluster.id}")

    def _add_node_namespace(self, node: NodeLayout) -> None:
        cluster = self.layout.cluster(node.cluster)
        self._attach(node.netns, node.world_veth, cluster.bridge, f"{node.ip}/24", cluster.gateway)
        if self.layout.routing == "native":  # the underlay learns pod CIDRs, as a cloud router would
            netns.ip("route", "replace", node.pod_cidr, "via", node.ip, netns=self.layout.world_netns)

    def _ipsec_credentials(self, node: NodeLayout) -> list[str]:
        """The node's IKE certificate (its IP is its identity) from the lab's CA, which every cluster shares."""
        directory = self.node_dir(node) / "ipsec-certs"
        ca = certs.load_issued(self.pki(node.cluster).ca)
        paths = certs.CertPaths.in_dir(directory, "node")
        directory.mkdir(parents=True, exist_ok=True)
        certs.write_issued(certs.issue_server(ca, f"ipsec-{node.name}", hosts=[node.ip, node.name]), paths)
        ca_file = directory / "ca.crt"
        shutil.copyfile(self.pki(node.cluster).ca.cert, ca_file)
        return ["--ipsec-cert", str(paths.cert), "--ipsec-key", str(paths.key), "--ipsec-ca", str(ca_file)]

    def _start_agent(self, node: NodeLayout) -> None:
        directory = self.node_dir(node)
        (directory / "remotes").mkdir(parents=True, exist_ok=True)
        config = self.config(node.cluster, f"agent-c{node.cluster}")
        ipsec = self._ipsec_credentials(node) if self.layout.routing == "ipsec" else []
        child = self._child(
            f"agent-{node.name}",
            node.netns,
            [
                str(BIN / "clustermesh-agent"), "--cluster-name", f"c{node.cluster}", "--cluster-id",
                str(node.cluster), "--node-name", node.name, "--node-ip", node.ip, "--pod-cidr", node.pod_cidr,
                "--kvstore-endpoints", self.layout.cluster(node.cluster).etcd_url,
                "--kvstore-ca", str(config.ca_file), "--kvstore-cert", str(config.cert_file),
                "--kvstore-key", str(config.key_file),
                "--clustermesh-config", str(directory / "remotes"), "--state-dir", str(directory / "state"),
                "--api-socket", str(self.socket(node)), "--datapath", self.layout.routing,
                "--wireguard-interface", node.wireguard_interface, "--wireguard-port", str(WIREGUARD_PORT),
                "--pod-supernet", POD_SUPERNET, "--identity-gc-grace", "60", *ipsec,
            ],
            r"listening on ",
        )  # fmt: skip
        self.progress(
            f"{node.name}: clustermesh-agent (pid {child.pid}) in {node.netns}, {node.ip}, pods {node.pod_cidr}"
        )

    async def _connect_all(self) -> None:
        contexts = ContextFile.load(self.state_dir / "contexts.yaml")
        names = [c.name for c in self.layout.all_clusters()]
        for i, source in enumerate(names):
            for destination in names[i + 1 :]:
                a = await connecting.open_side(contexts.get(source), contexts.path.parent, None)
                try:
                    b = await connecting.open_side(contexts.get(destination), contexts.path.parent, None)
                    try:
                        await connecting.connect_clusters(a, b, allow_mismatching_ca=False)
                    finally:
                        await b.backend.close()
                finally:
                    await a.backend.close()
                self.progress(f"clustermesh connect --context {source} --destination-context {destination}")

    def cni(self, node: NodeLayout, command: str, pod: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Run the CNI plugin in the node's namespace, as a kubelet would."""
        pod_netns = f"{self.layout.name}-c{node.cluster}-{pod}"
        env = {
            **os.environ,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod_netns,
            "CNI_NETNS": str(netns.path(pod_netns)),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(BIN),
            "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};CLUSTERMESH_LABELS="
            + ",".join(f"{k}:{v}" for k, v in (labels or {"app": "lab"}).items()),
        }
        config = {"cniVersion": "1.0.0", "name": "clustermesh", "type": "clustermesh-cni",
                  "agentSocket": str(self.socket(node))}  # fmt: skip
        result = subprocess.run(
            [*netns.nsenter(node.netns), str(BIN / "clustermesh-cni")],
            env=env, input=json.dumps(config).encode(), capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        try:
            output = json.loads(result.stdout or b"{}")
        except ValueError:
            output = {}
        if not isinstance(output, dict):
            output = {}
        if result.returncode != 0:
            message = output.get("msg") or result.stderr.decode(errors="replace")[-500:]
            raise CNIFailed(f"CNI {command} of {pod} on {node.name} failed: {message}", output.get("code"))
        return output

    # --- nodes at run time

    def add_node(self, cluster: int, *, pods: int | None = None) -> NodeLayout:
        """A new node in `cluster` (the next free index): namespace, agent, pods; then every agent has it as a peer."""
        require_root()
        key = f"c{cluster}"
        if key not in self.state.nodes:
            known = ", ".join(sorted(self.state.nodes))
            raise LabError(f"lab {self.layout.name} has no cluster {key} (clusters: {known})")
        index = max(self.state.nodes[key], default=0) + 1
        if index > MAX_NODES:
            raise LabError(f"cluster {key} has {MAX_NODES} nodes already, the most a lab cluster can have")
        node = self.layout.cluster(cluster).node(index)
        netns.enter(self.layout.world_netns)
        self.state.nodes[key] = sorted([*self.state.nodes[key], index])
        self.state.save(self.state_dir)
        try:
            self._add_node_namespace(node)
            self._start_agent(node)
            for pod in node.pods(self.state.pods_per_node if pods is None else pods):
                self._add_pod(node, pod.name)
                self.state.save(self.state_dir)
            asyncio.run(self.wait_ready())
        except BaseException:
            self.progress(f"{node.name}: adding it failed; removing what was made of it")
            with contextlib.suppress(Exception):
                self.remove_node(node.name)
            raise
        return node

    def remove_node(self, name: str) -> NodeLayout:
        """Node `name` (c<c>-node-<n>) gone as a machine goes: its processes, namespaces and pods, then its
        CiliumNode and endpoints deleted from its cluster (what a Kubernetes control plane does)."""
        require_root()
        node = next((n for n in self.state.node_layouts() if n.name == name), None)
        if node is None:
            known = ", ".join(n.name for n in self.state.node_layouts())
            raise LabError(f"no node {name!r} in lab {self.layout.name} (nodes: {known})")
        pods = {ref: pod for ref, pod in self.state.pods.items() if pod["node"] == node.name}
        # pods by name too: one whose ADD failed has a namespace and no entry
        pod_prefix = f"{self.layout.name}-c{node.cluster}-pod-{node.index}-"
        namespaces = sorted({node.netns, *(pod["netns"] for pod in pods.values()), *netns.list_netns(pod_prefix)})
        netns.stop_processes(netns.processes_in(namespaces))
        for namespace in namespaces:
            netns.ip("netns", "del", namespace, check=False)
        Path(f"/var/run/wireguard/{node.wireguard_interface}.sock").unlink(missing_ok=True)
        if self.layout.routing == "native":
            netns.ip("route", "del", node.pod_cidr, netns=self.layout.world_netns, check=False)
        # the node is gone from the host: say so in the lab's state before asking its cluster to forget it
        self.state.nodes[f"c{node.cluster}"].remove(node.index)
        for ref in pods:
            del self.state.pods[ref]
        self.state.save(self.state_dir)
        shutil.rmtree(self.node_dir(node), ignore_errors=True)
        netns.enter(self.layout.world_netns)
        try:
            asyncio.run(delete_node_objects(self, node.cluster, node.name, [ref.partition("/")[2] for ref in pods]))
        except KVStoreError as exc:
            self.progress(f"{node.name}: removed with {len(pods)} pods, but its CiliumNode and endpoints are still "
                          f"published: cluster c{node.cluster}'s etcd did not answer ({exc})")  # fmt: skip
            return node
        self.progress(f"{node.name}: removed with {len(pods)} pods; its CiliumNode and endpoints deleted")
        return node

    def _add_pod(self, node: NodeLayout, pod: str, *, patience: float = 30.0) -> None:
        """Make the pod's namespace and ADD it through the CNI plugin; an agent still starting (its store not
        there yet) is asked again, as a kubelet retries a sandbox, for up to `patience` seconds."""
        pod_netns = f"{self.layout.name}-c{node.cluster}-{pod}"
        netns.ip("netns", "add", pod_netns)
        deadline = time.monotonic() + patience
        while True:
            try:
                result = self.cni(node, "ADD", pod)
                break
            except CNIFailed as exc:
                if exc.code != CNI_TRY_AGAIN or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # another process getting ready: its answers are all there is to wait on
        ip = result["ips"][0]["address"].split("/")[0]
        self.state.pods[f"c{node.cluster}/{pod}"] = {"netns": pod_netns, "ip": ip, "node": node.name}
        self.progress(f"c{node.cluster}/{pod}: {ip} on {node.name} (identity {result.get('identity')})")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every agent says ready, with every cluster, and (with a datapath) a peer for every other node."""
        nodes = self.state.node_layouts()
        expected_peers = len(nodes) - 1
        waiting = ""
        try:
            async with asyncio.timeout(timeout):
                for node in nodes:
                    while True:
                        try:
                            status: AgentStatus | None = await fetch_status(self.socket(node), wait=timeout)
                        except AgentUnreachable as exc:
                            status, waiting = None, f"{node.name}: {exc}"
                        if status is not None:
                            datapath = status.datapath or DatapathStatus()
                            peers = len(datapath.peers)
                            if "installed" in datapath.details:  # IPsec: a peer counts once its child SA is up
                                peers = min(peers, int(datapath.details["installed"]))
                            waiting = (
                                f"{node.name}: ready={status.ready}, {len(status.clusters)} of "
                                f"{self.state.clusters} clusters, {peers} of {expected_peers} peers"
                                + (f", datapath error: {datapath.last_error}" if datapath.last_error else "")
                                + (f", not ready: {'; '.join(status.not_ready)}" if status.not_ready else "")
                            )
                            if status.ready and len(status.clusters) == self.state.clusters and peers == expected_peers:
                                break
                        await asyncio.sleep(0.2)  # other processes converging: their answers are all we can wait on
        except TimeoutError:
            raise LabError(f"the agents were not ready after {timeout:.0f} s ({waiting})") from None
        self.progress(f"every agent is ready, with {self.state.clusters} clusters and {expected_peers} peers each")


def down(name: str, *, progress: Progress = print, keep_logs: Path | None = None) -> list[str]:
    """Remove everything of lab `name`; return what was removed (also after a crash: found by name, not memory).
    With `keep_logs`, the processes' logs are copied there first (a failed `up` says where)."""
    require_root()
    layout = LabLayout(name, 1, 1, 1)
    if keep_logs is not None and (layout.state_dir / "logs").is_dir():
        shutil.rmtree(keep_logs, ignore_errors=True)
        shutil.copytree(layout.state_dir / "logs", keep_logs)
    namespaces = netns.list_netns(f"{name}-")
    removed = []
    pids = netns.processes_in(namespaces)
    if pids:
        netns.stop_processes(pids)
        removed.append(f"{len(pids)} processes")
    for namespace in namespaces:
        netns.ip("netns", "del", namespace, check=False)
    if namespaces:
        removed.append(f"{len(namespaces)} namespaces")
    sockets = sorted(Path("/var/run/wireguard").glob(f"{name}[1-9]n[1-9].sock"))
    for socket in sockets:
        socket.unlink(missing_ok=True)
    if sockets:
        removed.append(f"{len(sockets)} WireGuard sockets")
    if layout.state_dir.exists():
        shutil.rmtree(layout.state_dir, ignore_errors=True)
        removed.append(str(layout.state_dir))
    progress(f"lab {name} removed: " + (", ".join(removed) if removed else "nothing was left"))
    return removed


async def delete_node_objects(lab: Lab, cluster: int, node_name: str, pods: list[str]) -> None:
    """What a Kubernetes control plane does when a node goes: its CiliumNode and its pods' endpoints are deleted."""
    backend = await etcd.connect(lab.config(cluster, f"admin-c{cluster}"))
    try:
        store = StandaloneStore(backend)
        for pod in pods:
            with contextlib.suppress(Exception):
                await store.delete(kind_by_name("CiliumEndpoint"), pod, "default")
        with contextlib.suppress(Exception):  # a node that never got as far as publishing itself
            await store.delete(kind_by_name("CiliumNode"), node_name)
    finally:
        await backend.close()
