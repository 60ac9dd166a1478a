"""Benchmark of the relay: what gathering flows costs per flow, against reading one agent directly, in the same run.

A lab `brl` (--name) of 2 clusters x 1 node (vxlan), a pod in each. Each round, a burst of N new UDP flows (one socket
sending to N ports of the round's own) from c1's pod to c2's pod: each flow is told by
both nodes (leaving c1, entering c2), so the relay of c1 gathers 2N, c1's agent holds N. Figures (medians of the
rounds):

- `relay_cpu_us_per_flow`: the relay's CPU time (user + system, from /proc) from the burst's start until it has all
  2N, per flow; `agent_cpu_us_per_flow`: c1's agent's, per flow it told (its datapath events, naming, serving the
  relay), for scale;
- `relay_delay_ms` / `agent_delay_ms`: from the burst's end until the relay's socket gives the last of the round's
  flows, and until c1's agent's own socket gives its last (both polled alike, every 20 ms);
- `relay_fetch_ms` / `agent_fetch_ms`: reading the last 1,000 flows from the relay (merged from two nodes, sorted)
  and from c1's agent; `fetch_ratio` is their ratio.

Usage: python bench/relay.py [--quick] [--name brl] (root). The last line of output is one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from typing import Any

from clustermesh.daemon import client
from clustermesh.lab import netns
from clustermesh.lab.lab import BIN, Lab, down, require_root
from clustermesh.lab.layout import LabLayout

BURST = """
import socket, sys
target, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(first, first + count):  # one socket, a port each: every flow is new to the datapath
    s.sendto(b"x", (target, port))
"""


def say(line: str) -> None:
    print(line, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process(names: list[str], program: str) -> int:
    [pid] = [p for p in netns.processes_in(names) if program.encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


async def flows(socket: Path, query: str) -> dict[str, Any]:
    answer = await client.request(socket, "GET", f"/v1/flows?{query}", timeout=30)
    document: dict[str, Any] = answer.json()
    return document


def udp_port(flow: dict[str, Any]) -> int:
    return int(((flow["flow"].get("l4") or {}).get("UDP") or {}).get("destination_port") or 0)


async def until_count(socket: Path, after: int, ports: range, expected: int, timeout: float = 60) -> float:
    """Seconds until the socket has given `expected` flows to `ports` numbered after `after`."""
    started, seen, since = time.monotonic(), 0, after
    while seen < expected:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{socket}: {seen} of {expected} flows to ports {ports} after {timeout:.0f} s")
        document = await flows(socket, f"since={since}")
        seen += sum(1 for flow in document["flows"] if udp_port(flow) in ports)
        since = document["next"]
        if seen < expected:
            await asyncio.sleep(0.02)
    return time.monotonic() - started


async def fetch_ms(socket: Path, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await flows(socket, "since=0&last=1000")
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


async def run(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    relay_socket = lab.relay_socket(1)
    node = next(n for n in lab.state.node_layouts() if n.cluster == 1)
    agent_socket = lab.socket(node)
    relay_pid = process([lab.layout.cluster(1).control_plane_netns], "clustermesh-relay")
    agent_pid = process([node.netns], "clustermesh-agent")
    target = lab.state.pods["c2/pod-1-1"]["ip"]
    source_netns = lab.state.pods["c1/pod-1-1"]["netns"]
    started = time.monotonic()
    while True:  # the relay follows both nodes before the first burst (a node it meets later: its last 1,000 only)
        nodes = (await flows(relay_socket, "since=0&last=1"))["nodes"]
        if sum(n["state"] == "connected" for n in nodes) == 2:
            break
        if time.monotonic() - started > 30:
            raise RuntimeError(f"the relay does not follow both nodes: {nodes}")
        await asyncio.sleep(0.2)
    rounds: list[dict[str, float]] = []
    for round_ in range(args.rounds):
        ports = range(20000 + round_ * args.flows, 20000 + (round_ + 1) * args.flows)
        relay_after = (await flows(relay_socket, "since=0&last=1"))["newest"]
        agent_after = (await flows(agent_socket, "since=0&last=1"))["newest"]
        relay_cpu, agent_cpu = cpu_seconds(relay_pid), cpu_seconds(agent_pid)
        command = [*netns.nsenter(source_netns), sys.executable, "-c", BURST, target, str(ports[0]), str(args.flows)]
        burst = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)  # noqa: ASYNC221
        if burst.returncode != 0:
            raise RuntimeError(f"the burst failed: {burst.stderr[-500:]}")
        agent_delay, relay_delay = await asyncio.gather(
            until_count(agent_socket, agent_after, ports, args.flows),
            until_count(relay_socket, relay_after, ports, 2 * args.flows),
        )
        rounds.append({
            "relay_cpu_us_per_flow": 1e6 * (cpu_seconds(relay_pid) - relay_cpu) / (2 * args.flows),
            "agent_cpu_us_per_flow": 1e6 * (cpu_seconds(agent_pid) - agent_cpu) / args.flows,
            "relay_delay_ms": 1000 * relay_delay, "agent_delay_ms": 1000 * agent_delay,
        })  # fmt: skip
        say(f"round {round_ + 1}: {2 * args.flows} flows; relay {rounds[-1]['relay_cpu_us_per_flow']:.0f} µs CPU per "
            f"flow, all in {relay_delay * 1000:.0f} ms; agent {agent_delay * 1000:.0f} ms")  # fmt: skip
    figures = {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]}
    figures["relay_fetch_ms"] = round(await fetch_ms(relay_socket), 2)
    figures["agent_fetch_ms"] = round(await fetch_ms(agent_socket), 2)
    figures["fetch_ratio"] = round(figures["relay_fetch_ms"] / figures["agent_fetch_ms"], 2)
    figures["flows_per_round"] = 2 * args.flows
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 500 flows")
    parser.add_argument("--name", default="brl", help="the lab's name")
    args = parser.parse_args()
    args.rounds, args.flows = (1, 500) if args.quick else (3, 2000)
    require_root()
    started = time.monotonic()
    if LabLayout(args.name, 2, 1, 1).state_dir.exists() or netns.list_netns(f"{args.name}-"):
        down(args.name, progress=lambda line: None)
    figures: dict[str, Any] = {}
    try:
        up = subprocess.run([str(BIN / "clustermesh"), "lab", "up", "--name", args.name, "--clusters", "2", "--nodes",
                             "1", "--pods", "1", "--routing", "vxlan"], capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"lab up failed: {up.stdout[-1500:]}{up.stderr[-1500:]}")
        lab = Lab.existing(args.name, progress=lambda line: None)
        say(f"lab {args.name} up (2 clusters x 1 node, vxlan) in {time.monotonic() - started:.0f} s")
        figures = asyncio.run(run(lab, args))
    except Exception as exc:
        figures["error"] = str(exc)
        raise
    finally:
        down(args.name, progress=lambda line: None)
        figures["seconds"] = round(time.monotonic() - started)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
