"""Benchmark of the eBPF load balancer: connections through a ClusterIP as the number of Services grows, against
kube-proxy's nftables way on the same pods, in the same run; and what one backend's change costs the maps.

A lab `blb` (--name) of 1 cluster x 1 node (vxlan) with pods `server-a` and `server-b` (each accepting on TCP 7000
and closing at once) and `client`, in namespace `bench`. Services `s<i>` (port 80 -> 7000, both servers as
backends, each with a ClusterIP of the bench's own choosing in 10.100.0.0/16) are applied through the cluster's
store (`lab env`'s bridge) with their EndpointSlices, in steps up to 10, 1,000, 10,000 and 30,000 (--quick: up to
10,000); the agent programs its maps from them. At each size, rounds alternate:

- eBPF: the client runs in its pod's cgroup, so its connect() to a ClusterIP is sent to a backend by the socket
  load balancer;
- nftables: the client runs outside it, no program on its veth, and the node holds kube-proxy's nftables rules for
  the same Services (a verdict map of ClusterIP . port to a chain per Service, a random pick among its backends with
  `numgen`, DNAT), rebuilt for each size.

`lb_conn_rate_ratio_<n>`: connections per second (a Python client opening and resetting connections to a random
Service among 10 spread over the n: the same number at every size, so that only the number of Services changes),
eBPF over nftables (goal >= 1.0 at every size). `lb_latency_us_<n>`: the median time of connect() on the eBPF path;
`lb_latency_growth` = at the largest size / at 10 (goal <= 1.1: flat); nftables' own figures beside them.
`lb_update_writes`, `lb_update_ms`: one backend removed from one Service among 10,000 (its EndpointSlice written
again): the agent's map writes for it (goal: that Service's entries only) and the time from the store write to the
Service's entry in the node's map (read from its pin).

Usage: python bench/lb.py [--quick] [--name blb] (root). The last line of output is one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/agent.py would hide the agent package

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import time
from typing import Any

from bpf.lbmaps import TCP, LbFrontendKey, LbServiceMap
from bpf.syscall import MapFd
from clustermesh.contexts import ContextFile
from clustermesh.lab import cgroups, netns
from clustermesh.lab.lab import BIN, Lab, down, require_root
from clustermesh.lab.layout import LabLayout
from clustermesh.lab.pods import add_named_pod
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.standalone import StandaloneStore
from kvstore import etcd

BACKEND_PORT = 7000
TARGETS = 10  # Services the client spreads its connections over, at every size
SERVICE_CIDR = ipaddress.ip_network("10.100.0.0/16")
SLICE = kind_by_name("EndpointSlice")

ACCEPT_LOOP = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
CONN_LOOP = """
import json, random, socket, struct, sys, time
targets, seconds = sys.argv[1].split(","), float(sys.argv[2])
linger = struct.pack("ii", 1, 0)
times, count, deadline = [], 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    s = socket.socket(); s.settimeout(2)
    started = time.perf_counter()
    s.connect((random.choice(targets), 80))
    times.append(time.perf_counter() - started)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger); s.close()
    count += 1
