"""IPsec between nodes: strongSwan's charon, configured over vici, one IKEv2 connection per peer node.

Why kernel-libipsec: these hosts have XFRM but no kernel ESP, so ESP runs in charon itself, over a TUN device
(`ipsec0`) and always UDP-encapsulated (port 4500). charon installs the routes to each peer's pod CIDRs (table 220,
via `ipsec0`) when a child SA comes up, and removes them when it goes; our own route table stays empty.

charon keeps its PID file and vici socket in /run, so each node's charon runs in a private mount namespace where
its own folder (`run_dir`) is mounted on /run; from outside, the socket is `run_dir/charon.vici`. A charon that is
already running there (the agent restarted) is kept, with its SAs: traffic does not stop for an agent restart.

Authentication is by certificate (`certs/`): each node's certificate names its underlay IP, which is its IKE
identity; a peer is accepted only with a certificate of the mesh's CA for the IP it connects from. Of each pair of
nodes, the one with the lower IP initiates (and re-initiates, each round, while no child SA is installed); the other
responds. A peer gone: its connection unloaded and its SAs terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import vici

from agent.datapath.helpers import stop_helper
from agent.datapath.netlink import DatapathError
from agent.datapath.routing import Peer

__all__ = ["IPSEC_MTU", "IpsecDriver", "connection_name", "split_pem"]

log = logging.getLogger(__name__)

CHARON = "/usr/lib/ipsec/charon"
# kernel-libipsec's TUN device has an MTU of 1400 (ESP in UDP adds at most 65 bytes: IP 20, UDP 8, SPI and
# sequence 8, IV 8, padding and trailer up to 5, ICV 16); pods get the same, so they never need fragmenting
IPSEC_MTU = 1400
# openssl first: the first plugin to offer an algorithm serves it, and openssl's AES-GCM uses AES-NI (strongSwan's
# own aes and gcm plugins, listed first, made ESP about ten times slower here)
CHARON_PLUGINS = (
    "openssl random nonce kdf pem pkcs1 pkcs8 x509 pubkey revocation constraints "
    "kernel-libipsec kernel-netlink socket-default vici"
)
CONFIG = """\
# written by clustermesh-agent: the node's charon (kernel-libipsec, vici only)
charon {{
  load = {plugins}
  port = {ike_port}
  port_nat_t = {nat_port}
  install_routes = yes
  retransmit_timeout = 1.0
  retransmit_base = 1.4
  retransmit_tries = 4
  filelog {{
    stderr {{
      default = 1
      time_format = %Y-%m-%d %H:%M:%S
    }}
  }}
  plugins {{
    vici {{
      socket = unix:///run/charon.vici
    }}
  }}
}}
"""
IKE_PROPOSALS = ["aes128-sha256-x25519", "aes256-sha384-ecp384"]
ESP_PROPOSALS = ["aes128gcm16", "aes256gcm16"]


def split_pem(data: bytes) -> list[bytes]:
    """The certificates of a PEM bundle one by one (vici takes one certificate per item; a CA being rolled is a
    bundle of the new and the old)."""
    marker = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + marker + b"\n" for part in data.split(marker) if b"-----BEGIN" in part]


def connection_name(peer_key: str) -> str:
    """`c2/c2-node-1` -> a vici connection name that is stable and safe (`cm-c2-c2-node-1-<hash>`)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in peer_key)
    return f"cm-{safe[:40]}-{hashlib.sha256(peer_key.encode()).hexdigest()[:6]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class IpsecDriver:
    name = "ipsec"
    mtu = IPSEC_MTU

    def __init__(
        self,
        *,
        node_ip: str,
        pod_cidrs: list[str],
        run_dir: Path,
        cert: Path,
        key: Path,
        ca: Path,
        charon: str = CHARON,
        ports: tuple[int, int] = (500, 4500),
        wrapper: Sequence[str] = (),
    ) -> None:
        """`ports`: IKE and NAT-T (a second charon on a node needs others); `wrapper`: a command prefix that runs
        charon where it belongs (`nsenter --net=...` from outside the node's namespace), none for the agent."""
        self.node_ip = node_ip
        self.pod_cidrs = pod_cidrs
        self.run_dir = run_dir
        self.cert = cert
        self.key = key
        self.ca = ca
        self.charon = charon
        self.ports = ports
        self.wrapper = list(wrapper)
        self.process: asyncio.subprocess.Process | None = None
        self.charon_pid: int | None = None
        self.loaded: dict[str, str] = {}  # connection name -> fingerprint of what we loaded
        self.credentials_loaded_for: tuple[int, str] | None = None  # (charon PID, files) our key and CAs went to
        self.sas: dict[str, str] = {}  # connection name -> "ESTABLISHED/INSTALLED" and the like

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "charon.vici"

    # --- charon

    def _running_charon(self) -> int | None:
        try:
            pid = int((self.run_dir / "charon.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() != "charon":
                return None
        return pid

    async def _start_charon(self) -> int:
        for path in (self.cert, self.key, self.ca):
            if not path.is_file():
                raise DatapathError(f"ipsec: {path} is missing (the node's certificate, key and the mesh CA)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("charon.pid", "charon.vici"):
            (self.run_dir / stale).unlink(missing_ok=True)
        (self.run_dir / "strongswan.conf").write_text(
            CONFIG.format(plugins=CHARON_PLUGINS, ike_port=self.ports[0], nat_port=self.ports[1])
        )
        log_file = (self.run_dir / "charon.log").open("ab")
        try:
            # a private mount namespace with our folder on /run: charon's PID file and socket are the node's own
            self.process = await asyncio.create_subprocess_exec(
                *self.wrapper, "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$0" /run && exec "$1"', str(self.run_dir), self.charon,
                env={**os.environ, "STRONGSWAN_CONF": "/run/strongswan.conf"},
                stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        finally:
            log_file.close()
        for _ in range(200):
            pid = self._running_charon()
            if pid is not None and self.socket_path.exists():
                log.info("charon started (pid %s), vici at %s", pid, self.socket_path)
                return pid
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)  # charon writes its PID file and socket once its plugins are loaded
        tail = (self.run_dir / "charon.log").read_text(errors="replace").splitlines()[-5:]
        await stop_helper(self.process)  # hung, not dead: the next round starts a fresh one, not a second one
        raise DatapathError("ipsec: charon did not start: " + (" | ".join(tail) or "no output"))

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise DatapathError(f"ipsec: no charon answers at {self.socket_path}: {exc}") from exc
        return sock

    async def _vici(self, what: str, call: Any) -> Any:
        """Run a (blocking) vici exchange in a thread, with its own connection; errors become DatapathError."""

        def run() -> Any:
            sock = self._connect()
            try:
                return call(vici.Session(sock))
            finally:
                sock.close()

        try:
            return await asyncio.to_thread(run)
        except vici.exception.CommandException as exc:
            raise DatapathError(f"ipsec: {what}: {exc}") from exc
        except (OSError, vici.exception.SessionException) as exc:
            raise DatapathError(f"ipsec: {what}: {exc}") from exc

    async def setup(self) -> None:
        pid = self._running_charon()
        if pid is None:
            pid = await self._start_charon()
            self.loaded.clear()
        if pid != self.charon_pid:
            self.charon_pid = pid
            self.loaded.clear()
            self.credentials_loaded_for = None
        ca, key = self.ca.read_bytes(), self.key.read_bytes()
        loaded_for = (pid, hashlib.sha256(ca + b"\0" + key).hexdigest())
        if self.credentials_loaded_for != loaded_for:
            # also a rotation: new files go to the running charon (its SAs stay up); the connections, which carry
            # the certificate and the CAs, are loaded again by `apply` because their fingerprints changed
            for one in split_pem(ca):
                await self._vici("load a CA", lambda s, c=one: s.load_cert({"type": "X509", "flag": "CA", "data": c}))
            await self._vici("load the node's key", lambda s: s.load_key({"type": "any", "data": key}))
            if self.credentials_loaded_for is not None and self.credentials_loaded_for[0] == pid:
                log.info("ipsec: rotated certificate files loaded into charon (pid %s), its SAs kept", pid)
            self.credentials_loaded_for = loaded_for

    # --- peers

    def _initiator(self, peer: Peer) -> bool:
        """Of two nodes, the lower address initiates (compared as packed bytes: IPv4 and IPv6 alike)."""
        return ipaddress.ip_address(self.node_ip).packed < ipaddress.ip_address(peer.ip).packed

    def _connection(self, peer: Peer) -> dict[str, Any]:
        return {
            "version": "2",
            "local_addrs": [self.node_ip],
            "remote_addrs": [peer.ip],
            "local_port": str(self.ports[0]),
            "remote_port": str(self.ports[0]),
            "encap": "yes",  # kernel-libipsec speaks ESP in UDP only
            "keyingtries": "0",
            "dpd_delay": "10s",
            "rekey_time": "4h",
            "proposals": IKE_PROPOSALS,
            "local": {"auth": "pubkey", "certs": [self.cert.read_bytes()], "id": self.node_ip},
            "remote": {"auth": "pubkey", "id": peer.ip, "cacerts": split_pem(self.ca.read_bytes())},
            "children": {
                "pods": {
                    "local_ts": list(self.pod_cidrs),
                    "remote_ts": list(peer.pod_cidrs),
                    "esp_proposals": ESP_PROPOSALS,
                    "mode": "tunnel",
                    "start_action": "none",
                    "dpd_action": "restart" if self._initiator(peer) else "clear",
                    "close_action": "start" if self._initiator(peer) else "none",
                }
            },
        }

    async def _states(self) -> dict[str, str]:
        """connection name -> state of its IKE SA and its child SAs, e.g. 'ESTABLISHED/INSTALLED'."""

        def collect(session: vici.Session) -> dict[str, str]:
            states: dict[str, str] = {}
            for sa in session.list_sas():
                for name, ike in sa.items():
                    children = {_text(child.get("state", "")) for child in (ike.get("child-sas") or {}).values()}
                    state = _text(ike.get("state", ""))
                    current = f"{state}/{'INSTALLED' if 'INSTALLED' in children else '-'}"
                    if states.get(name, "").endswith("/INSTALLED"):
                        continue  # a duplicate SA while rekeying: the installed one counts
                    states[name] = current
            return states

        result: dict[str, str] = await self._vici("list SAs", collect)
        return result

    async def apply(self, peers: dict[str, Peer]) -> None:
        wanted = {connection_name(key): peer for key, peer in peers.items()}
        for name in set(self.loaded) - set(wanted):
            await self._vici(f"unload {name}", lambda s, n=name: s.unload_conn({"name": n}))
            with contextlib.suppress(DatapathError):  # no SA to terminate is fine
                request = {"ike": name, "timeout": "-1"}
                await self._vici(f"terminate {name}", lambda s, r=request: list(s.terminate(r)))
            del self.loaded[name]
            log.info("ipsec: peer %s gone: connection unloaded, SAs terminated", name)
        for name, peer in wanted.items():
            connection = self._connection(peer)
            fingerprint = hashlib.sha256(repr(connection).encode()).hexdigest()
            if self.loaded.get(name) != fingerprint:
                await self._vici(f"load {name}", lambda s, n=name, c=connection: s.load_conn({n: c}))
                self.loaded[name] = fingerprint
        self.sas = await self._states()
        for name, peer in wanted.items():
            # CONNECTING: an exchange under way, which charon retransmits itself
            state = self.sas.get(name, "-/-")
            if self._initiator(peer) and not state.endswith("/INSTALLED") and not state.startswith("CONNECTING"):
                # non-blocking: the result shows in the next round's list of SAs
                request = {"child": "pods", "ike": name, "timeout": "-1"}
                await self._vici(f"initiate {name}", lambda s, r=request: list(s.initiate(r)))

    def pending(self) -> bool:
        """Some peer has no child SA installed yet: the router comes back soon (to initiate again, or, on the
        responding side, to see the SA the peer made and say so in the status)."""
        return any(not self.sas.get(name, "").endswith("/INSTALLED") for name in self.loaded)

    async def close(self) -> None:
        """Stop the charon we started (not one we found running: it was started by an earlier agent and goes on)."""
        await stop_helper(self.process)

    def describe(self) -> dict[str, object]:
        return {
            "driver": self.name,
            "charon_pid": self.charon_pid,
            "vici": str(self.socket_path),
            "sas": dict(sorted(self.sas.items())),
            "installed": sum(1 for state in self.sas.values() if state.endswith("/INSTALLED")),
        }
