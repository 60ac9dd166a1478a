"""Tools for the e2e tests: labs built and removed through the CLI, commands run inside lab namespaces, servers in
pods, and packet captures on the underlay, read back with a small pcap parser.

Nothing here sends a packet from the host's own network namespace (DESIGN section 7): every command that talks to a
lab address runs under `nsenter --net=/run/netns/<lab namespace>`, or through `clustermesh lab exec`. Processes the
tests start are stopped by their PID, never by name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clustermesh.lab import cgroups, netns
from clustermesh.lab.lab import LabState, load
from clustermesh.lab.layout import BPF_ROOT, STATE_ROOT, WIREGUARD_PORT, NodeLayout

BIN = Path(sys.executable).parent
CLI = BIN / "clustermesh"
PYTHON = sys.executable  # an absolute path: the pods have no PATH of their own, and pyenv shims are slow
VXLAN_PORT = 8472
WIREGUARD_SOCKETS = Path("/var/run/wireguard")
POD_NETWORK = ipaddress.ip_network("10.0.0.0/8")


# --- running things


def clustermesh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a process of its own, its exit code and both outputs."""
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout, check=False)


def in_netns(namespace: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*netns.nsenter(namespace), *command], capture_output=True, text=True, timeout=timeout, check=False
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(map(str, result.args))
    return f"`{command}` exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def wait_until(what: str, check: Callable[[], tuple[bool, object]], *, timeout: float = 30, every: float = 0.2) -> None:
    """Until `check()` says done; `check` returns (done, what it saw), and what it saw last is the failure's message.
    Other processes converge on their own time: polling their visible state is all a test can wait on."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = check()
        if done:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still not the case after {timeout:.0f} s; last seen: {seen}")
        time.sleep(every)


def stop(process: subprocess.Popen[Any], grace: float = 5) -> None:
    """SIGTERM, then SIGKILL, by PID; collected either way."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- labs


