"""Every certificate of a running mesh rotated with `clustermesh certs rotate`, under traffic and churn: the
apiservers' and agents' etcd clients, the flow services, the relays and IPsec's charon take the new files up with
no process of the mesh restarted and no watch lost (no reconnection; pods added and deleted during the rotation reach
the other cluster). Then a CA roll in its three steps (bundle, new leaves, drop the old CA), for which only etcd is
restarted: etcd 3.4 reads its trusted CA file at start only.

One lab of 2 clusters x 1 node over IPsec (so charon is in play), a ping across the clusters all along.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import certs
from clustermesh.lab import netns
from tests.e2e.labtools import PYTHON, LabHandle, clustermesh, describe, in_netns, lab_owned, stop, wait_until

LAB = "e2erot"
STATE = Path(f"/run/clustermesh-lab/{LAB}")

#: The serial numbers of the certificates loaded into a node's charon, read over its vici socket.
CHARON_CERTS = """
import socket, sys, vici
from cryptography import x509
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
for cert in vici.Session(sock).list_certs({"type": "X509"}):
    print(x509.load_der_x509_certificate(bytes(cert["data"])).serial_number)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with lab_owned(LAB, routing="ipsec", clusters=2, nodes=1, pods=1) as handle:
        yield handle


def mesh_processes(lab: LabHandle) -> dict[int, str]:
    """The mesh's own processes (apiservers, agents, relays, charons): PID -> name and start time (a restart changes
    one or the other)."""
    found = {}
    for pid in lab.processes():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("clustermesh") or name == "charon":
            found[pid] = f"{name}@{stat[stat.rindex(')') + 2 :].split()[19]}"
    return found


def kinds(processes: dict[int, str]) -> list[str]:
    return sorted(what.split("@")[0] for what in processes.values())


def agent_status(lab: LabHandle, node: str) -> dict[str, Any]:
    result = clustermesh("status", "--socket", str(STATE / node / "agent.sock"), "-o", "json")
    assert result.returncode == 0, describe(result)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def cluster_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in status["clusters"] if c["name"] == name)


def charon_serials(lab: LabHandle, node: str) -> set[int]:
    result = in_netns(
        lab.node(node).netns, PYTHON, "-c", CHARON_CERTS, str(STATE / node / "state" / "ipsec" / "charon.vici")
    )
    assert result.returncode == 0, describe(result)
    return {int(line) for line in result.stdout.split()}


def serial(path: Path) -> int:
    return certs.load_certificates(path)[0].serial_number


def rotate(*args: str) -> dict[str, Any]:
    result = clustermesh("certs", "rotate", "--lab", LAB, "-o", "json", *args, timeout=180)
    assert result.returncode == 0, describe(result)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


