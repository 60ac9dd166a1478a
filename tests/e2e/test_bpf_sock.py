"""The socket load balancer in the kernel: cgroup v2 programs that send a connection to a frontend straight to a
backend, on namespaces and a cgroup this test makes.

Namespaces `cmsock-node` (the node, routing), `cmsock-c` (a client pod, 10.78.0.10) and `cmsock-b1`, `cmsock-b2`
(backends .21 and .22, each answering with its name on TCP 8080 and echoing on UDP 5353); the client's processes run
in the cgroup `clustermesh-test-sock` below the host's cgroup v2 mount. Frontend 10.96.78.1: port 80/TCP and 53/UDP
to both backends, port 81/TCP with no backend. Pins live under /sys/fs/bpf/cmsock-test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf import loader
from bpf.lbmaps import TCP, UDP, LbBackend, LbFrontendKey, LbService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, cgroups and eBPF need root")

NODE, CLIENT, B1, B2 = "cmsock-node", "cmsock-c", "cmsock-b1", "cmsock-b2"
IP_CLIENT, IP_B1, IP_B2, ROUTER = "10.78.0.10", "10.78.0.21", "10.78.0.22", "10.78.0.1"
FRONTEND = "10.96.78.1"
PIN_DIR = loader.BPFFS / "cmsock-test"

BACKEND = """
import socket, sys, threading
name, ip = sys.argv[1], sys.argv[2]
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((ip, 8080)); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(name.encode()); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, 5353))
    while True:
        data, peer = s.recvfrom(100); s.sendto(name.encode() + b":" + data, peer)
threading.Thread(target=tcp, daemon=True).start(); threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT_PROBE = """
import json, socket, sys
frontend = sys.argv[1]
out = {"tcp": [], "peer": None, "udp": None, "udp_from": None, "refused": None}
for _ in range(40):
    s = socket.create_connection((frontend, 80), timeout=2)
    out["peer"] = s.getpeername()[0]
    out["tcp"].append(s.recv(100).decode()); s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
u.sendto(b"hi", (frontend, 53))
data, sender = u.recvfrom(100)
out["udp"], out["udp_from"] = data.decode(), list(sender)
try:
    socket.create_connection((frontend, 81), timeout=2)
except OSError as exc:
    out["refused"] = exc.errno
print(json.dumps(out))
"""


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)


def ip(namespace: str, *args: str) -> None:
    sh("ip", "-n", namespace, *args)


@pytest.fixture(scope="module")
def cgroup() -> Iterator[Path]:
    path = loader.cgroup2_mount() / "clustermesh-test-sock"
    path.mkdir(exist_ok=True)
    try:
        yield path
    finally:
        path.rmdir()  # its processes are gone: the probes ran to their end


