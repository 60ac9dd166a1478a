"""The routing drivers: native routes, WireGuard (wireguard-go + `wg`), and a VXLAN overlay.

Each one keeps the kernel equal to a set of peers: it lists what is there (its own routes by protocol number,
`wg show dump`, its device's forwarding entries) and changes only the difference.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

from agent.datapath.helpers import stop_helper
from agent.datapath.netlink import DatapathError, netlink
from agent.datapath.routing import Peer

__all__ = ["NativeDriver", "VxlanDriver", "WireguardDriver", "wireguard_mtu"]

log = logging.getLogger(__name__)

UNDERLAY_MTU = 1500
WIREGUARD_OVERHEAD = 80  # IPv6 outer header (40) + UDP (8) + WireGuard (32): safe for either family
VXLAN_OVERHEAD = 50
VXLAN_DEVICE = "cm_vxlan"
VXLAN_ID = 2
VXLAN_PORT = 8472


def wireguard_mtu() -> int:
    return UNDERLAY_MTU - WIREGUARD_OVERHEAD


async def _reconcile_routes(want: dict[str, tuple[str | None, int | None, bool]]) -> None:
    """Our routes become exactly `want`: destination -> (gateway, interface index, onlink)."""
    async with netlink() as nl:
        have = await nl.our_routes()
        for dst in have.keys() - want.keys():
            await nl.delete_route(dst)
        for dst, (via, oif, onlink) in want.items():
            current = have.get(dst)
            if current is not None and current["via"] == via and (oif is None or current["oif"] == oif):
                continue
            await nl.route(dst, via=via, oif=oif, onlink=onlink)


class NativeDriver:
    """Plain routes: to a peer on our link, via the peer; to one elsewhere, via our gateway towards it."""

    name = "native"
    mtu = UNDERLAY_MTU

    async def setup(self) -> None:
        return None

    async def apply(self, peers: dict[str, Peer]) -> None:
        want: dict[str, tuple[str | None, int | None, bool]] = {}
        async with netlink() as nl:
            for peer in peers.values():
                via = await nl.gateway_to(peer.ip) or peer.ip
                for cidr in peer.pod_cidrs:
                    want[cidr] = (via, None, False)
        await _reconcile_routes(want)

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"driver": self.name}


class WireguardDriver:
    """One WireGuard interface per node: wireguard-go where the kernel has no module, configured with `wg`."""

    name = "wireguard"

    def __init__(self, *, interface: str, private_key: Path, port: int, address: str) -> None:
        self.interface = interface
        self.private_key = private_key
        self.port = port
        self.address = address
        self.mtu = wireguard_mtu()
        self.process: asyncio.subprocess.Process | None = None
        self.socket = Path(f"/var/run/wireguard/{interface}.sock")
        self._configured: int | None = None  # the interface index our key and port were set on

    async def _run(self, *args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise DatapathError(f"{' '.join(args[:3])}: {err.decode().strip() or out.decode().strip()}")
        return out.decode()

    async def setup(self) -> None:
        async with netlink() as nl:
            index = await nl.index(self.interface)
        if index is None:
            if self.process is not None and self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            # wireguard-go keeps running in the foreground (-f) as our child; its control socket is
            # /var/run/wireguard/<interface>.sock, shared by every namespace: the name must be unique on the host.
            self.process = await asyncio.create_subprocess_exec(
                "wireguard-go", "-f", self.interface,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            for _ in range(100):
                async with netlink() as nl:
                    index = await nl.index(self.interface)
                if index is not None and self.socket.exists():
                    break
                await asyncio.sleep(0.05)  # wireguard-go creates the interface and socket after it starts
            else:
                raise DatapathError(f"wireguard-go did not create {self.interface}")
            log.info("wireguard-go started for %s (pid %s)", self.interface, self.process.pid)
        if index != self._configured:
            # once per interface: wireguard-go re-binds its UDP socket on every `listen-port`, even the same one
            await self._run("wg", "set", self.interface, "private-key", str(self.private_key),
                            "listen-port", str(self.port))  # fmt: skip
            self._configured = index
        async with netlink() as nl:
            index = await nl.require(self.interface)
            await nl.ensure_address(index, f"{self.address}/32")
            await nl.up(index, mtu=self.mtu)

    async def peers(self) -> dict[str, tuple[str, str]]:
        """Configured peers: public key -> (endpoint, allowed ips)."""
        dump = await self._run("wg", "show", self.interface, "dump")
        peers = {}
        for line in dump.splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 4:
                peers[fields[0]] = (fields[2], ",".join(sorted(fields[3].split(","))))
        return peers

    async def apply(self, peers: dict[str, Peer]) -> None:
        wanted = {p.wireguard_key: p for p in peers.values() if p.wireguard_key}
        missing_keys = sorted(p.key for p in peers.values() if not p.wireguard_key)
        if missing_keys:
            log.warning("wireguard: no public key published by %s: not reachable over WireGuard", missing_keys)
        have = await self.peers()
        for key in have.keys() - wanted.keys():
            await self._run("wg", "set", self.interface, "peer", key, "remove")
        for key, peer in wanted.items():
            endpoint = f"{peer.ip}:{self.port}"
            allowed = ",".join(sorted(peer.pod_cidrs))
            if have.get(key) != (endpoint, allowed):
                await self._run("wg", "set", self.interface, "peer", key, "endpoint", endpoint, "allowed-ips", allowed)
        async with netlink() as nl:
            index = await nl.require(self.interface)
        await _reconcile_routes({cidr: (None, index, False) for p in wanted.values() for cidr in p.pod_cidrs})

    async def close(self) -> None:
        await stop_helper(self.process)

    def describe(self) -> dict[str, object]:
        return {"driver": self.name, "interface": self.interface, "port": self.port,
                "pid": self.process.pid if self.process else None}  # fmt: skip


def vxlan_mac(ip: str) -> str:
    """A stable, locally administered MAC for a node's VXLAN device, from its underlay IPv4 address."""
    raw = ipaddress.IPv4Address(ip).packed
    return "0e:cd:" + ":".join(f"{byte:02x}" for byte in raw)


