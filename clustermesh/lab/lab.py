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
import shutil
import time
from pathlib import Path
from typing import Any

from bpf import loader as bpf_loader
from certs import rotation
from clustermesh.lab import bridge, cgroups, controlplane, netns, nodes, underlay
from clustermesh.lab.layout import MAX_NODES, LabError, LabLayout, NodeLayout
from clustermesh.lab.pods import CNIFailed, add_pod, run_cni
from clustermesh.lab.state import BIN, LabContext, LabExists, LabState, Progress, load, require_root
from clustermesh.model.api import AgentStatus, DatapathStatus
from clustermesh.status import AgentUnreachable, fetch_status
from kvstore.errors import KVStoreError

__all__ = ["BIN", "CNIFailed", "Lab", "LabError", "LabExists", "LabState", "down", "load", "require_root"]


class Lab(LabContext):
    """A lab's whole life: `up`, nodes added and removed at run time, a cluster's etcd wiped, and readiness. The
    jobs themselves live in `underlay`, `controlplane`, `nodes` and `pods`."""

    @classmethod
    def existing(cls, name: str, *, progress: Progress = print) -> Lab:
        """The lab `name` as `up` left it (its state folder), to inspect or change."""
        state = load(name)
        lab = cls(state.layout, progress=progress)
        lab.state = state
        return lab

    def cni(self, node: NodeLayout, command: str, pod: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Run the CNI plugin in the node's namespace, as a kubelet would."""
        return run_cni(self, node, command, pod, labels=labels)

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
        controlplane.make_pki(self)
        underlay.build(self)
        for cluster in layout.all_clusters():
            controlplane.start_etcd(self, cluster.index)
            if layout.source == "kubernetes":  # from the host's namespace: its second listener is on the loopback
                controlplane.start_standin(self, cluster.index)
        netns.enter(layout.world_netns)
        asyncio.run(controlplane.init_users(self))
        for cluster in layout.all_clusters():
            controlplane.start_apiserver(self, cluster.index)
        for node in self.state.node_layouts():
            nodes.add_node_namespace(self, node)
            nodes.start_agent(self, node)
        for cluster in layout.all_clusters():
            nodes.start_relay(self, cluster.index)
        asyncio.run(controlplane.connect_all(self))
        for node in self.state.node_layouts():
            for pod in node.pods(layout.pods):
                add_pod(self, node, pod.name)
        self.state.save(self.state_dir)
        asyncio.run(self.wait_ready())
        self.progress(f"lab {layout.name} is up in {time.monotonic() - started:.1f} s")
        return self.state

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
            nodes.add_node_namespace(self, node)
            nodes.start_agent(self, node)
            for pod in node.pods(self.state.pods_per_node if pods is None else pods):
                add_pod(self, node, pod.name)
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
        bpf_loader.remove(self.layout.bpf_dir / node.name)
        cgroups.remove_tree(cgroups.node_cgroup(self.layout.name, node.name))
        netns.enter(self.layout.world_netns)
        try:
            asyncio.run(
                controlplane.delete_node_objects(
                    self,
                    node.cluster,
                    node.name,
                    [
                        (pod.get("namespace", "default"), pod.get("name") or ref.rsplit("/", 1)[1])
                        for ref, pod in pods.items()
                    ],
                )
            )
        except KVStoreError as exc:
            self.progress(f"{node.name}: removed with {len(pods)} pods, but its CiliumNode and endpoints are still "
                          f"published: cluster c{node.cluster}'s etcd did not answer ({exc})")  # fmt: skip
            return node
        self.progress(f"{node.name}: removed with {len(pods)} pods; its CiliumNode and endpoints deleted")
        return node

    # --- faults an operator meets

    def wipe_etcd(self, cluster: int) -> None:
        """Cluster `cluster`'s etcd lost and brought back empty; then what an operator does (`clustermesh etcd
        init`, `clustermesh connect` again). Its apiserver and agents must refill it by themselves."""
        require_root()
        if f"c{cluster}" not in self.state.nodes:
            known = ", ".join(sorted(self.state.nodes))
            raise LabError(f"lab {self.layout.name} has no cluster c{cluster} (clusters: {known})")
        controlplane.wipe_etcd(self, cluster)
        netns.enter(self.layout.world_netns)
        asyncio.run(controlplane.init_users(self, [cluster]))
        self.progress(f"c{cluster}: clustermesh etcd init (users, roles, auth)")
        asyncio.run(controlplane.wait_for_cluster_config(self, cluster))
        self.progress(f"c{cluster}: its apiserver wrote its cluster-config again")
        asyncio.run(controlplane.connect_all(self, only=f"c{cluster}"))

    def rotate_certificates(self, step: str, *, days: int | None = None) -> rotation.RotationReport:
        """Every certificate of the lab (etcd's, the users', the flow services', the relays', IPsec's) issued again,
        or one step of a CA roll (`step`: "leaves", "new-ca", "drop-old-ca"); the processes take the files up as they
        run. Only etcd must be restarted when the set of trusted CAs changes: it reads that file at start."""
        require_root()
        folders = [self.state_dir]
        if step == "new-ca":
            report = rotation.add_ca(folders)
        elif step == "drop-old-ca":
            report = rotation.drop_old_cas(folders)
        else:
            report = rotation.rotate(folders, days=days)
        if step != "leaves":
            for cluster in self.layout.all_clusters():
                controlplane.restart_etcd(self, cluster.index)
        return report

    # --- the host's shell

    def env(self) -> Path:
        """A contexts file for the host's shell, through the lab's loopback bridge (`bridge.host_contexts`)."""
        require_root()
        return bridge.host_contexts(self)

    # --- readiness

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
    removed = []
    if bridge.stop_bridge(layout.state_dir, name):
        removed.append("the loopback bridge")
    namespaces = netns.list_netns(f"{name}-")
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
    if bpf_loader.remove(layout.bpf_dir):
        removed.append(f"eBPF pins {layout.bpf_dir}")
    if cgroups.remove_tree(cgroups.lab_cgroup(name)):
        removed.append(f"cgroups {cgroups.lab_cgroup(name)}")
    if layout.state_dir.exists():
        shutil.rmtree(layout.state_dir, ignore_errors=True)
        removed.append(str(layout.state_dir))
    progress(f"lab {name} removed: " + (", ".join(removed) if removed else "nothing was left"))
    return removed
