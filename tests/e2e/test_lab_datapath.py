"""The datapath of a real lab, for every routing mode: pods reach pods by IP across nodes and clusters (ICMP, TCP,
UDP, a full-size packet that may not be fragmented), WireGuard leaves nothing in clear on the underlay, nodes come and
go at run time, and a remote cluster whose etcd dies keeps its routes.

Every packet is sent from inside the lab's namespaces; captures run inside the world namespace. Tests wait on what
the lab shows (routes, peers, replies), with a deadline, never on fixed sleeps.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from pathlib import Path

import pytest

from agent.datapath.ipsec import connection_name
from clustermesh.lab import netns
from clustermesh.lab.netns import alive
from tests.e2e.labtools import (
    PYTHON,
    UDP_ASK,
    UDP_ECHO,
    UNDERLAYS,
    Capture,
    LabHandle,
    Packet,
    clustermesh,
    describe,
    lab_owned,
    serve,
    wait_until,
)

# (from, to): across clusters both ways, and within a cluster across nodes
PAIRS = [("c1/pod-1-1", "c2/pod-1-1"), ("c2/pod-2-1", "c1/pod-1-1"), ("c1/pod-1-1", "c1/pod-2-1")]
PAIR_IDS = ["c1-to-c2", "c2-to-c1", "c1-across-nodes"]


# --- 1. pods reach pods


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=PAIR_IDS)
def test_ping(datapath_lab: LabHandle, source: str, target: str) -> None:
    """ICMP echo from one pod to another by IP: routes both ways through the node's datapath."""
    result = datapath_lab.ping(source, datapath_lab.pod_ip(target), "-c", "2", "-i", "0.2")
    assert result.returncode == 0, describe(result)
    assert "2 received" in result.stdout, result.stdout


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=PAIR_IDS)
def test_tcp_http(datapath_lab: LabHandle, source: str, target: str, tmp_path: Path) -> None:
    """An HTTP server in one pod, a fetch from another returns its body: a TCP connection, several segments each way."""
    body = f"hello from {target} in lab {datapath_lab.name} {secrets.token_hex(4)}\n"
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text(body)
    ip = datapath_lab.pod_ip(target)
    server = [PYTHON, "-u", "-m", "http.server", "8080", "--bind", ip, "--directory", str(tmp_path / "www")]
    with serve(datapath_lab.state.pods[target]["netns"], server, ready="Serving HTTP", log=tmp_path / "http.log"):
        result = datapath_lab.exec(source, "curl", "-sS", "--max-time", "5", f"http://{ip}:8080/hello.txt")
    assert result.returncode == 0, describe(result)
    assert result.stdout == body


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=PAIR_IDS)
def test_udp_echo(datapath_lab: LabHandle, source: str, target: str, tmp_path: Path) -> None:
    """A UDP datagram to a server in another pod comes back changed by that server (not reflected on the way)."""
    ip = datapath_lab.pod_ip(target)
    message = f"udp-{secrets.token_hex(4)}"
    with serve(datapath_lab.state.pods[target]["netns"], [PYTHON, "-u", "-c", UDP_ECHO, ip, "9999"], ready="ready",
               log=tmp_path / "udp.log"):  # fmt: skip
        result = datapath_lab.exec(source, PYTHON, "-c", UDP_ASK, ip, "9999", message)
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == f"echo:{message}"


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=PAIR_IDS)
def test_full_size_packet_with_dont_fragment(datapath_lab: LabHandle, source: str, target: str) -> None:
    """A 1400-byte IP packet with DF set gets through, and so does one as large as the pod's own MTU: the pods' MTU
    leaves room for the tunnel's overhead, and nothing on the way needs to fragment (a pod MTU too large for the path
    shows here as a lost packet or a `message too long`)."""
    lab = datapath_lab
    link = lab.exec(source, "ip", "-o", "link", "show", "dev", "eth0")
    assert link.returncode == 0, describe(link)
    mtu = int(link.stdout.split(" mtu ", 1)[1].split()[0])
    assert mtu >= 1400, f"the pod's MTU is {mtu}: a 1400-byte packet cannot even leave it"
    for size in sorted({1400, mtu}):
        result = lab.ping(source, lab.pod_ip(target), "-M", "do", "-s", str(size - 28))  # IPv4 20 + ICMP 8
        assert result.returncode == 0 and f"{size - 20} bytes from" in result.stdout, (
            f"a {size}-byte packet with DF (pod MTU {mtu}): {describe(result)}"
        )


