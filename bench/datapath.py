"""Benchmark of the lab's datapath: TCP throughput and latency pod to pod across clusters, for each routing mode,
against the bare tunnel of the same kind between the same two node namespaces, measured in the same run.

For each routing mode (wireguard, ipsec, vxlan, native), one after another so that they never compete for the CPUs,
a lab of 2 clusters of 1 node with 1 pod each is built (`clustermesh lab up`), measured and removed (`lab.down`).

1. pod to pod: iperf3 (one TCP stream) from c1/pod-1-1 to c2/pod-1-1, through everything the agents set up: the
   pod's veth, node c1-node-1's routes, the agent's tunnel, the underlay (the world router), node c2-node-1, the
   other pod's veth. <mode>_gbps is what the receiver got (Gbit/s); <mode>_rtt_us the median round trip of pings
   between the same pods (microseconds).
2. bare tunnel (the baseline): a tunnel of the same kind that the bench builds itself between the two node
   namespaces c1-node-1 and c2-node-1 of the same lab, with its own devices, addresses (172.31.0.1/30 and .2) and
   ports, the same MTU as the agents', and no pods, routes or agent configuration on it:
     wireguard  a second wireguard-go pair <lab>1b / <lab>2b (UDP 51872, MTU 1420), keys from `wg genkey`
     ipsec      a second charon per node (its own /run, IKE on UDP 1500, kernel-libipsec ESP in UDP, the
                agents' algorithms and MTU, certificates of a bench CA), between 172.31.0.1/32 and .2 on the
                nodes' loopbacks, driven by the agent's IpsecDriver
     vxlan      a second VXLAN device <lab>vx in each node (VNI 3, UDP 8473, MTU 1450), point to point
     native     the underlay itself: eth0 of one node, the world router, eth0 of the other
   <mode>_bare_gbps, <mode>_bare_rtt_us measured the same way, interleaved with the pod runs;
   <mode>_ratio = <mode>_gbps / <mode>_bare_gbps (goal >= 0.9): what the agent's datapath (pod veths, routing
   into the tunnel, its tunnel's configuration) costs over the tunnel alone. <mode>_meets_goal says whether it met it.
3. plain veth: two fresh namespaces <lab>-bench-a and <lab>-bench-b joined by a veth pair, before any lab: the
   ceiling of this host for one TCP stream. veth_gbps, veth_rtt_us.

A mode whose measurement fails (its lab does not come up, a pod cannot reach the other) gets <mode>_error and
<mode>_meets_goal false instead of figures, the other modes are measured all the same, and the exit status is 1.

Every iperf3 and ping runs inside the lab's namespaces (nsenter): no packet leaves the host's own namespace. The
lab is called `bdp` (--name); whatever of it is left over from an earlier run is removed first, and all of it
(namespaces, processes, the bench's WireGuard sockets) is removed at the end, also after a failure.

Usage: python bench/datapath.py [--quick] [--modes wireguard,vxlan] [--name bdp] [-v]. --quick: two 2 s runs per
path and 100 pings (under two minutes); otherwise 4 runs of 10 s per path and 300 pings. The runs of a mode take
turns, pod then bare, bare then pod, and so on, so that a drift of the host's load touches both alike; the figure
is their median (with an even count, the mean of the middle two). The last line of output is one JSON object of
all figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import certs
from agent.datapath.drivers import VXLAN_ID, VXLAN_PORT, VxlanDriver, wireguard_mtu
from agent.datapath.ipsec import IpsecDriver
from agent.datapath.routing import Peer
from clustermesh.lab import netns
from clustermesh.lab.lab import BIN, LabState, down, load, require_root
from clustermesh.lab.layout import STATE_ROOT, WIREGUARD_PORT, LabLayout, NodeLayout

GOAL_RATIO = 0.9
IPERF_PORT = 5201
NEAR_ADDRESS, FAR_ADDRESS = "172.31.0.1", "172.31.0.2"  # the bare tunnel's ends (a /30 no lab uses)
VETH_A, VETH_B = "172.31.1.1", "172.31.1.2"
RTT = re.compile(r"time=([0-9.]+) ms")


def say(line: str) -> None:
    print(line, flush=True)


# --- running things in namespaces


def in_netns(namespace: str, *command: str, timeout: float = 30, check: bool = True) -> str:
    return netns.run(*netns.nsenter(namespace), *command, timeout=timeout, check=check)


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.05)  # another process getting ready: nothing to wait on but its traces


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """By its PID: SIGTERM, then SIGKILL after 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def iperf(server_ns: str, client_ns: str, address: str, seconds: int, omit: int) -> float:
    """One TCP stream from client_ns to address (in server_ns) for `seconds` after `omit` seconds of warm-up;
    the receiver's Gbit/s."""
    server = subprocess.Popen(
        [*netns.nsenter(server_ns), "iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--forceflush"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        for line in server.stdout:  # it says so once its socket listens
            if "Server listening" in line:
                break
        else:
            raise RuntimeError(f"iperf3 server in {server_ns} did not start (exit {server.wait()})")
        limit = seconds + omit + 15
        try:
            output = in_netns(client_ns, "iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds),
                              "-O", str(omit), "--connect-timeout", "3000", "-J", timeout=limit,
                              check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"iperf3 {client_ns} -> {address}: no result after {limit} s, the stream stalled "
                               f"({reachability(client_ns, address)})") from None  # fmt: skip
        result = json.loads(output or "{}")
        if "error" in result or "end" not in result:
            error = result.get("error", output[-300:])
            raise RuntimeError(f"iperf3 {client_ns} -> {address}: {error} ({reachability(client_ns, address)})")
        server.communicate(timeout=10)
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        stop(server)


def reachability(namespace: str, address: str) -> str:
    """For an error message: whether pings still get through."""
    output = in_netns(namespace, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", address, check=False)
    received = re.search(r"(\d+) received", output)
    return f"ping from there: {received.group(1) if received else 0} of 3 answered"


def rtt_us(namespace: str, address: str, count: int) -> float:
    """Median round trip (µs) of `count` pings 10 ms apart (root may ping that often), after 3 to warm up (ARP, a
    WireGuard handshake)."""
    in_netns(namespace, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", address, check=False)
    output = in_netns(namespace, "ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", address,
                      timeout=count * 0.1 + 30, check=False)  # fmt: skip
    times = [float(ms) * 1000 for ms in RTT.findall(output)]
    if len(times) < count // 2:
        raise RuntimeError(f"ping {namespace} -> {address}: {len(times)} of {count} answered")
    return statistics.median(times)


# --- the bare tunnels: one builder per routing mode


@dataclass
class Ends:
    """The two node namespaces a bare tunnel joins; `cleanup` undoes what a builder made, `scratch` holds its keys."""

    lab: str
    near: NodeLayout
    far: NodeLayout
    cleanup: contextlib.ExitStack
    scratch: Path


def wireguard_go(ends: Ends, node: NodeLayout, interface: str) -> None:
    """wireguard-go for `interface` in the node's namespace, stopped by PID and its control socket removed at the
    end (the interface name is the socket's name in the host's /var/run/wireguard: unique, and the lab's)."""
    socket = Path(f"/var/run/wireguard/{interface}.sock")
    socket.unlink(missing_ok=True)  # ours, from a run that crashed
    process = subprocess.Popen(
        [*netns.nsenter(node.netns), "wireguard-go", "-f", interface],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    ends.cleanup.callback(socket.unlink, missing_ok=True)
    ends.cleanup.callback(stop, process)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"wireguard-go {interface} in {node.netns} exited with {process.returncode}")
        return socket.exists() and bool(netns.ip("link", "show", interface, netns=node.netns, check=False))

    wait_until(f"wireguard-go {interface} in {node.netns}", ready)


def bare_wireguard(ends: Ends) -> str:
    port = WIREGUARD_PORT + 1
    pairs = ((ends.near, NEAR_ADDRESS), (ends.far, FAR_ADDRESS))
    sides = [(node, f"{ends.lab}{node.cluster}b", address) for node, address in pairs]  # <lab>1b, <lab>2b
    keys: list[tuple[Path, str]] = []
    for _, interface, _ in sides:
        private = ends.scratch / f"{interface}.key"
        private.write_text(netns.run("wg", "genkey"))
        private.chmod(0o600)
        keys.append((private, netns.run("wg", "pubkey", input=private.read_bytes()).strip()))
    for number, (node, interface, address) in enumerate(sides):
        (peer, _, peer_address), (_, peer_key) = sides[1 - number], keys[1 - number]
        wireguard_go(ends, node, interface)
        in_netns(node.netns, "wg", "set", interface, "listen-port", str(port), "private-key", str(keys[number][0]),
                 "peer", peer_key, "endpoint", f"{peer.ip}:{port}", "allowed-ips", f"{peer_address}/32")  # fmt: skip
        netns.ip("addr", "add", f"{address}/30", "dev", interface, netns=node.netns)
        netns.ip("link", "set", interface, "mtu", str(wireguard_mtu()), "up", netns=node.netns)
    return FAR_ADDRESS


def bare_vxlan(ends: Ends) -> str:
    device = f"{ends.lab}vx"
    for node, peer, address in ((ends.near, ends.far, NEAR_ADDRESS), (ends.far, ends.near, FAR_ADDRESS)):
        netns.ip("link", "add", device, "type", "vxlan", "id", str(VXLAN_ID + 1), "dstport", str(VXLAN_PORT + 1),
                 "local", node.ip, "remote", peer.ip, "nolearning", netns=node.netns)  # fmt: skip
        ends.cleanup.callback(netns.ip, "link", "del", device, netns=node.netns, check=False)
        netns.ip("addr", "add", f"{address}/30", "dev", device, netns=node.netns)
        netns.ip("link", "set", device, "mtu", str(VxlanDriver.mtu), "up", netns=node.netns)
    return FAR_ADDRESS


def bare_ipsec(ends: Ends) -> str:
    """A second charon per node (kernel-libipsec, its own /run, IKE on UDP 1500), driven by the agent's own
    IpsecDriver with the agents' algorithms and MTU, between two /32s on the nodes' loopbacks; certificates from a
    CA of the bench's."""
    ca = certs.create_ca(f"{ends.lab}-bench-ca")
    ca_paths = certs.CertPaths.in_dir(ends.scratch, "ca")
    certs.write_issued(ca, ca_paths)
    sides = ((ends.near, ends.far, NEAR_ADDRESS, FAR_ADDRESS), (ends.far, ends.near, FAR_ADDRESS, NEAR_ADDRESS))
    drivers: list[tuple[IpsecDriver, dict[str, Peer]]] = []
    for node, peer, address, peer_address in sides:
        netns.ip("addr", "add", f"{address}/32", "dev", "lo", netns=node.netns)
        paths = certs.CertPaths.in_dir(ends.scratch, node.name)
        certs.write_issued(certs.issue_server(ca, node.name, hosts=[node.ip]), paths)
        driver = IpsecDriver(node_ip=node.ip, pod_cidrs=[f"{address}/32"], run_dir=ends.scratch / f"{node.name}-run",
                             cert=paths.cert, key=paths.key, ca=ca_paths.cert, ports=(1500, 5500),
                             wrapper=netns.nsenter(node.netns))  # fmt: skip
        drivers.append((driver, {peer.name: Peer(peer.name, peer.ip, (f"{peer_address}/32",))}))

    async def converge() -> None:
        try:
            async with asyncio.timeout(30):
                while True:
                    for driver, peers in drivers:
                        await driver.setup()
                        await driver.apply(peers)
                    if not any(driver.pending() for driver, _ in drivers):
                        return
                    await asyncio.sleep(0.5)  # IKE under way between the two charons
        except TimeoutError:
            raise RuntimeError(f"bare IPsec: no child SA after 30 s: {[d.sas for d, _ in drivers]}") from None

    # One event loop for the charons' whole life: they are children of its child watcher, and stop through it.
    runner = asyncio.Runner()
    ends.cleanup.callback(runner.close)

    def close(driver: IpsecDriver) -> None:
        runner.run(driver.close())

    for driver, _ in drivers:
        ends.cleanup.callback(close, driver)
    runner.run(converge())
    return FAR_ADDRESS


def bare_underlay(ends: Ends) -> str:
    return ends.far.ip


@dataclass(frozen=True)
class Mode:
    routing: str  # the lab's --routing
    baseline: str  # what the bare tunnel is, for the progress lines
    bare: Callable[[Ends], str]  # builds it between the two nodes; returns the far node's address on it


# A routing mode of the lab is measured once it has a row here.
MODES = {
    mode.routing: mode
    for mode in (
        Mode("wireguard", f"wireguard-go pair, UDP {WIREGUARD_PORT + 1}", bare_wireguard),
        Mode("ipsec", "a second charon per node, kernel-libipsec, IKE on UDP 1500", bare_ipsec),
        Mode("vxlan", f"VXLAN VNI {VXLAN_ID + 1}, UDP {VXLAN_PORT + 1}", bare_vxlan),
        Mode("native", "underlay eth0 -> world -> eth0", bare_underlay),
    )
}


# --- the runs


@dataclass(frozen=True)
class Settings:
    seconds: int
    omit: int
    repetitions: int
    pings: int
    verbose: bool

    def progress(self, line: str) -> None:
        if self.verbose:
            say(f"    {line}")


def lab_up(layout: LabLayout, settings: Settings) -> LabState:
    """`clustermesh lab up`, in a process of its own: `Lab.up` moves its process into the lab's world namespace,
    gRPC's threads with it, and a second lab's `up` in the same process cannot reach its etcd from there."""
    command = [str(BIN / "clustermesh"), "lab", "up", "--name", layout.name, "--clusters", str(layout.clusters),
               "--nodes", str(layout.nodes), "--pods", str(layout.pods), "--routing", layout.routing]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    for line in (result.stdout + result.stderr).splitlines():
        settings.progress(line)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed (exit {result.returncode}): {result.stderr.strip()}")
    return load(layout.name)


def remove(name: str, settings: Settings) -> None:
    down(name, progress=settings.progress)


def measure_veth(name: str, settings: Settings) -> dict[str, float]:
    a, b = f"{name}-bench-a", f"{name}-bench-b"
    try:
        for namespace in (a, b):
            netns.ip("netns", "add", namespace)
            netns.ip("link", "set", "lo", "up", netns=namespace)
        netns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", b, netns=a)
        for namespace, address in ((a, VETH_A), (b, VETH_B)):
            netns.ip("addr", "add", f"{address}/30", "dev", "veth0", netns=namespace)
            netns.ip("link", "set", "veth0", "up", netns=namespace)
        runs = [iperf(b, a, VETH_B, settings.seconds, settings.omit) for _ in range(settings.repetitions)]
        rtt = rtt_us(a, VETH_B, settings.pings)
    finally:
        for namespace in (a, b):
            netns.ip("netns", "del", namespace, check=False)
    figures = {"veth_gbps": round(statistics.median(runs), 3), "veth_rtt_us": round(rtt, 1)}
    say(f"veth: {figures['veth_gbps']} Gbit/s, rtt {figures['veth_rtt_us']} µs (the ceiling of this host)")
    return figures


def measure_mode(name: str, mode: Mode, settings: Settings) -> dict[str, float | bool]:
    layout = LabLayout(name, 2, 1, 1, mode.routing)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remove, name, settings)  # registered first: runs last, after the bare tunnel's undo
        started = time.monotonic()
        state = lab_up(layout, settings)
        near, far = layout.cluster(1).node(1), layout.cluster(2).node(1)
        client, server = state.pods["c1/pod-1-1"], state.pods["c2/pod-1-1"]
        scratch = Path(tempfile.mkdtemp(prefix="bench-datapath-"))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        address = mode.bare(Ends(name, near, far, cleanup, scratch))
        say(f"{mode.routing}: lab up in {time.monotonic() - started:.1f} s; pods {client['ip']} -> {server['ip']}, "
            f"bare tunnel ({mode.baseline}) {near.name} -> {far.name} {address}")  # fmt: skip
        paths = {"pod": (server["netns"], client["netns"], server["ip"]), "bare": (far.netns, near.netns, address)}
        runs: dict[str, list[float]] = {"pod": [], "bare": []}
        for number in range(settings.repetitions):  # in turn pod first, bare first: a drift touches both alike
            for path in ("pod", "bare") if number % 2 == 0 else ("bare", "pod"):
                runs[path].append(iperf(*paths[path], settings.seconds, settings.omit))
            if settings.repetitions > 1:
                say(
                    f"  round {number + 1}: pod to pod {runs['pod'][-1]:.2f} Gbit/s, bare {runs['bare'][-1]:.2f} Gbit/s"
                )
        pod_rtt = rtt_us(client["netns"], server["ip"], settings.pings)
        bare_rtt = rtt_us(near.netns, address, settings.pings)
    pod, bare = statistics.median(runs["pod"]), statistics.median(runs["bare"])
    ratio = pod / bare
    say(
        f"{mode.routing}: pod-to-pod {pod:.2f} Gbit/s, bare tunnel {bare:.2f} Gbit/s, ratio {ratio:.2f} "
        f"(goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'missed'}); "
        f"rtt {pod_rtt:.0f} µs pod-to-pod, {bare_rtt:.0f} µs bare"
    )
    return {
        f"{mode.routing}_gbps": round(pod, 3),
        f"{mode.routing}_bare_gbps": round(bare, 3),
        f"{mode.routing}_ratio": round(ratio, 3),
        f"{mode.routing}_meets_goal": ratio >= GOAL_RATIO,
        f"{mode.routing}_rtt_us": round(pod_rtt, 1),
        f"{mode.routing}_bare_rtt_us": round(bare_rtt, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two 2 s runs per path, 100 pings: under two minutes")
    parser.add_argument("--modes", default=",".join(MODES), help="routing modes, comma-separated (default: all)")
    parser.add_argument("--name", default="bdp", help="the bench's lab name (removed first if left over)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the lab's own progress")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    settings = Settings(seconds=2 if args.quick else 10, omit=1, repetitions=2 if args.quick else 4,
                        pings=100 if args.quick else 300, verbose=args.verbose)  # fmt: skip
    require_root()
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))  # clean up as after Ctrl-C
    name: str = LabLayout(args.name, 1, 1, 1).name  # validates it
    started = time.monotonic()
    say(f"datapath of lab {name}: modes {', '.join(modes)}; {settings.repetitions} run(s) of {settings.seconds} s "
        f"per path (after {settings.omit} s of warm-up), {settings.pings} pings")  # fmt: skip
    if netns.list_netns(f"{name}-") or (STATE_ROOT / name).exists():
        say(f"lab {name} is left over from an earlier run: removing it")
        remove(name, settings)
    figures: dict[str, float | bool | str | list[str]] = {"bench": "datapath", "quick": args.quick, "modes": modes}
    try:
        figures.update(measure_veth(name, settings))
        for mode in modes:
            try:
                figures.update(measure_mode(name, MODES[mode], settings))
            except Exception as exc:  # a broken datapath is a finding: say so, and measure the other modes
                error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                say(f"{mode}: FAILED: {error}")
                figures.update({f"{mode}_error": error, f"{mode}_meets_goal": False})
    finally:
        if netns.list_netns(f"{name}-") or (STATE_ROOT / name).exists():
            remove(name, settings)
    figures.update({
        "goal_ratio": GOAL_RATIO,
        "all_meet_goal": all(figures[f"{mode}_meets_goal"] for mode in modes),
        "seconds": settings.seconds, "repetitions": settings.repetitions, "pings": settings.pings,
        "elapsed_s": round(time.monotonic() - started, 1),
    })  # fmt: skip
    print(json.dumps(figures), flush=True)
    if any(f"{mode}_error" in figures for mode in modes):
        sys.exit(1)


if __name__ == "__main__":
    main()