@pytest.fixture(scope="module")
def pods() -> Iterator[None]:
    for namespace in (NODE, CLIENT, B1, B2):
        sh("ip", "netns", "del", namespace, check=False)
        sh("ip", "netns", "add", namespace)
        ip(namespace, "link", "set", "lo", "up")
    sh("nsenter", f"--net=/run/netns/{NODE}", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    ip(NODE, "addr", "add", f"{ROUTER}/32", "dev", "lo")
    for pod, address, veth in ((CLIENT, IP_CLIENT, "cmsockc"), (B1, IP_B1, "cmsockb1"), (B2, IP_B2, "cmsockb2")):
        ip(NODE, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod)
        ip(NODE, "link", "set", veth, "up")
        ip(NODE, "route", "add", f"{address}/32", "dev", veth, "scope", "link")
        ip(pod, "addr", "add", f"{address}/32", "dev", "eth0")
        ip(pod, "link", "set", "eth0", "up")
        ip(pod, "route", "add", f"{ROUTER}/32", "dev", "eth0", "scope", "link")
        ip(pod, "route", "add", "10.0.0.0/8", "via", ROUTER, "dev", "eth0", "onlink")
    servers = []
    try:
        for name, pod, address in (("b1", B1, IP_B1), ("b2", B2, IP_B2)):
            server = subprocess.Popen(["nsenter", f"--net=/run/netns/{pod}", sys.executable, "-c", BACKEND, name,
                                       address], stdout=subprocess.PIPE, text=True)  # fmt: skip
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for namespace in (CLIENT, B1, B2, NODE):
            sh("ip", "netns", "del", namespace, check=False)
        loader.remove(PIN_DIR)


@pytest.fixture(scope="module")
def balanced(pods: None, cgroup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[loader.Loaded]:
    loaded = loader.Loaded.load(loader.build(tmp_path_factory.mktemp("bpf-cache")), PIN_DIR)
    try:
        loaded.attach_cgroup(cgroup)
        assert loaded.cgroup_attached(cgroup)
        loaded.attach("cmsockc", netns=NODE)  # the per-packet path, for what no socket program sees
        http, dns, empty = (LbFrontendKey(FRONTEND, 80, TCP), LbFrontendKey(FRONTEND, 53, UDP),
                            LbFrontendKey(FRONTEND, 81, TCP))  # fmt: skip
        loaded.lb_backends.write({1: LbBackend(IP_B1, 8080, TCP), 2: LbBackend(IP_B2, 8080, TCP),
                                  3: LbBackend(IP_B1, 5353, UDP)})  # fmt: skip
        loaded.lb_revnat.write({1: (FRONTEND, 80), 2: (FRONTEND, 53), 3: (FRONTEND, 81)})
        loaded.lb_services.write({
            http: LbService(0, 2, 1), http._replace(slot=1): LbService(1), http._replace(slot=2): LbService(2),
            dns: LbService(0, 1, 2), dns._replace(slot=1): LbService(3),
            empty: LbService(0, 0, 3),
        })  # fmt: skip
        yield loaded
    finally:
        loaded.close()


def probe(cgroup: Path | None) -> dict[str, object]:
    """The client's view, run in the client pod, inside the cgroup or not."""
    join = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup is not None else ""
    result = sh("sh", "-c", f'{join}exec nsenter --net=/run/netns/{CLIENT} "$0" -c "$1" {FRONTEND}', sys.executable,
                CLIENT_PROBE, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    found: dict[str, object] = json.loads(result.stdout)
    return found


def test_connections_to_a_frontend_go_to_its_backends_and_see_the_frontend(balanced: loader.Loaded,
                                                                           cgroup: Path) -> None:  # fmt: skip
    before = balanced.lb_counters.read()
    seen = probe(cgroup)
    answers = seen["tcp"]
    assert isinstance(answers, list) and set(answers) == {"b1", "b2"}, f"40 connections, both backends: {answers}"
    assert seen["peer"] == FRONTEND, "getpeername() gives the frontend, not the backend"
    assert seen["udp"] == "b1:hi" and seen["udp_from"] == [FRONTEND, 53], "the UDP reply comes from the frontend"
    assert seen["refused"] == 113, "no backend: EHOSTUNREACH at once, not a timeout"
    after = balanced.lb_counters.read()
    assert after["translated"] - before["translated"] == 41 and after["no_backend"] - before["no_backend"] == 1


def test_processes_outside_the_cgroup_are_balanced_per_packet_at_the_veth(balanced: loader.Loaded) -> None:
    """No socket program saw them: the datapath at the client's veth DNATs the flow to a backend and gives the
    replies the frontend's address back (TCP and UDP alike)."""
    before = balanced.lb_counters.read()
    seen = probe(None)
    answers = seen["tcp"]
    assert isinstance(answers, list) and set(answers) == {"b1", "b2"}, f"40 connections, both backends: {answers}"
    assert seen["peer"] == FRONTEND
    assert seen["udp"] == "b1:hi" and seen["udp_from"] == [FRONTEND, 53], "the UDP reply comes from the frontend"
    after = balanced.lb_counters.read()
    assert after["translated"] == before["translated"], "no socket program translated these"
    assert after["packet_nat"] - before["packet_nat"] >= 41


def test_a_backend_removed_from_the_slots_takes_no_new_connection(balanced: loader.Loaded, cgroup: Path) -> None:
    http = LbFrontendKey(FRONTEND, 80, TCP)
    balanced.lb_services.write({http: LbService(0, 1, 1), http._replace(slot=1): LbService(2)})
    balanced.lb_services.remove([http._replace(slot=2)])
    answers = probe(cgroup)["tcp"]
    assert isinstance(answers, list) and set(answers) == {"b2"}