# --- 2. what the underlay sees


def test_underlay_shows_only_what_the_mode_allows(datapath_lab: LabHandle, tmp_path: Path) -> None:
    """A capture on c1's bridge in the world namespace while c1/pod-1-1 pings c2/pod-1-1 with a marker pattern and
    fetches a page with a marker header. Encrypted modes (WireGuard): between the nodes only the tunnel's packets (UDP
    51871), no pod address and no marker in any captured byte. VXLAN and native carry the same traffic in clear, and
    there the markers and the pods' ICMP must be found: the control that the capture sees the traffic at all."""
    lab = datapath_lab
    underlay = UNDERLAYS[lab.routing]
    source, target = "c1/pod-1-1", "c2/pod-1-1"
    source_ip, target_ip = lab.pod_ip(source), lab.pod_ip(target)
    ping_marker = f"pg{secrets.token_hex(5)}".encode()  # 12 bytes: `ping -p` takes up to 16
    http_marker = f"hm{secrets.token_hex(8)}"
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "page.txt").write_text("page\n")
    server = [PYTHON, "-u", "-m", "http.server", "8080", "--bind", target_ip, "--directory", str(tmp_path / "www")]
    # the exchange as the underlay carries it: between the two nodes (a tunnel), or between the two pods (native)
    nodes = {lab.node("c1-node-1").ip, lab.node("c2-node-1").ip}
    ends = nodes if underlay.tunnel else {source_ip, target_ip}

    def exchange(packets: list[Packet]) -> list[Packet]:
        return [p for p in packets if {p.src, p.dst} == ends]

    with (
        serve(lab.state.pods[target]["netns"], server, ready="Serving HTTP", log=tmp_path / "http.log"),
        Capture(lab.world, "br1", tmp_path) as capture,
    ):
        pinged = lab.ping(source, target_ip, "-c", "3", "-i", "0.2", "-p", ping_marker.hex())
        fetched = lab.exec(source, "curl", "-sS", "--max-time", "5", "-H", f"X-E2E-Marker: {http_marker}",
                           f"http://{target_ip}:8080/page.txt?m={http_marker}")  # fmt: skip
        assert pinged.returncode == 0, describe(pinged)
        assert fetched.returncode == 0 and fetched.stdout == "page\n", describe(fetched)
        # 3 echo requests + 3 replies + a TCP connection (>= 6 segments): at least 12 packets of the exchange
        wait_until(
            f"the capture holds the exchange between {sorted(ends)}",
            lambda: (len(exchange(capture.packets())) >= 12, [str(p) for p in capture.packets()][-20:]),
            timeout=10,
        )
    packets, raw = capture.packets(), capture.raw()
    seen = "\n".join(str(p) for p in packets[:60])
    tunnel = underlay.tunnel
    if tunnel is not None:
        assert all(tunnel(p) for p in exchange(packets)), f"not only {lab.routing} between {sorted(nodes)}:\n{seen}"
    if underlay.encrypted:
        clear = [str(p) for p in packets if p.has_pod_address()]
        assert not clear, f"pod addresses in clear on the underlay: {clear}"
        assert ping_marker not in raw, "the ping's payload is readable on the underlay"
        assert http_marker.encode() not in raw, "the HTTP request is readable on the underlay"
    else:
        carried = {(q.src, q.dst, q.protocol) for q in (p.inner or p for p in packets)}
        assert (source_ip, target_ip, 1) in carried, f"no ICMP from pod to pod in the capture:\n{seen}"
        assert ping_marker in raw, f"a {lab.routing} capture must show the ping's payload in clear"
        assert http_marker.encode() in raw, f"a {lab.routing} capture must show the HTTP request in clear"


# --- 3. nodes at run time


