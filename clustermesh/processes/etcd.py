"""Running a real etcd server process: mTLS only, on given or free ports, stopped by its PID.

Used by the demo, the lab and the integration tests' fixtures. The server requires client certificates
(`--client-cert-auth`) and never listens in plaintext for clients. Its peer listener is on the loopback of its
network namespace, whatever address its clients use: a single member has no peer to talk to, and a plaintext peer
port on a routable address (the lab's underlay) would let anyone join or read the member's raft traffic.

Readiness is etcd's own log line "ready to serve client requests" followed by an accepted TCP connection: no fixed
sleep. A process that exits during start-up raises with the tail of its log. It runs on the one launcher of child
processes, `clustermesh.processes.child.Child` (started in a session of its own, stopped by its PID).
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from clustermesh.processes.child import Child, ChildFailed

__all__ = ["EtcdProcess", "EtcdSpec", "EtcdStartError", "free_port"]

#: Where a member listens for peers: only its own namespace's loopback (single-member clusters).
PEER_HOST = "127.0.0.1"
#: What etcd logs once it serves clients (3.4, then 3.5).
READY = r"ready to serve client requests|serving client requests on"


class EtcdStartError(RuntimeError):
    """etcd did not become ready; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on `host` (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str | None:
    return shutil.which("etcd") or (str(Path("/usr/bin/etcd")) if Path("/usr/bin/etcd").exists() else None)


@dataclass
class EtcdSpec:
    """How to run one single-member etcd cluster."""

    name: str
    data_dir: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    #: A command prefix to run etcd through, e.g. ["nsenter", "--net=/run/netns/x"].
    wrapper: list[str] = field(default_factory=list)
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.client_port == 0:
            self.client_port = free_port(self.host)
        if self.peer_port == 0:
            self.peer_port = free_port(PEER_HOST)
        if self.log_file is None:
            self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def client_url(self) -> str:
        return f"https://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{PEER_HOST}:{self.peer_port}"

    def command(self) -> list[str]:
        binary = etcd_binary()
        if binary is None:
            raise EtcdStartError("etcd is not installed: run `make setup` (Debian package etcd-server)")
        return [
            *self.wrapper,
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--cert-file", str(self.cert_file),
            "--key-file", str(self.key_file),
            "--trusted-ca-file", str(self.ca_file),
            "--client-cert-auth",
            "--auto-compaction-retention", "0",
            "--snapshot-count", "100000",
            "--quota-backend-bytes", str(4 * 1024**3),
            *self.extra_args,
        ]  # fmt: skip


class EtcdProcess:
    """One running etcd. `start()` waits until it serves; `stop()` ends it by PID; `wipe()` removes its data."""

    def __init__(self, spec: EtcdSpec) -> None:
        self.spec = spec
        self.child: Child | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def start(self, *, timeout: float = 30.0) -> None:
        if self.running:
            return
        spec = self.spec
        assert spec.log_file is not None
        spec.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.child = Child(f"etcd {spec.name}", spec.command(), spec.log_file)
        self.child.start()
        try:
            self.child.wait_for(READY, timeout=timeout, also=self._accepts)
        except ChildFailed as exc:
            self.kill()
            raise EtcdStartError(str(exc)) from None
        except BaseException:
            self.kill()
            raise

    def _accepts(self) -> bool:
        if self.spec.wrapper:
            return True  # in another network namespace: the log line is all we can see from here
        try:
            with socket.create_connection((self.spec.host, self.spec.client_port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        if self.spec.log_file is None or not self.spec.log_file.exists():
            return "(no log)"
        return "\n".join(self.spec.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; always by the PID we started."""
        if self.child is not None:
            self.child.stop(grace=timeout)
        self.child = None

    def kill(self) -> None:
        """SIGKILL: a crash, as far as etcd's clients can tell."""
        if self.child is not None:
            self.child.kill()
        self.child = None

    def restart(self, *, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def wipe(self) -> None:
        """Remove the data folder (the process must be stopped): the next start is an empty etcd."""
        if self.running:
            raise RuntimeError("stop etcd before wiping its data")
        shutil.rmtree(self.spec.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
