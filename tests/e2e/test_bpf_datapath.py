"""The datapath's programs in the kernel, on real veths between namespaces this test makes: policy by identity,
replies of allowed flows, deny winning, and the flow and drop events read back from the ring buffer.

Namespaces `cmbpf-node` (the node: forwarding, the router IP 10.77.0.1 on its loopback), `cmbpf-a` and `cmbpf-b`
(pods 10.77.0.10 and .20 on veths `cmbpfa`/`cmbpfb`). Packets go only between them; pins live under
/sys/fs/bpf/cmbpf-test and go at the end, with the namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf import loader
from bpf.events import RingReader, follow_events
from bpf.maps import (
    EGRESS,
    INGRESS,
    REASON_POLICY_DENIED,
    REASON_POLICY_DENY,
    VERDICT_DROPPED,
    VERDICT_FORWARDED,
    EndpointSettings,
    FlowEvent,
    IpcacheEntry,
    PolicyKey,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and eBPF need root")

NODE, A, B = "cmbpf-node", "cmbpf-a", "cmbpf-b"
IP_A, IP_B, ROUTER = "10.77.0.10", "10.77.0.20", "10.77.0.1"
ID_A, ID_B = 70001, 70002
PIN_DIR = loader.BPFFS / "cmbpf-test"

SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port))
    s.listen()
    while True:
        c, _ = s.accept(); c.sendall(b"hello %d" % port); c.close()
for port in (8080, 8081):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


def ip(namespace: str, *args: str) -> None:
    sh("ip", "-n", namespace, *args)


def ifindex(namespace: str, name: str) -> int:
    return int(json.loads(sh("ip", "-n", namespace, "-j", "link", "show", name).stdout)[0]["ifindex"])


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    for namespace in (NODE, A, B):
        sh("ip", "netns", "del", namespace, check=False)
        sh("ip", "netns", "add", namespace)
        ip(namespace, "link", "set", "lo", "up")
    sh("nsenter", f"--net=/run/netns/{NODE}", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    ip(NODE, "addr", "add", f"{ROUTER}/32", "dev", "lo")
    for pod, address, veth in ((A, IP_A, "cmbpfa"), (B, IP_B, "cmbpfb")):
        ip(NODE, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod)
        ip(NODE, "link", "set", veth, "up")
        ip(NODE, "route", "add", f"{address}/32", "dev", veth, "scope", "link")
        ip(pod, "addr", "add", f"{address}/32", "dev", "eth0")
        ip(pod, "link", "set", "eth0", "up")
        ip(pod, "route", "add", f"{ROUTER}/32", "dev", "eth0", "scope", "link")
        ip(pod, "route", "add", "10.77.0.0/24", "via", ROUTER, "dev", "eth0", "onlink")
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{B}", sys.executable, "-c", SERVER, IP_B],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield
    finally:
        server.kill()
        server.wait()
        for namespace in (A, B, NODE):
            sh("ip", "netns", "del", namespace, check=False)
        loader.remove(PIN_DIR)


@pytest.fixture(scope="module")
def datapath(namespaces: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[loader.Loaded]:
    obj = loader.build(tmp_path_factory.mktemp("bpf-cache"))
    loaded = loader.Loaded.load(obj, PIN_DIR)
    try:
        for veth in ("cmbpfa", "cmbpfb"):
            loaded.attach(veth, netns=NODE)
            assert loaded.attached(veth, netns=NODE)
        loaded.ipcache.write({f"{IP_A}/32": IpcacheEntry(ID_A, ""), f"{IP_B}/32": IpcacheEntry(ID_B, "")})
        yield loaded
    finally:
        loaded.close()


def connect(port: int, source: str = A, target: str = IP_B) -> str:
    """What a TCP client in `source` gets from `target:port`: the server's words, or why not."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    s = socket.create_connection(({target!r}, {port}), timeout=1.5); print(s.recv(100).decode())\n"
        "except OSError as e:\n"
        "    print('failed:', type(e).__name__)\n"
    )
    return sh("nsenter", f"--net=/run/netns/{source}", sys.executable, "-c", code).stdout.strip()


def events_during(loaded: loader.Loaded, action: object) -> list[FlowEvent]:
    """The events the datapath tells while `action()` runs (read from its ring buffer)."""
    reader = RingReader.pinned(str(loaded.events_path))
    reader.read()  # what earlier tests left

    async def collect() -> list[FlowEvent]:
        await asyncio.to_thread(action)  # type: ignore[arg-type]
        found: list[FlowEvent] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                async for batch in follow_events(reader):
                    found.extend(batch)
        return found

    try:
        return asyncio.run(collect())
    finally:
        reader.close()