def _peer_state(lab: LabHandle, node: str, cidr: str, key: str) -> tuple[bool, bool | None, str]:
    """Whether `node` has a route to `cidr`; whether it has the peer that owns it (a WireGuard key, a VXLAN neighbour
    for its VTEP, the underlay's route for native; None where the mode has nothing of the kind to look at); and what
    was seen."""
    routes = lab.routes(node)
    has_peer: bool | None = None
    detail = ""
    if lab.routing == "wireguard":
        peers = lab.wireguard_peers(node)
        has_peer, detail = key in peers, f"wg peers {sorted(peers)}"
    elif lab.routing == "vxlan":
        neighbours = netns.ip("neigh", "show", "dev", "cm_vxlan", netns=lab.node(node).netns)
        vtep = cidr.partition("/")[0]
        has_peer = any(line.split()[:1] == [vtep] and "PERMANENT" in line for line in neighbours.splitlines())
        detail = f"vxlan neighbours {neighbours.strip()!r}"
    elif lab.routing == "ipsec":
        sas = lab.status()["nodes"][node]["datapath"].get("details", {}).get("sas") or {}
        _, cluster, index, _ = cidr.split(".")  # 10.<c>.<n>.0/24 is node c<c>-node-<n>'s
        connection = connection_name(f"c{cluster}/c{cluster}-node-{index}")
        has_peer, detail = sas.get(connection, "").endswith("/INSTALLED"), f"ipsec SAs {sas}"
    elif lab.routing == "native":
        world = netns.ip("route", "show", cidr, netns=lab.world).strip()
        has_peer, detail = bool(world), f"underlay route {world!r}"
    return cidr in routes, has_peer, f"routes {sorted(routes)}; {detail}"


def test_node_added_and_removed_at_run_time(datapath_lab: LabHandle) -> None:
    """`lab node add` gives c2 a third node whose pod c1 reaches, and every agent has it as a peer; `lab node
    remove` takes it away, and within 30 s c1's node has neither its peer nor the route to its pod CIDR (and the
    rest of the mesh still works)."""
    lab = datapath_lab
    node, pod = lab.cluster_node(2, 3), "c2/pod-3-1"
    key = ""
    try:
        added = clustermesh("lab", "node", "add", lab.name, "c2")
        assert added.returncode == 0, describe(added)
        assert lab.state.pods[pod]["node"] == node.name, lab.state.pods
        if lab.routing == "wireguard":
            key = lab.wireguard_key(node.name)
            assert key, "the new node has no WireGuard key"

        def known() -> tuple[bool, object]:
            route, peer, seen = _peer_state(lab, "c1-node-1", node.pod_cidr, key)
            return route and peer is not False, seen

        wait_until(f"c1-node-1 has {node.name} as a peer, with a route to {node.pod_cidr}", known)
        statuses = lab.status()["nodes"]
        missing = [n for n, s in statuses.items() if n != node.name and "c2/c2-node-3" not in s["datapath"]["peers"]]
        assert not missing, f"agents without c2/c2-node-3 as a peer: {missing}"

        def reached() -> tuple[bool, object]:
            result = lab.ping("c1/pod-1-1", lab.pod_ip(pod))
            return result.returncode == 0, result.stdout + result.stderr

        wait_until(f"c1/pod-1-1 pings {pod} on the new node", reached)
    finally:  # also a half-made node (a failed add): the shared lab goes on without it
        removed = clustermesh("lab", "node", "remove", lab.name, node.name)
    assert removed.returncode == 0, describe(removed)
    assert node.netns not in lab.namespaces() and pod not in lab.state.pods

    def forgotten() -> tuple[bool, object]:
        route, peer, seen = _peer_state(lab, "c1-node-1", node.pod_cidr, key)
        return not route and not peer, seen

    wait_until(f"c1-node-1 forgets {node.name}: its peer and the route to {node.pod_cidr}", forgotten)
    result = lab.ping("c1/pod-1-1", lab.pod_ip("c2/pod-1-1"))
    assert result.returncode == 0, f"the rest of the mesh broke with the node's removal: {describe(result)}"


def test_node_add_waits_for_a_slow_etcd() -> None:
    """A node added while its cluster's etcd is slow (paused for 3 s, as a loaded machine may be) comes up once etcd
    answers: `lab node add` waits for the new agent instead of failing. The same race makes `lab node add` fail now
    and then on a busy machine; the pause makes it certain. This test owns its lab; etcd is resumed whatever
    happens."""
    with lab_owned("e2eslow", routing="wireguard", clusters=1, nodes=1, pods=1) as lab:
        etcd = lab.etcd_pid(1)
        resume = threading.Timer(3.0, os.kill, (etcd, signal.SIGCONT))
        os.kill(etcd, signal.SIGSTOP)
        try:
            resume.start()
            added = clustermesh("lab", "node", "add", lab.name, "c1")
        finally:
            resume.cancel()
            os.kill(etcd, signal.SIGCONT)
        assert added.returncode == 0, describe(added)
        result = lab.ping("c1/pod-1-1", lab.pod_ip("c1/pod-2-1"))
        assert result.returncode == 0, describe(result)