def vtep_ip(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False).network_address)


class VxlanDriver:
    """A VXLAN device per node: each peer's pod CIDR via its VTEP (the CIDR's network address), whose MAC and
    underlay address are static neighbour and forwarding entries (no flooding, no learning)."""

    name = "vxlan"
    mtu = UNDERLAY_MTU - VXLAN_OVERHEAD

    def __init__(self, *, node_ip: str, pod_cidr: str) -> None:
        self.node_ip = node_ip
        self.vtep = vtep_ip(pod_cidr)
        self.entries: dict[str, tuple[str, str, str]] = {}  # peer key -> (vtep ip, mac, underlay ip)

    async def setup(self) -> None:
        async with netlink() as nl:
            index = await nl.index(VXLAN_DEVICE)
            if index is None:
                await nl.ipr.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_id=VXLAN_ID, vxlan_port=VXLAN_PORT,
                                  vxlan_local=self.node_ip, vxlan_learning=0)  # fmt: skip
                index = await nl.require(VXLAN_DEVICE)
                self.entries.clear()
            await nl.ensure_address(index, f"{self.vtep}/32")
            # setting a MAC flushes the device's neighbours, even permanent ones: only when it differs
            mac = vxlan_mac(self.node_ip)
            await nl.up(index, mtu=self.mtu, address=None if await nl.mac(index) == mac else mac)

    async def apply(self, peers: dict[str, Peer]) -> None:
        wanted = {key: (vtep_ip(p.pod_cidrs[0]), vxlan_mac(p.ip), p.ip) for key, p in peers.items()}
        async with netlink() as nl:
            index = await nl.require(VXLAN_DEVICE)
            present = await nl.neighbours(index)
            for key, (vtep, mac, _) in list(self.entries.items()):
                if key in wanted and present.get(vtep) != mac:  # flushed or changed behind our back: made again
                    del self.entries[key]
            for key in self.entries.keys() - wanted.keys():
                vtep, mac, underlay = self.entries.pop(key)
                await nl.delete_neighbour(index, vtep)
                await nl.delete_fdb(index, mac, underlay)
            for key, (vtep, mac, underlay) in wanted.items():
                if self.entries.get(key) != (vtep, mac, underlay):
                    await nl.neighbour(index, vtep, mac)
                    await nl.fdb(index, mac, underlay)
                    self.entries[key] = (vtep, mac, underlay)
        await _reconcile_routes(
            {cidr: (vtep_ip(p.pod_cidrs[0]), index, True) for p in peers.values() for cidr in p.pod_cidrs}
        )

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"driver": self.name, "device": VXLAN_DEVICE, "vtep": self.vtep, "peers": len(self.entries)}