def test_no_policy_allows_everything(datapath: loader.Loaded) -> None:
    datapath.endpoints.set(ifindex(NODE, "cmbpfa"), EndpointSettings(ID_A, False, False))
    datapath.endpoints.set(ifindex(NODE, "cmbpfb"), EndpointSettings(ID_B, False, False))
    assert connect(8080) == "hello 8080" and connect(8081) == "hello 8081"


def test_an_ingress_policy_allows_one_identity_one_port_and_tells_the_drop(datapath: loader.Loaded) -> None:
    b = ifindex(NODE, "cmbpfb")
    datapath.policy_map(b).write({PolicyKey(INGRESS, ID_A, 6, 8080, 16): False})
    datapath.endpoints.set(b, EndpointSettings(ID_B, True, False))
    results: dict[int, str] = {}
    events = events_during(datapath, lambda: results.update({port: connect(port) for port in (8080, 8081)}))
    assert results == {8080: "hello 8080", 8081: "failed: TimeoutError"}
    drops = [e for e in events if e.verdict == VERDICT_DROPPED]
    assert drops and all(e.dport == 8081 for e in drops)
    drop = drops[0]
    assert (drop.src_identity, drop.dst_identity, drop.source, drop.destination) == (ID_A, ID_B, IP_A, IP_B)
    assert (drop.reason, drop.direction, drop.protocol) == (REASON_POLICY_DENIED, INGRESS, 6)
    forwarded = [e for e in events if e.verdict == VERDICT_FORWARDED and e.dport == 8080]
    assert {e.direction for e in forwarded} == {INGRESS, EGRESS}, "the new flow, told at each end"
    counts = datapath.counters.read()
    assert counts.get((REASON_POLICY_DENIED, INGRESS), 0) >= 1


def test_replies_of_an_allowed_flow_pass_an_enforced_egress(datapath: loader.Loaded) -> None:
    """b may send nothing of its own (egress enforced, no rule), yet answers the connections it accepted."""
    b = ifindex(NODE, "cmbpfb")
    datapath.endpoints.set(b, EndpointSettings(ID_B, True, True))
    assert connect(8080) == "hello 8080"
    result = sh("nsenter", f"--net=/run/netns/{B}", "ping", "-c", "1", "-W", "1", IP_A, check=False)
    assert result.returncode != 0, "b's own ping is refused by its egress policy"


def test_a_deny_rule_wins_over_an_allow(datapath: loader.Loaded) -> None:
    b = ifindex(NODE, "cmbpfb")
    datapath.endpoints.set(b, EndpointSettings(ID_B, True, False))
    datapath.policy_map(b).write({PolicyKey(INGRESS, 0, 6, 8080, 16): True})  # deny anyone on 8080
    datapath.ct.clear()  # established flows pass on connection tracking: start from none
    events = events_during(datapath, lambda: connect(8080))
    assert [e.reason for e in events if e.verdict == VERDICT_DROPPED][:1] == [REASON_POLICY_DENY]
    datapath.policy_map(b).remove([PolicyKey(INGRESS, 0, 6, 8080, 16)])
    assert connect(8080) == "hello 8080", "the deny removed, the allow is back"


def test_pins_carry_the_nodes_folder_and_go_with_it(datapath: loader.Loaded) -> None:
    assert (PIN_DIR / datapath.object_dir.name / "maps" / "cm_ipcache").exists()
    assert (PIN_DIR / datapath.object_dir.name / "policy" / str(ifindex(NODE, "cmbpfb"))).exists()
    again = loader.Loaded.load(loader.build(), PIN_DIR)  # a restarted agent: the same pins, the same maps
    try:
        assert again.ipcache.lookup(IP_A) == IpcacheEntry(ID_A, "")
    finally:
        again.close()
    assert Path(PIN_DIR).exists()


RESET_CLIENT = """
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)
print(s.getsockname()[1], flush=True)
s.recv(100)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()  # a reset, not a FIN
"""


def test_a_reset_ends_its_connections_entries(datapath: loader.Loaded) -> None:
    """An allowed connection is tracked at both ends; the reset that ends it takes its entries with it (the LRU
    would keep them until it is full, and make every new flow pay for an eviction)."""
    b = ifindex(NODE, "cmbpfb")
    datapath.endpoints.set(b, EndpointSettings(ID_B, True, False))
    datapath.policy_map(b).write({PolicyKey(INGRESS, ID_A, 6, 8080, 16): False})
    datapath.ct.clear()
    result = sh("nsenter", f"--net=/run/netns/{A}", sys.executable, "-c", RESET_CLIENT, IP_B, "8080")
    port = int(result.stdout.split()[0])
    left = [e for e in datapath.ct.entries() if port in (e.sport, e.dport)]
    assert left == [], f"entries of the reset connection remain: {left}"
    assert connect(8080) == "hello 8080", "the next connection is judged and tracked anew"
    assert any(e.dport == 8080 for e in datapath.ct.entries())
