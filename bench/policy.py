"""Benchmark of network policy in eBPF: what enforcing costs a connection and a stream, against no program and
against nftables; what a thousand remote pods cost the maps; how fast a policy change reaches them.

A lab `bpol` (--name) of 2 clusters x 2 nodes (vxlan) is built; cluster c2 gets a node of the bench's own making
(`c2-virtual`, pod CIDR 10.2.64.0/18, never a process: what its objects say is all the mesh knows of it) hosting
1000 endpoints of 1000 identities (`role=peer`, `peer=N`), published as any cluster publishes them (CiliumNode,
CiliumIdentity and CiliumEndpoint objects in c2's store, exported by c2's apiserver). In c1, pods `server` and
`client` (namespace `bench`) share node c1-node-1, and `server-2` runs on c1-node-2. A CiliumNetworkPolicy lets
the 1000 peers and the client reach the servers: each server's policy map holds an entry per allowed identity.

1. conn_rate_ratio, throughput_ratio: TCP connections per second (a client opening and closing connections as fast
   as it can for `--seconds`) and one iperf3 stream, client -> server, with the policy enforced in eBPF, against the
   same pods with no program on their veths (`tc filter del`), rounds interleaved; goals >= 0.9 and >= 0.97.
2. nft_conn_rate_ratio: the same connection rate with no program, but an nftables rule set in the node that allows
   the same peers by IP set (1001 addresses, `ct state established` first): eBPF's rate over nftables' (goal >= 1).
3. policy_map_writes, ipcache_map_writes, scale_enforced_s: 1000 more endpoints, all of one allowed identity,
   appear on the virtual node: the agents' own counts of map writes (policy maps: goal 0) and the seconds from the
   first object written to all 1000 addresses in c1-node-1's ipcache map (read from the pinned map).
4. policy_update_p99_ms: the CNP updated `--updates` times, each time its third port changed (1001 entries written
   and 1001 removed per server); from the store write to the new port's entry in both servers' policy maps (read
   from the pinned maps of both nodes): p50 and p99.

Every packet is sent inside the lab's namespaces; the bench talks to etcd through `lab env`'s loopback bridge and to
the maps through their pins. Usage: python bench/policy.py [--quick] [--name bpol] (root). --quick: 2 rounds of
2 s and 20 updates (under two minutes); otherwise 4 rounds of 5 s and 100 updates. The last line of output is one
JSON object of all figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/agent.py would hide the agent package

import argparse
import asyncio
import importlib.util
import ipaddress
import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bpf.maps import INGRESS, IpcacheMap, PolicyMap
from bpf.syscall import MapFd
from clustermesh.contexts import ContextFile
from clustermesh.lab import netns
from clustermesh.lab.lab import BIN, Lab, down, require_root
from clustermesh.lab.layout import LabLayout
from clustermesh.lab.pods import add_named_pod
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.standalone import StandaloneStore
from kvstore import etcd

_spec = importlib.util.spec_from_file_location("bench_datapath", Path(__file__).with_name("datapath.py"))
assert _spec is not None and _spec.loader is not None
datapath = importlib.util.module_from_spec(_spec)
sys.modules["bench_datapath"] = datapath
_spec.loader.exec_module(datapath)  # its iperf3 runner and helpers

CONN_PORT, IPERF_PORT = 7000, datapath.IPERF_PORT
PEERS, SCALE = 1000, 1000
VIRTUAL_NODE, VIRTUAL_CIDR, VIRTUAL_IP = "c2-virtual", "10.2.64.0/18", "192.168.2.200"
PEER_ID_BASE = (2 << 16) | 30000  # c2's identity range: cluster ID 2 in the top bits
TCP = 6

CONN_LOOP = """
import socket, sys, time
address, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
count, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    s = socket.create_connection((address, port), timeout=2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00")
    s.close()
    count += 1
print(count / seconds)
"""
ACCEPT_LOOP = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def say(line: str) -> None:
    print(line, flush=True)


def cnp(extra_ports: list[int]) -> dict[str, Any]:
    ports = [{"port": str(p), "protocol": "TCP"} for p in (CONN_PORT, IPERF_PORT, *extra_ports)]
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "servers", "namespace": "bench"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"role": "peer", "io.cilium.k8s.policy.cluster": "c2"}},
                                                {"matchLabels": {"app": "client"}}],
                              "toPorts": [{"ports": ports}]}]},
    }  # fmt: skip


def identity(number: int, peer: int) -> dict[str, Any]:
    labels = {"k8s:role": "peer", "k8s:peer": str(peer), "k8s:io.kubernetes.pod.namespace": "bench",
              "k8s:io.cilium.k8s.policy.cluster": "c2"}  # fmt: skip
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
            "metadata": {"name": str(number), "labels": {"io.kubernetes.pod.namespace": "bench"}},
            "security-labels": labels}  # fmt: skip


def endpoint(name: str, ip: str, number: int, peer: int) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": name, "namespace": "bench", "labels": {"role": "peer", "peer": str(peer)}},
            "status": {"identity": {"id": number, "labels": ["k8s:role=peer", f"k8s:peer={peer}"]},
                       "networking": {"addressing": [{"ipv4": ip}], "node": VIRTUAL_IP}, "state": "ready"}}  # fmt: skip


def virtual_node() -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": VIRTUAL_NODE},
            "spec": {"addresses": [{"type": "InternalIP", "ip": VIRTUAL_IP}],
                     "ipam": {"podCIDRs": [VIRTUAL_CIDR]}}}  # fmt: skip


def addresses(count: int, offset: int) -> list[str]:
    network = ipaddress.ip_network(VIRTUAL_CIDR)
    return [str(network.network_address + offset + i) for i in range(count)]


class Stores:
    """Each cluster's store, through `lab env`'s loopback bridge."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.opened: dict[str, tuple[Any, StandaloneStore]] = {}

    async def store(self, cluster: str) -> StandaloneStore:
        if cluster not in self.opened:
            context = ContextFile.load(self.config).get(cluster)
            backend = await etcd.connect(context.etcd_config(self.config.parent))
            self.opened[cluster] = (backend, StandaloneStore(backend))
        return self.opened[cluster][1]

    async def create_many(self, cluster: str, objects: list[dict[str, Any]], parallel: int = 32) -> None:
        store = await self.store(cluster)
        queue = list(objects)

        async def worker() -> None:
            while queue:
                await store.create(queue.pop())

        await asyncio.gather(*(worker() for _ in range(parallel)))

    async def close(self) -> None:
        for backend, _ in self.opened.values():
            await backend.close()


# --- the maps, from their pins


def _pinned(lab: Lab, node: str, *parts: str) -> Path:
    [found] = sorted((lab.layout.bpf_dir / node).glob("*/" + "/".join(parts)))
    return found


def ipcache_identities(lab: Lab, node: str) -> dict[str, int]:
    with MapFd.pinned(str(_pinned(lab, node, "maps", "cm_ipcache"))) as fd:
        return {cidr: entry.identity for cidr, entry in IpcacheMap(fd).items().items()}


def policy_map(lab: Lab, node: str, ifindex: int) -> PolicyMap:
    return PolicyMap(MapFd.pinned(str(_pinned(lab, node, "policy", str(ifindex)))))


def host_ifindex(lab: Lab, node: str, pod_ip: str) -> tuple[int, str]:
    """The pod's host-side veth in its node: (ifindex, name), from the node's route to the pod."""
    namespace = _node_netns(lab, node)
    name = json.loads(datapath.in_netns(namespace, "ip", "-j", "route", "get", pod_ip))[0]["dev"]
    links = json.loads(datapath.in_netns(namespace, "ip", "-j", "link", "show", "dev", name))
    return int(links[0]["ifindex"]), name


def _node_netns(lab: Lab, node: str) -> str:
    return next(n.netns for n in lab.state.node_layouts() if n.name == node)


# --- the three ways to let the peers in


@dataclass
class Pods:
    server_ip: str
    client_ns: str
    server_ns: str
    node_ns: str
    veths: list[str]  # the server's and the client's
    programs: Path


def detach(pods: Pods) -> None:
    for veth in pods.veths:
        for hook in ("ingress", "egress"):
            datapath.in_netns(pods.node_ns, "tc", "filter", "del", "dev", veth, hook, "pref", "1")


def attach(pods: Pods) -> None:
    for veth in pods.veths:
        for hook, program in (("ingress", "cm_from_pod"), ("egress", "cm_to_pod")):
            datapath.in_netns(pods.node_ns, "tc", "filter", "replace", "dev", veth, hook, "pref", "1", "handle", "1",
                              "bpf", "da", "pinned", str(pods.programs / program))  # fmt: skip


def nft_rules(pods: Pods, peers: list[str]) -> str:
    return (f"table ip bpolbench {{\n set peers {{ type ipv4_addr; elements = {{ {', '.join(peers)} }} }}\n"
            f" chain forward {{\n  type filter hook forward priority 0; policy accept;\n"
            f"  ct state established,related accept\n"
            f"  ip daddr {pods.server_ip} ip saddr @peers accept\n"
            f"  ip daddr {pods.server_ip} drop\n }}\n}}\n")  # fmt: skip


def conn_rate(pods: Pods, seconds: float) -> float:
    output = datapath.in_netns(pods.client_ns, sys.executable, "-c", CONN_LOOP, pods.server_ip, str(CONN_PORT),
                               str(seconds), timeout=seconds + 30)  # fmt: skip
    return float(output.strip())


def measure_paths(pods: Pods, peers: list[str], rounds: int, seconds: int) -> dict[str, float]:
    acceptor = subprocess.Popen([*netns.nsenter(pods.server_ns), sys.executable, "-u", "-c", ACCEPT_LOOP,
                                 str(CONN_PORT)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    found: dict[str, list[float]] = {"ebpf_conn": [], "none_conn": [], "nft_conn": [], "ebpf_gbps": [], "none_gbps": []}
    try:
        assert acceptor.stdout is not None and acceptor.stdout.readline().strip() == "ready"
        conn_rate(pods, 1)  # a warm-up, not counted: the first run of a path is slower, whichever path it is
        for round_ in range(rounds):
            order = ["ebpf", "none", "nft"] if round_ % 2 == 0 else ["nft", "none", "ebpf"]
            for path in order:
                if path != "ebpf":
                    detach(pods)
                if path == "nft":
                    netns.run(*netns.nsenter(pods.node_ns), "nft", "-f", "-", input=nft_rules(pods, peers).encode())
                try:
                    found[f"{path}_conn"].append(conn_rate(pods, seconds))
                    if path != "nft":
                        found[f"{path}_gbps"].append(datapath.iperf(pods.server_ns, pods.client_ns, pods.server_ip,
                                                                    seconds, 1))  # fmt: skip
                finally:
                    if path == "nft":
                        datapath.in_netns(pods.node_ns, "nft", "delete", "table", "ip", "bpolbench", check=False)
                    if path != "ebpf":
                        attach(pods)
                say(f"  round {round_ + 1} {path}: {found[f'{path}_conn'][-1]:.0f} conn/s"
                    + (f", {found[f'{path}_gbps'][-1]:.2f} Gbit/s" if path != "nft" else ""))  # fmt: skip
    finally:
        datapath.stop(acceptor)
    return {key: statistics.median(values) for key, values in found.items()}


# --- the run


def policy_writes(lab: Lab) -> dict[str, dict[str, int]]:
    result = subprocess.run([str(BIN / "clustermesh"), "policy", "get", "--lab", lab.layout.name, "-o", "json"],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return {node: document["map_writes"] for node, document in json.loads(result.stdout).items()}


def wait_until(what: str, condition: Any, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.002)  # other processes writing maps: their pins are all there is to look at
    return time.monotonic() - started


async def run(lab: Lab, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    stores = Stores(config)
    try:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench", "labels": {"bench": "yes"}}}
        for cluster in ("c1", "c2"):
            await (await stores.store(cluster)).create(dict(namespace))
        await asyncio.sleep(0.5)  # the agents' namespace informers: a pod's identity carries its namespace's labels
        made = {name: add_named_pod(lab, 1, name, namespace="bench", labels={"app": app},
                                    node=lab.layout.cluster(1).node(index))
                for name, app, index in (("server", "server", 1), ("client", "client", 1),
                                         ("server-2", "server", 2))}  # fmt: skip
        for name, pod in made.items():
            say(f"pod {name}: {pod['ip']} (identity {pod['identity']}) on {pod['node']}")

        started = time.monotonic()
        await (await stores.store("c2")).create(virtual_node())
        peer_ips = addresses(PEERS, 16)
        await stores.create_many("c2", [identity(PEER_ID_BASE + i, i) for i in range(PEERS)])
        await stores.create_many(
            "c2", [endpoint(f"peer-{i}", ip, PEER_ID_BASE + i, i) for i, ip in enumerate(peer_ips)]
        )
        await (await stores.store("c1")).create(cnp([]))
        servers = {"c1-node-1": host_ifindex(lab, "c1-node-1", made["server"]["ip"]),
                   "c1-node-2": host_ifindex(lab, "c1-node-2", made["server-2"]["ip"])}  # fmt: skip
        maps = {node: policy_map(lab, node, ifindex) for node, (ifindex, _) in servers.items()}
        waited = wait_until(f"{PEERS} peers and the client in both servers' policy maps",
                            lambda: all(len(m.items()) >= PEERS + 1 for m in maps.values()), timeout=120)  # fmt: skip
        say(
            f"{PEERS} peer identities published and allowed in both servers' maps in "
            f"{time.monotonic() - started:.1f} s (the last {waited:.1f} s waiting for the maps)"
        )
        figures["policy_map_entries"] = len(maps["c1-node-1"].items())

        # 1 and 2: the cost of enforcing
        node_ns = _node_netns(lab, "c1-node-1")
        client_veth = host_ifindex(lab, "c1-node-1", made["client"]["ip"])[1]
        pods = Pods(made["server"]["ip"], lab.state.pods["c1/bench/client"]["netns"],
                    lab.state.pods["c1/bench/server"]["netns"], node_ns, [servers["c1-node-1"][1], client_veth],
                    _pinned(lab, "c1-node-1", "progs"))  # fmt: skip
        say(f"client -> server, {args.rounds} rounds of {args.seconds} s per path (eBPF, no program, nftables):")
        paths = measure_paths(pods, [*peer_ips, made["client"]["ip"]], args.rounds, args.seconds)
        figures.update({"conn_rate_ebpf": round(paths["ebpf_conn"]), "conn_rate_none": round(paths["none_conn"]),
                        "conn_rate_nft": round(paths["nft_conn"]), "gbps_ebpf": round(paths["ebpf_gbps"], 2),
                        "gbps_none": round(paths["none_gbps"], 2),
                        "conn_rate_ratio": round(paths["ebpf_conn"] / paths["none_conn"], 3),
                        "throughput_ratio": round(paths["ebpf_gbps"] / paths["none_gbps"], 3),
                        "nft_conn_rate_ratio": round(paths["ebpf_conn"] / paths["nft_conn"], 3)})  # fmt: skip

        # 3: a thousand pods of an allowed identity appear in c2
        before = policy_writes(lab)
        server_map_before = maps["c1-node-1"].items()
        scale_ips = addresses(SCALE, 4096)
        wanted = {f"{ip}/32" for ip in scale_ips}
        started = time.monotonic()
        await stores.create_many("c2", [endpoint(f"more-{i}", ip, PEER_ID_BASE, 0) for i, ip in enumerate(scale_ips)])
        written = time.monotonic() - started
        enforced = written + wait_until(f"{SCALE} new addresses in c1-node-1's ipcache",
                                        lambda: wanted <= ipcache_identities(lab, "c1-node-1").keys(),
                                        timeout=120)  # fmt: skip
        await asyncio.sleep(1)  # whatever else the agents would write for them, counted below
        after = policy_writes(lab)
        figures["scale_enforced_s"] = round(enforced, 2)
        figures["scale_objects_written_s"] = round(written, 2)
        figures["policy_map_writes"] = sum(after[n]["policy_writes"] - before[n]["policy_writes"] for n in after)
        figures["ipcache_map_writes"] = sum(after[n]["ipcache_writes"] - before[n]["ipcache_writes"] for n in after)
        figures["server_policy_map_unchanged"] = maps["c1-node-1"].items() == server_map_before
        say(
            f"{SCALE} pods of an allowed identity in c2: enforced on c1-node-1 in {enforced:.2f} s; map writes on "
            f"the {len(after)} nodes: policy {figures['policy_map_writes']}, ipcache {figures['ipcache_map_writes']}"
        )

        # 4: policy updates
        store = await stores.store("c1")
        latencies = []
        client_identity = int(made["client"]["identity"])
        for i in range(args.updates):
            port = 20000 + i
            current = await store.get(kind_by_name("CiliumNetworkPolicy"), "servers", "bench")
            assert current is not None
            started = time.monotonic()
            await store.update({**cnp([port]), "metadata": current["metadata"]})
            written_ms = 1000 * (time.monotonic() - started)
            wait_until(f"port {port} in both servers' maps",
                       lambda p=port: all(m.verdict(INGRESS, client_identity, TCP, p) is not None
                                          for m in maps.values()), timeout=10)  # fmt: skip
            latencies.append(time.monotonic() - started)  # from before the store write
            if i % 10 == 0:
                timings = {
                    node: (w["last_update_ms"], w["last_recompute_ms"]) for node, w in policy_writes(lab).items()
                }
                say(
                    f"  update {i}: {1000 * latencies[-1]:.1f} ms (the store write {written_ms:.1f} ms); agents' "
                    "(change to written, recompute) ms: "
                    + ", ".join(f"{node} {a}/{b}" for node, (a, b) in sorted(timings.items()) if node.startswith("c1/"))
                )
        latencies_ms = sorted(1000 * t for t in latencies)
        figures["policy_update_p50_ms"] = round(statistics.median(latencies_ms), 1)
        figures["policy_update_p99_ms"] = round(latencies_ms[min(len(latencies_ms) - 1,
                                                                 int(0.99 * len(latencies_ms)))], 1)  # fmt: skip
        say(
            f"{args.updates} policy updates to both servers' maps: p50 {figures['policy_update_p50_ms']} ms, "
            f"p99 {figures['policy_update_p99_ms']} ms"
        )
    finally:
        await stores.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s, 20 updates (under two minutes)")
    parser.add_argument("--name", default="bpol", help="the lab's name")
    args = parser.parse_args()
    args.rounds, args.seconds, args.updates = (2, 2, 20) if args.quick else (4, 5, 100)
    require_root()
    started = time.monotonic()
    layout = LabLayout(args.name, clusters=2, nodes=2, pods=1, routing="vxlan")
    if layout.state_dir.exists() or netns.list_netns(f"{args.name}-"):
        down(args.name, progress=say)
    lab = Lab(layout, progress=lambda line: None)
    figures: dict[str, Any] = {}
    try:
        up = subprocess.run([str(BIN / "clustermesh"), "lab", "up", "--name", args.name, "--clusters", "2", "--nodes",
                             "2", "--pods", "1", "--routing", "vxlan"], capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"lab up failed: {up.stdout[-1500:]}{up.stderr[-1500:]}")
        lab = Lab.existing(args.name, progress=lambda line: None)
        say(f"lab {args.name} up (2 clusters x 2 nodes, vxlan) in {time.monotonic() - started:.0f} s")
        config = lab.env()
        figures = asyncio.run(run(lab, config, args))
        figures["goals_met"] = {"conn_rate_ratio": figures["conn_rate_ratio"] >= 0.9,
                                "throughput_ratio": figures["throughput_ratio"] >= 0.97,
                                "nft_conn_rate_ratio": figures["nft_conn_rate_ratio"] >= 1.0,
                                "policy_map_writes": figures["policy_map_writes"] == 0,
                                "policy_update_p99_ms": figures["policy_update_p99_ms"] <= 100}  # fmt: skip
    except Exception as exc:
        figures["error"] = str(exc)
        raise
    finally:
        down(args.name, progress=lambda line: None)
        figures["seconds"] = round(time.monotonic() - started)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