@dataclass(frozen=True)
class LabHandle:
    """A lab the tests built, read from its state folder each time (nodes come and go)."""

    name: str
    routing: str

    @property
    def state(self) -> LabState:
        return load(self.name)

    @property
    def world(self) -> str:
        return f"{self.name}-world"

    def pod_ip(self, pod: str) -> str:
        return self.state.pods[pod]["ip"]

    def node(self, name: str) -> NodeLayout:
        for node in self.state.node_layouts():
            if node.name == name:
                return node
        raise KeyError(f"no node {name} in lab {self.name}: {[n.name for n in self.state.node_layouts()]}")

    def cluster_node(self, cluster: int, index: int) -> NodeLayout:
        """A node's layout by its place, whether or not the lab has it (yet, or still)."""
        return self.state.layout.cluster(cluster).node(index)

    def exec(self, pod: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return clustermesh("lab", "exec", self.name, pod, "--", *command, timeout=timeout)

    def ping(self, pod: str, destination: str, *options: str) -> subprocess.CompletedProcess[str]:
        return self.exec(pod, "ping", "-n", "-c", "1", "-W", "2", *options, destination)

    def namespaces(self) -> list[str]:
        return netns.list_netns(f"{self.name}-")

    def processes(self) -> list[int]:
        return netns.processes_in(self.namespaces())

    def wireguard_sockets(self) -> list[Path]:
        return sorted(WIREGUARD_SOCKETS.glob(f"{self.name}[1-9]n[1-9].sock"))

    def routes(self, node: str) -> dict[str, str]:
        """The node's IPv4 unicast routes in every table (IPsec's are in table 220): destination -> the route."""
        result = netns.ip("-j", "-4", "route", "show", "table", "all", netns=self.node(node).netns)
        return {
            entry["dst"]: json.dumps(entry, sort_keys=True)
            for entry in json.loads(result or "[]")
            if entry.get("type", "unicast") == "unicast" and entry.get("table") != "local"
        }

    def wireguard_peers(self, node: str) -> set[str]:
        layout = self.node(node)
        result = in_netns(layout.netns, "wg", "show", layout.wireguard_interface, "peers")
        assert result.returncode == 0, describe(result)
        return set(result.stdout.split())

    def wireguard_key(self, node: str) -> str:
        layout = self.node(node)
        result = in_netns(layout.netns, "wg", "show", layout.wireguard_interface, "public-key")
        assert result.returncode == 0, describe(result)
        return result.stdout.strip()

    def etcd_pid(self, cluster: int) -> int:
        """The PID of cluster `cluster`'s etcd, found in its control-plane namespace."""
        namespace = f"{self.name}-c{cluster}-cp"
        found = [pid for pid in netns.processes_in([namespace]) if _comm(pid) == "etcd"]
        assert len(found) == 1, f"etcd processes in {namespace}: {found}"
        return found[0]

    def status(self) -> dict[str, Any]:
        result = clustermesh("lab", "status", "--name", self.name, "-o", "json")
        assert result.returncode == 0, describe(result)
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def leftovers(self) -> list[str]:
        """Whatever of this lab is still on the host (empty once `lab down` did its work)."""
        found = [f"namespace {n}" for n in self.namespaces()]
        found += [f"socket {s}" for s in self.wireguard_sockets()]
        if (STATE_ROOT / self.name).exists():
            found.append(f"state folder {STATE_ROOT / self.name}")
        if (BPF_ROOT / self.name).exists():
            found.append(f"eBPF pins {BPF_ROOT / self.name}")
        found += [f"host interface {i}" for i in host_interfaces() if is_wireguard_name(self.name, i)]
        found += [f"loopback bridge (pid {pid})" for pid in bridge_processes(self.name)]
        cgroup = cgroups.lab_cgroup(self.name)
        if cgroup.exists():
            found.append(f"cgroup {cgroup}")
        return found


def bridge_processes(lab: str) -> list[int]:
    """The lab's loopback bridge (`lab env`), the one process of a lab in the host's namespace, found by its argv."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"clustermesh.lab.bridge" in argv and lab.encode() in argv:
                    found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def is_wireguard_name(lab: str, interface: str) -> bool:
    rest = interface.removeprefix(lab)
    return rest != interface and len(rest) == 3 and rest[0].isdigit() and rest[1] == "n" and rest[2].isdigit()


def host_interfaces() -> list[str]:
    """Interface names in the host's own namespace (`ip -o link`, read only)."""
    output = netns.ip("-o", "link", "show")
    return [line.split(":")[1].strip().split("@")[0] for line in output.splitlines() if ":" in line]


def remove_lab(name: str) -> subprocess.CompletedProcess[str]:
    return clustermesh("lab", "down", "--name", name)


class LabBuild:
    """`clustermesh lab up` running in the background, so that labs build side by side (a lab takes ~4 s alone,
    three take ~7 s together). A lab of the same name left by an earlier, interrupted run is removed first (these
    names are the tests' own)."""

    def __init__(self, name: str, *, routing: str, clusters: int = 2, nodes: int = 2, pods: int = 1,
                 agent_args: tuple[str, ...] = (), source: str = "standalone") -> None:  # fmt: skip
        self.lab = LabHandle(name, routing)
        if self.lab.leftovers():
            remove_lab(name)
        self.output = Path(tempfile.gettempdir()) / f"clustermesh-e2e-{name}.up.log"  # up makes the lab's own folder
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [str(CLI), "lab", "up", "--name", name, "--clusters", str(clusters), "--nodes", str(nodes),
                 "--pods", str(pods), "--routing", routing, "--source", source,
                 *(f"--agent-arg={arg}" for arg in agent_args)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait(self, timeout: float = 180) -> LabHandle:
        """The lab, once `lab up` has succeeded; a failed one is removed and fails the test with its output."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(self.process)
            code = -1
        output = self.output.read_text()
        self.output.unlink(missing_ok=True)
        if code != 0:
            remove_lab(self.lab.name)
            pytest.fail(f"lab {self.lab.name} ({self.lab.routing}) did not come up (exit code {code}):\n{output}")
        return self.lab

    def cancel(self) -> None:
        """Stop a build still running, and remove whatever it made (a no-op for a lab already removed)."""
        stop(self.process)
        self.output.unlink(missing_ok=True)
        remove_lab(self.lab.name)


def build_lab(name: str, *, routing: str, clusters: int = 2, nodes: int = 2, pods: int = 1,
              agent_args: tuple[str, ...] = (), source: str = "standalone") -> LabHandle:  # fmt: skip
    return LabBuild(name, routing=routing, clusters=clusters, nodes=nodes, pods=pods, agent_args=agent_args,
                    source=source).wait()  # fmt: skip


def assert_removed(name: str) -> None:
    """`lab down`, and nothing of the lab is left."""
    result = remove_lab(name)
    left = LabHandle(name, "").leftovers()
    assert result.returncode == 0 and not left, f"lab {name} was not removed: {left}; {describe(result)}"


@contextlib.contextmanager
def lab_owned(name: str, *, routing: str, clusters: int = 2, nodes: int = 2, pods: int = 1,
              agent_args: tuple[str, ...] = (), source: str = "standalone") -> Iterator[LabHandle]:  # fmt: skip
    """A lab that is removed at the end whatever happened, and checked to be gone."""
    try:
        yield build_lab(name, routing=routing, clusters=clusters, nodes=nodes, pods=pods, agent_args=agent_args,
                        source=source)  # fmt: skip
    finally:
        assert_removed(name)


# --- servers in pods


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"echo:" + data, peer)
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(3):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(65535)[0].decode())
        break
    except TimeoutError:
        continue
else:
    sys.exit("no answer in 3 tries")
"""


@contextlib.contextmanager
def serve(namespace: str, command: list[str], *, ready: str, log: Path, timeout: float = 15) -> Iterator[int]:
    """A server in a lab namespace, from when its output says `ready` to the end of the block; stopped by PID.
    Yields its PID."""
    with log.open("w") as out:
        process = subprocess.Popen([*netns.nsenter(namespace), *command], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            f"{command[:3]} in {namespace} says {ready!r}",
            lambda: (ready in log.read_text(), log.read_text() or f"no output (exit code {process.poll()})"),
            timeout=timeout,
            every=0.05,
        )
        yield process.pid
    finally:
        stop(process)


# --- captures


@dataclass(frozen=True)
class Packet:
    """An IPv4 packet as seen on the wire; `inner` is what a VXLAN packet carries."""

    src: str
    dst: str
    protocol: int  # 1 ICMP, 6 TCP, 17 UDP
    sport: int | None
    dport: int | None
    inner: Packet | None = None

    def __str__(self) -> str:
        name = {1: "ICMP", 6: "TCP", 17: "UDP"}.get(self.protocol, str(self.protocol))
        ports = f" {self.sport}>{self.dport}" if self.sport is not None else ""
        inside = f" [{self.inner}]" if self.inner else ""
        return f"{name} {self.src}>{self.dst}{ports}{inside}"

    def has_pod_address(self) -> bool:
        return any(ipaddress.ip_address(a) in POD_NETWORK for a in (self.src, self.dst))


def pcap_frames(data: bytes) -> list[bytes]:
    """The frames of a classic pcap file (a last, half-written record is left out)."""
    if len(data) < 24:
        return []
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
    endian = order.get(data[:4])
    if endian is None:
        raise ValueError(f"not a pcap file (magic {data[:4].hex()})")
    (linktype,) = struct.unpack(endian + "I", data[20:24])
    if linktype != 1:
        raise ValueError(f"link type {linktype}: only Ethernet captures are read")
    frames, offset = [], 24
    while offset + 16 <= len(data):
        (length,) = struct.unpack(endian + "I", data[offset + 8 : offset + 12])
        end = offset + 16 + length
        if end > len(data):
            break
        frames.append(data[offset + 16 : end])
        offset = end
    return frames


def parse_ethernet(frame: bytes) -> Packet | None:
    if len(frame) < 14:
        return None
    ethertype, payload = struct.unpack("!H", frame[12:14])[0], frame[14:]
    if ethertype == 0x8100 and len(payload) >= 4:  # one VLAN tag
        ethertype, payload = struct.unpack("!H", payload[2:4])[0], payload[4:]
    return parse_ipv4(payload) if ethertype == 0x0800 else None


def parse_ipv4(data: bytes) -> Packet | None:
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    header = (data[0] & 0x0F) * 4
    protocol = data[9]
    src, dst = str(ipaddress.IPv4Address(data[12:16])), str(ipaddress.IPv4Address(data[16:20]))
    payload = data[header:]
    if protocol not in (6, 17) or len(payload) < 4:
        return Packet(src, dst, protocol, None, None)
    sport, dport = struct.unpack("!HH", payload[:4])
    inner = None
    if protocol == 17 and VXLAN_PORT in (sport, dport):
        inner = parse_ethernet(payload[8 + 8 :])  # UDP header, VXLAN header, then the inner frame
    return Packet(src, dst, protocol, sport, dport, inner)


class Capture:
    """tcpdump in a lab namespace, writing every frame of `interface` to a file, read back while it runs."""

    def __init__(self, namespace: str, interface: str, directory: Path) -> None:
        self.namespace = namespace
        self.interface = interface
        self.file = directory / f"{namespace}-{interface}.pcap"
        self.log = directory / f"{namespace}-{interface}.tcpdump.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*netns.nsenter(self.namespace), "tcpdump", "-i", self.interface, "-n", "-U", "--immediate-mode",
                 "-Z", "root", "-w", str(self.file)],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        wait_until(
            f"tcpdump on {self.interface} in {self.namespace} starts",
            lambda: ("listening on" in self.log.read_text(), self.log.read_text()),
            timeout=15,
            every=0.05,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)  # tcpdump writes what it has and ends
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                stop(self.process)

    def raw(self) -> bytes:
        return self.file.read_bytes() if self.file.exists() else b""

    def packets(self) -> list[Packet]:
        return [p for p in (parse_ethernet(frame) for frame in pcap_frames(self.raw())) if p is not None]


def is_wireguard(packet: Packet) -> bool:
    return packet.protocol == 17 and packet.sport == WIREGUARD_PORT and packet.dport == WIREGUARD_PORT


def is_vxlan(packet: Packet) -> bool:
    return packet.protocol == 17 and packet.dport == VXLAN_PORT


def is_ike_or_esp_in_udp(packet: Packet) -> bool:
    return packet.protocol == 17 and {packet.sport, packet.dport} <= {500, 4500}


@dataclass(frozen=True)
class Underlay:
    """How a routing mode carries pod traffic between nodes, as a capture on the underlay sees it."""

    encrypted: bool
    tunnel: Callable[[Packet], bool] | None  # what every packet between two nodes is; None: pod packets as they are


UNDERLAYS = {
    "wireguard": Underlay(encrypted=True, tunnel=is_wireguard),
    "ipsec": Underlay(encrypted=True, tunnel=is_ike_or_esp_in_udp),  # kernel-libipsec: ESP always in UDP 4500
    "vxlan": Underlay(encrypted=False, tunnel=is_vxlan),
    "native": Underlay(encrypted=False, tunnel=None),
}