# --- 4. a remote etcd that dies


def test_remote_etcd_killed_keeps_routes_to_its_pods() -> None:
    """c2's etcd is killed (SIGKILL: the connections break at once, which c1's agent must notice). c1's agent says c2
    is not ready, yet keeps c2's nodes as peers and their routes through more than one reconnect round (10 s), and
    c1's pod still reaches c2's pod. This test owns its lab: it leaves c2 without etcd."""
    with lab_owned("e2eetcd", routing="wireguard", clusters=2, nodes=1, pods=1) as lab:
        c2_node, c2_pod = lab.node("c2-node-1"), "c2/pod-1-1"
        key = lab.wireguard_key(c2_node.name)
        route, peer, seen = _peer_state(lab, "c1-node-1", c2_node.pod_cidr, key)
        assert route and peer, f"no route or peer to c2 before the test: {seen}"
        assert lab.ping("c1/pod-1-1", lab.pod_ip(c2_pod)).returncode == 0, "no ping to c2 before the test"
        etcd = lab.etcd_pid(2)
        os.kill(etcd, signal.SIGKILL)
        wait_until(f"c2's etcd (pid {etcd}) is gone", lambda: (not alive(etcd), etcd))

        def c2_seen_by_c1() -> dict[str, object]:
            clusters = lab.status()["nodes"]["c1-node-1"]["clusters"]
            return next(c for c in clusters if c["name"] == "c2")

        wait_until(
            "c1-node-1's agent says c2 is not ready",
            lambda: (not (c2 := c2_seen_by_c1())["ready"], c2),
        )
        # hold: through more than one reconnect round (the agent's backoff tops out at 10 s), the peer and the route
        # must stay; the first moment they are missing fails the test.
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            route, peer, seen = _peer_state(lab, "c1-node-1", c2_node.pod_cidr, key)
            assert route and peer, f"c1-node-1 dropped c2's peer or route after c2's etcd died: {seen}"
            time.sleep(1)
        still = c2_seen_by_c1()
        assert not still["ready"], f"c2 should still be not ready (its etcd is dead): {still}"
        result = lab.ping("c1/pod-1-1", lab.pod_ip(c2_pod), "-c", "2")
        assert result.returncode == 0, f"c1's pod no longer reaches c2's after c2's etcd died: {describe(result)}"
        # c2's node removed while its etcd is dead: gone from the host and from the lab's state, with a warning
        removed = clustermesh("lab", "node", "remove", lab.name, c2_node.name)
        assert removed.returncode == 0, describe(removed)
        assert "still published" in removed.stdout + removed.stderr, describe(removed)
        assert c2_node.name not in lab.status()["nodes"]
        assert c2_node.netns not in lab.namespaces()


# --- 6. CLI errors that need a running lab


@pytest.mark.parametrize("mesh_lab", ["wireguard"], indirect=True)
def test_exec_in_unknown_pod_names_the_pods(mesh_lab: LabHandle) -> None:
    """`lab exec` with a pod that does not exist fails with exit code 1 and lists the pods that do."""
    result = clustermesh("lab", "exec", mesh_lab.name, "c9/pod-9-9", "--", "true")
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr, result.stderr
    assert "c9/pod-9-9" in result.stderr and "c1/pod-1-1" in result.stderr and "c2/pod-1-1" in result.stderr, (
        result.stderr
    )


def test_exec_in_unknown_lab_says_so() -> None:
    result = clustermesh("lab", "exec", "e2enone", "c1/pod-1-1", "--", "true")
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr and "e2enone" in result.stderr, result.stderr


def test_commands_run_inside_the_pod(mesh_lab: LabHandle) -> None:
    """Control for every other test here: `lab exec` runs in the pod's namespace (its address, not the host's)."""
    result = mesh_lab.exec("c1/pod-1-1", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    assert result.returncode == 0, describe(result)
    assert f" {mesh_lab.pod_ip('c1/pod-1-1')}/" in result.stdout, result.stdout