times.sort()
print(json.dumps({"rate": count / seconds, "median_us": 1e6 * times[len(times) // 2]}))
"""


def say(line: str) -> None:
    print(line, flush=True)


def cluster_ip(index: int) -> str:
    return str(SERVICE_CIDR.network_address + 256 + index)  # from 10.100.1.0


def service(index: int) -> dict[str, Any]:
    port = {"name": "http", "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{index}", "namespace": "bench"},
            "spec": {"clusterIP": cluster_ip(index), "selector": {"app": "server"}, "ports": [port]}}  # fmt: skip


def endpoint_slice(index: int, backends: list[str]) -> dict[str, Any]:
    labels = {"kubernetes.io/service-name": f"s{index}"}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"s{index}-1", "namespace": "bench", "labels": labels},
            "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in backends]}  # fmt: skip


async def create_many(store: StandaloneStore, objects: list[dict[str, Any]], parallel: int = 48) -> None:
    queue = list(reversed(objects))

    async def worker() -> None:
        while queue:
            await store.create(queue.pop())

    await asyncio.gather(*(worker() for _ in range(parallel)))


def nft_rules(count: int, backends: list[str]) -> str:
    """kube-proxy's nftables way (pkg/proxy/nftables): a verdict map from ClusterIP . protocol . port to a chain per
    Service, which picks an endpoint chain at random, which DNATs."""
    lines = ["table ip blbkubeproxy {"]
    for number, ip in enumerate(backends):
        lines += [f" chain endpoint-{number} {{", f"  meta l4proto tcp dnat to {ip}:{BACKEND_PORT}", " }"]
    picks = ", ".join(f"{n} : goto endpoint-{n}" for n in range(len(backends)))
    for index in range(count):
        lines += [f" chain service-{index} {{", f"  numgen random mod {len(backends)} vmap {{ {picks} }}", " }"]
    elements = ", ".join(f"{cluster_ip(i)} . tcp . 80 : goto service-{i}" for i in range(count))
    lines += [" map service-ips {", "  type ipv4_addr . inet_proto . inet_service : verdict",
              f"  elements = {{ {elements} }}", " }",
              " chain services {", "  ip daddr . meta l4proto . th dport vmap @service-ips", " }",
              " chain prerouting {", "  type nat hook prerouting priority dstnat; policy accept;", "  jump services",
              " }", "}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_client(lab: Lab, targets: list[str], seconds: float, *, in_cgroup: bool) -> dict[str, float]:
    record = lab.state.pods["c1/bench/client"]
    cgroup = Path(record["cgroup"])
    result = subprocess.run([*netns.nsenter(record["netns"]), sys.executable, "-c", CONN_LOOP, ",".join(targets),
                             str(seconds)], capture_output=True, text=True, timeout=seconds + 60, check=False,
                            preexec_fn=(lambda: cgroups.join(cgroup)) if in_cgroup else None)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the client failed: {result.stderr[-600:]}")
    found: dict[str, float] = json.loads(result.stdout)
    return found


def tc(lab: Lab, node_ns: str, veth: str, attach: bool) -> None:
    progs = next((lab.layout.bpf_dir / "c1-node-1").glob("*/progs"))
    for hook, program in (("ingress", "cm_from_pod"), ("egress", "cm_to_pod")):
        if attach:
            netns.run(*netns.nsenter(node_ns), "tc", "filter", "replace", "dev", veth, hook, "pref", "1", "handle",
                      "1", "bpf", "da", "pinned", str(progs / program))  # fmt: skip
        else:
            netns.run(*netns.nsenter(node_ns), "tc", "filter", "del", "dev", veth, hook, "pref", "1")


def services_map(lab: Lab) -> LbServiceMap:
    [pin] = (lab.layout.bpf_dir / "c1-node-1").glob("*/sock/maps/cm_lb_services")
    return LbServiceMap(MapFd.pinned(str(pin)))


def until(what: str, condition: Any, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.005)  # the agent writing its maps: their pins are all there is to look at
    return time.monotonic() - started


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def settle(lab: Lab, timeout: float = 300) -> float:
    """Until the cluster's processes (etcd, apiserver, agent) use under 5% of a CPU for a second: the apiserver
    exporting the last Services would otherwise take a core from both paths' measurements."""
    names = [lab.layout.cluster(1).control_plane_netns, *(n.netns for n in lab.state.node_layouts())]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pids = netns.processes_in(names)
        before = cpu_seconds(pids)
        time.sleep(1)
        if cpu_seconds(pids) - before < 0.05:
            break
    return time.monotonic() - started


def lb_writes(lab: Lab) -> int:
    result = subprocess.run([str(BIN / "clustermesh"), "service", "list", "--lab", lab.layout.name, "-o", "json"],
                            capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    [document] = json.loads(result.stdout).values()
    return int(sum(document["map_writes"].values()))


async def run(lab: Lab, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    context = ContextFile.load(config).get("c1")
    backend = await etcd.connect(context.etcd_config(config.parent))
    store = StandaloneStore(backend)
    node = lab.state.node_layouts()[0]
    acceptors = []
    try:
        await store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})
        made = {name: add_named_pod(lab, 1, name, namespace="bench", labels={"app": app}, node=node)
                for name, app in (("server-a", "server"), ("server-b", "server"), ("client", "client"))}  # fmt: skip
        backends = [made["server-a"]["ip"], made["server-b"]["ip"]]
        for name in ("server-a", "server-b"):
            record = lab.state.pods[f"c1/bench/{name}"]
            acceptor = subprocess.Popen([*netns.nsenter(record["netns"]), sys.executable, "-u", "-c", ACCEPT_LOOP,  # noqa: ASYNC220
                                         str(BACKEND_PORT)], stdout=subprocess.PIPE, text=True)  # fmt: skip
            acceptors.append(acceptor)
            assert acceptor.stdout is not None and acceptor.stdout.readline().strip() == "ready"
        client_veth = json.loads(netns.run(*netns.nsenter(node.netns), "ip", "-j", "route", "get",
                                           made["client"]["ip"]))[0]["dev"]  # fmt: skip
        lb_map = services_map(lab)
        created = 0
        for size in args.sizes:
            started = time.monotonic()
            created_before = created
            await create_many(store, [service(i) for i in range(created, size)])
            await create_many(store, [endpoint_slice(i, backends) for i in range(created, size)])
            created = size
            sample = [LbFrontendKey(cluster_ip(i), 80, TCP) for i in {size - 1, *range(created_before, size, 97)}]
            waited = until(f"{size} Services with their backends in the node's map",
                           lambda keys=sample: all((lb_map.get(k) or (0, 0))[1] == 2 for k in keys), 600)  # fmt: skip
            say(
                f"{size} Services applied and in the node's map in {time.monotonic() - started:.1f} s "
                f"(the last {waited:.1f} s waiting for the agent); quiet after {settle(lab):.1f} s more"
            )
            # the same number of Services connected to at every size, spread over all n: only the map's size changes
            targets = [cluster_ip(i * size // TARGETS) for i in range(TARGETS)]
            rules = nft_rules(size, backends)
            ebpf, nft = [], []
            run_client(lab, targets, 1, in_cgroup=True)  # a warm-up, not counted
            for round_ in range(args.rounds):
                for path in ("ebpf", "nft") if round_ % 2 == 0 else ("nft", "ebpf"):
                    if path == "ebpf":
                        ebpf.append(run_client(lab, targets, args.seconds, in_cgroup=True))
                        continue
                    tc(lab, node.netns, client_veth, attach=False)
                    netns.run(*netns.nsenter(node.netns), "nft", "-f", "-", input=rules.encode(), timeout=300)
                    try:
                        nft.append(run_client(lab, targets, args.seconds, in_cgroup=False))
                    finally:
                        netns.run(*netns.nsenter(node.netns), "nft", "delete", "table", "ip", "blbkubeproxy",
                                  check=False)  # fmt: skip
                        tc(lab, node.netns, client_veth, attach=True)
            rate_ebpf = statistics.median(r["rate"] for r in ebpf)
            rate_nft = statistics.median(r["rate"] for r in nft)
            latency_ebpf = statistics.median(r["median_us"] for r in ebpf)
            latency_nft = statistics.median(r["median_us"] for r in nft)
            figures[f"lb_conn_rate_{size}"] = round(rate_ebpf)
            figures[f"nft_conn_rate_{size}"] = round(rate_nft)
            figures[f"lb_conn_rate_ratio_{size}"] = round(rate_ebpf / rate_nft, 3)
            figures[f"lb_latency_us_{size}"] = round(latency_ebpf, 1)
            figures[f"nft_latency_us_{size}"] = round(latency_nft, 1)
            say(
                f"  {size} Services: eBPF {rate_ebpf:.0f} conn/s, connect() {latency_ebpf:.0f} µs; nftables "
                f"{rate_nft:.0f} conn/s, {latency_nft:.0f} µs; ratio {rate_ebpf / rate_nft:.3f}"
            )
            if size == 10_000 or (size == args.sizes[-1] and "lb_update_writes" not in figures):
                before = lb_writes(lab)
                key = LbFrontendKey(cluster_ip(size // 2), 80, TCP)
                current = await store.get(SLICE, f"s{size // 2}-1", "bench")
                assert current is not None
                started = time.monotonic()
                await store.update({**endpoint_slice(size // 2, backends[:1]), "metadata": current["metadata"]})
                until("the changed Service in the map", lambda k=key: (lb_map.get(k) or (0, 0))[1] == 1, 30)
                figures["lb_update_ms"] = round(1000 * (time.monotonic() - started), 1)
                await asyncio.sleep(0.5)  # whatever else the agent would write, counted below
                figures["lb_update_writes"] = lb_writes(lab) - before
                figures["lb_update_services"] = size
                say(
                    f"  one backend of one Service among {size} removed: {figures['lb_update_writes']} map writes, "
                    f"in the map after {figures['lb_update_ms']} ms"
                )
        smallest, largest = args.sizes[0], args.sizes[-1]
        figures["lb_latency_growth"] = round(figures[f"lb_latency_us_{largest}"] / figures[f"lb_latency_us_{smallest}"],
                                             3)  # fmt: skip
        figures["nft_latency_growth"] = round(
            figures[f"nft_latency_us_{largest}"] / figures[f"nft_latency_us_{smallest}"], 3
        )
    finally:
        for acceptor in acceptors:
            acceptor.kill()
            acceptor.wait()
        await backend.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="up to 10,000 Services, 2 rounds of 1 s")
    parser.add_argument("--name", default="blb", help="the lab's name")
    args = parser.parse_args()
    args.sizes = [10, 1000, 10_000] if args.quick else [10, 1000, 10_000, 30_000]
    args.rounds, args.seconds = (2, 1.0) if args.quick else (3, 3.0)
    require_root()
    started = time.monotonic()
    if LabLayout(args.name, 1, 1, 1).state_dir.exists() or netns.list_netns(f"{args.name}-"):
        down(args.name, progress=lambda line: None)
    figures: dict[str, Any] = {}
    try:
        up = subprocess.run([str(BIN / "clustermesh"), "lab", "up", "--name", args.name, "--clusters", "1", "--nodes",
                             "1", "--pods", "1", "--routing", "vxlan"], capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"lab up failed: {up.stdout[-1500:]}{up.stderr[-1500:]}")
        lab = Lab.existing(args.name, progress=lambda line: None)
        say(f"lab {args.name} up (1 cluster x 1 node, vxlan) in {time.monotonic() - started:.0f} s")
        figures = asyncio.run(run(lab, lab.env(), args))
        sizes = args.sizes
        figures["goals_met"] = {
            **{f"lb_conn_rate_ratio_{n}": figures[f"lb_conn_rate_ratio_{n}"] >= 1.0 for n in sizes},
            "lb_latency_growth": figures["lb_latency_growth"] <= 1.1,
        }
    except Exception as exc:
        figures["error"] = str(exc)
        raise
    finally:
        down(args.name, progress=lambda line: None)
        figures["seconds"] = round(time.monotonic() - started)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
