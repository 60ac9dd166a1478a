"""The relay: every node's flows, of every connected cluster, merged, over mutual TLS; nodes it cannot read named.

One lab of 2 clusters x 1 node (vxlan), a relay per cluster in its control plane's namespace (as `lab up` starts
them). Flows come from a ping across the clusters, seen by both nodes.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import certs
from clustermesh.daemon.tls import hubble_server_name
from clustermesh.lab import netns
from tests.e2e.labtools import PYTHON, LabHandle, clustermesh, describe, in_netns, lab_owned, wait_until

LAB = "e2erly"

#: A TLS client of a node's flow service run from the c1 control plane's namespace: prints the status line or the error.
ASK = """
import socket, ssl, sys
host, name, ca, cert, key = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
if cert != "-":
    context.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, 4244), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"GET /v1/flows?since=0 HTTP/1.1\\r\\nContent-Length: 0\\r\\n\\r\\n")
            data = tls.recv(200)
            print(data.split(b"\\r\\n")[0].decode() if data else "closed without an answer")
except (OSError, ssl.SSLError) as exc:
    print(f"refused: {exc}")
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with lab_owned(LAB, routing="vxlan", clusters=2, nodes=1, pods=1) as handle:
        ping = in_netns(f"{LAB}-c1-pod-1-1", "ping", "-c", "2", "-W", "1", handle.pod_ip("c2/pod-1-1"))
        assert ping.returncode == 0, describe(ping)
        yield handle


def observe(*args: str) -> tuple[list[dict[str, Any]], str]:
    result = clustermesh("observe", "--lab", LAB, "-o", "json", "--last", "100", *args, timeout=60)
    assert result.returncode == 0, describe(result)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()], result.stderr


def nodes_seen(flows: list[dict[str, Any]]) -> set[str]:
    return {flow["node_name"] for flow in flows}


def test_one_relay_gives_the_flows_of_every_node_of_every_cluster_in_time_order(lab: LabHandle) -> None:
    for cluster in ("c1", "c2"):
        found: list[dict[str, Any]] = []

        def both(cluster: str = cluster, found: list[dict[str, Any]] = found) -> tuple[bool, object]:
            found[:] = observe("--cluster", cluster)[0]
            return nodes_seen(found) == {"c1/c1-node-1", "c2/c2-node-1"}, nodes_seen(found)

        wait_until(f"the relay of {cluster} gives both nodes' flows", both, timeout=30)
        times = [flow["time"] for flow in found]
        assert times == sorted(times), "merged in time order"
        icmp = [f for f in found if "ICMPv4" in f["flow"].get("l4", {})]
        assert {f["flow"]["traffic_direction"] for f in icmp} == {"EGRESS", "INGRESS"}, (
            "seen leaving c1 and entering c2"
        )


def test_filters_by_node_and_time_window(lab: LabHandle) -> None:
    flows, _ = observe("--node", "c2/*")
    assert flows and nodes_seen(flows) == {"c2/c2-node-1"}
    assert observe("--since", "2000-01-01T00:00:00Z")[0], "every flow is after 2000"
    assert observe("--until", "2000-01-01T00:00:00Z")[0] == [], "no flow before 2000"
    assert observe("--since", "1h")[0], "a duration before now"
    bad = clustermesh("observe", "--lab", LAB, "--since", "yesterday")
    assert bad.returncode == 2 and "neither a time" in bad.stderr, describe(bad)


def _ask(lab: LabHandle, cert: str, key: str, ca: Path) -> str:
    node = lab.node("c2-node-1")
    name = hubble_server_name("c2", node.name)
    result = in_netns(f"{LAB}-c1-cp", PYTHON, "-c", ASK, node.ip, name, str(ca), cert, key)
    assert result.returncode == 0, describe(result)
    return result.stdout.strip()


def test_a_node_s_flow_service_answers_only_clients_of_the_mesh_ca(lab: LabHandle, tmp_path: Path) -> None:
    ca = Path(f"/run/clustermesh-lab/{LAB}/c1/pki/ca.crt")
    relay = Path(f"/run/clustermesh-lab/{LAB}/c1/relay-certs")
    assert _ask(lab, str(relay / "client.crt"), str(relay / "client.key"), ca) == "HTTP/1.1 200 OK"
    assert _ask(lab, "-", "-", ca) != "HTTP/1.1 200 OK", "no client certificate: refused"
    stranger_ca = certs.create_ca("stranger")
    stranger = certs.CertPaths.in_dir(tmp_path, "stranger")
    certs.write_issued(certs.issue_client(stranger_ca, "hubble-relay"), stranger)
    assert _ask(lab, str(stranger.cert), str(stranger.key), ca) != "HTTP/1.1 200 OK", "another CA's client: refused"


def test_a_node_that_cannot_be_read_is_named_then_read_again(lab: LabHandle) -> None:
    [agent] = [pid for pid in netns.processes_in([f"{LAB}-c2-n1"]) if b"clustermesh-agent" in
               Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
    os.kill(agent, signal.SIGSTOP)  # it answers nothing, as a node behind a broken link
    try:

        def named() -> tuple[bool, object]:
            flows, stderr = observe()
            return "flows not read from c2/c2-node-1" in stderr and "c1/c1-node-1" in nodes_seen(flows), stderr

        wait_until("the relay names the node it cannot read", named, timeout=40, every=2)
    finally:
        os.kill(agent, signal.SIGCONT)

    def back() -> tuple[bool, object]:
        _, stderr = observe()
        return "c2/c2-node-1" not in stderr, stderr

    wait_until("the node is read again", back, timeout=40, every=1)