class Pinger:
    """A ping from c1's pod to c2's, five a second, for as long as the test runs its steps."""

    def __init__(self, lab: LabHandle) -> None:
        target = lab.pod_ip("c2/pod-1-1")
        self.process = subprocess.Popen(
            [*netns.nsenter(f"{LAB}-c1-pod-1-1"), "ping", "-n", "-i", "0.2", "-W", "1", target],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def finish(self) -> tuple[int, int]:
        """(sent, answered)."""
        self.process.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        try:
            out, _ = self.process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            stop(self.process)
            raise
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert match, out[-500:]
        return int(match[1]), int(match[2])


def flows_read(lab: LabHandle) -> tuple[bool, object]:
    """A new ping's flow, read through c1's relay from both clusters' nodes (a node it cannot read is named on
    stderr)."""
    lab.ping("c2/pod-1-1", lab.pod_ip("c1/pod-1-1"))
    flows = clustermesh("observe", "--lab", LAB, "-o", "json", "--last", "50", "--since", "5s")
    nodes = {json.loads(line)["node_name"] for line in flows.stdout.splitlines() if line.strip()}
    return flows.returncode == 0 and nodes == {"c1/c1-node-1", "c2/c2-node-1"} and not flows.stderr, (
        nodes,
        flows.stderr,
    )


def all_ready(lab: LabHandle) -> tuple[bool, object]:
    nodes = lab.status()["nodes"]
    return all(node.get("ready") for node in nodes.values()), {n: node.get("not_ready") for n, node in nodes.items()}


def endpoints_seen(lab: LabHandle, observer: str, cluster: str) -> int:
    return int(cluster_of(agent_status(lab, observer), cluster)["counts"]["endpoints"])


def churn(lab: LabHandle, index: int) -> str:
    """A pod added in c2; the caller checks that c1's agent sees it (it came through c1's watch on c2's etcd)."""
    name = f"churn-{index}"
    result = clustermesh("lab", "pod", "add", LAB, "c2", name, "-o", "json")
    assert result.returncode == 0, describe(result)
    return name


def test_every_certificate_rotated_under_traffic_and_churn_with_no_restart_and_no_watch_lost(lab: LabHandle) -> None:
    before = mesh_processes(lab)
    assert len(kinds(before)) >= 8, kinds(before)  # 2 apiservers, 2 agents, 2 relays, 2 charons
    etcds = {cluster: lab.etcd_pid(cluster) for cluster in (1, 2)}
    sessions = {
        node: {c["name"]: c["reconnections"] for c in agent_status(lab, node)["clusters"]}
        for node in ("c1-node-1", "c2-node-1")
    }
    node_cert = STATE / "c1-node-1" / "ipsec-certs" / "node.crt"
    seen_before = endpoints_seen(lab, "c1-node-1", "c2")
    pinger = Pinger(lab)
    try:
        first = churn(lab, 1)
        report = rotate()
        second = churn(lab, 2)
        assert report["step"] == "leaves"
        rotated = {Path(p).relative_to(STATE).as_posix() for p in report["reissued"]}
        expected = {"c1/pki/server.crt", "c2/pki/remote-c1.crt", "c1/pki/admin-c1.crt", "c1/relay-certs/client.crt",
                    "c1-node-1/hubble-certs/server.crt", "c1-node-1/ipsec-certs/node.crt"}  # fmt: skip
        assert expected <= rotated, sorted(rotated)

        def taken_up() -> tuple[bool, object]:
            got = {
                node: {c["name"]: c.get("credential_reloads", 0) for c in agent_status(lab, node)["clusters"]}
                for node in ("c1-node-1", "c2-node-1")
            }
            return all(n >= 1 for reloads in got.values() for n in reloads.values()), got

        wait_until("every agent's session with every cluster takes the new certificates up", taken_up, timeout=30)

        def charon_has_it() -> tuple[bool, object]:
            return serial(node_cert) in charon_serials(lab, "c1-node-1"), serial(node_cert)

        wait_until("charon has the node's new certificate", charon_has_it, timeout=30)
        for cluster in ("c1", "c2"):
            log = (STATE / "logs" / f"apiserver-{cluster}.log").read_text()
            assert "rotated certificates taken up" in log, log[-2000:]

        wait_until("c1's agent sees both pods added around the rotation, through its watch of c2",
                   lambda: (endpoints_seen(lab, "c1-node-1", "c2") >= seen_before + 2,
                            endpoints_seen(lab, "c1-node-1", "c2")), timeout=30)  # fmt: skip
        for pod in (first, second):
            result = clustermesh("lab", "pod", "delete", LAB, f"c2/{pod}")
            assert result.returncode == 0, describe(result)
        wait_until("and sees them deleted", lambda: (endpoints_seen(lab, "c1-node-1", "c2") == seen_before,
                                                     endpoints_seen(lab, "c1-node-1", "c2")), timeout=30)  # fmt: skip

        wait_until("the relay reads every node's new flows with the new certificates", lambda: flows_read(lab),
                   timeout=30)  # fmt: skip
    finally:
        sent, answered = pinger.finish()
    assert sent >= 10 and answered >= sent - 2, f"{answered} of {sent} pings answered during the rotation"
    after = {node: {c["name"]: c["reconnections"] for c in agent_status(lab, node)["clusters"]}
             for node in ("c1-node-1", "c2-node-1")}  # fmt: skip
    assert after == sessions, "no session was replaced: every watch went on"
    assert {cluster: lab.etcd_pid(cluster) for cluster in (1, 2)} == etcds, "leaf rotation restarts no etcd either"
    assert mesh_processes(lab) == before, "no process of the mesh restarted"


def test_a_ca_roll_in_three_steps_keeps_the_mesh_up(lab: LabHandle) -> None:
    before = mesh_processes(lab)
    ca_file = STATE / "c1" / "pki" / "ca.crt"
    old_ca = certs.load_certificates(ca_file)[0]
    pinger = Pinger(lab)
    try:
        first = rotate("--new-ca")
        assert first["step"] == "new-ca" and "certs rotate --lab" in first["next"]
        bundle = certs.load_certificates(ca_file)
        assert len(bundle) == 2 and bundle[1] == old_ca
        new_ca = bundle[0]
        ipsec_copy = STATE / "c1-node-1" / "ipsec-certs" / "ca.crt"
        assert certs.load_certificates(ipsec_copy) == bundle, "the CA's copies trust both"
        wait_until("the mesh is ready again after etcd's restart", lambda: all_ready(lab), timeout=60)
        rotate()
        node_cert = STATE / "c1-node-1" / "ipsec-certs" / "node.crt"
        certs.load_certificates(node_cert)[0].verify_directly_issued_by(new_ca)
        wait_until(
            "charon has the node's certificate of the new CA",
            lambda: (serial(node_cert) in charon_serials(lab, "c1-node-1"), serial(node_cert)),
            timeout=30,
        )
        last = rotate("--drop-old-ca")
        assert last["step"] == "drop-old-ca"
        assert certs.load_certificates(ca_file) == [new_ca]

        def ready_and_flowing() -> tuple[bool, object]:
            ready, seen = all_ready(lab)
            ping = lab.ping("c2/pod-1-1", lab.pod_ip("c1/pod-1-1"))
            return ready and ping.returncode == 0, (seen, ping.stdout[-200:])

        wait_until("every cluster ready and pods reach each other with only the new CA trusted", ready_and_flowing,
                   timeout=60)  # fmt: skip

        wait_until("the relay reads every node with certificates of the new CA", lambda: flows_read(lab), timeout=30)
    finally:
        sent, answered = pinger.finish()
    assert answered >= sent * 0.9, f"{answered} of {sent} pings answered during the CA roll (IPsec SAs stay up)"
    assert mesh_processes(lab) == before, "only etcd restarted"
