"""Pod interfaces: what the CNI plugin asks the agent for (ADD, DEL, CHECK).

A pod gets a veth pair: `lxc<hash>` stays in the node's namespace, the other end goes into the pod's namespace
under the name the runtime asked for (eth0). The pod's address is a /32 from the node's pod CIDR; the pod reaches
everything in the mesh's pod supernet through the node's router IP (which lives on the node's loopback
loopback, so the node answers ARP for it on every veth), and the node reaches the pod through a /32 route on its
veth. There is no default route in a pod: the lab has none anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.datapath.ipam import IPAM
from agent.datapath.netlink import RTPROT_PODS, DatapathError, ip_in_netns, netlink, set_sysctl
from agent.datapath.netnscookie import netns_cookie

__all__ = ["PodAttachment", "PodNetwork"]

log = logging.getLogger(__name__)

SCOPE_LINK = 253


def host_veth(container_id: str) -> str:
    return "lxc" + hashlib.sha256(container_id.encode()).hexdigest()[:11]


@dataclass(frozen=True)
class PodAttachment:
    container_id: str
    ip: str
    host_interface: str
    interface: str
    gateway: str
    mac: str = ""
    host_ifindex: int = 0
    netns_cookie: int = 0  # names the pod in the socket load balancer's events


class PodNetwork:
    def __init__(self, *, pod_cidr: str, router_ip: str, supernets: list[str], state_dir: Path, mtu: int) -> None:
        self.pod_cidr = pod_cidr
        self.router_ip = router_ip
        self.supernets = supernets
        self.mtu = mtu
        self.ipam = IPAM(pod_cidr, state_dir / "ipam.json")

    async def setup_node(self) -> None:
        """Forwarding on, and the router IP on the node's loopback (a local address: the node answers ARP for it
        on every pod's veth; no dummy interface needed, which some kernels lack)."""
        set_sysctl("net.ipv4.ip_forward", "1")
        set_sysctl("net.ipv4.conf.all.rp_filter", "0")
        set_sysctl("net.ipv4.conf.default.rp_filter", "0")
        async with netlink() as nl:
            index = await nl.require("lo")
            await nl.up(index)
            await nl.ensure_address(index, f"{self.router_ip}/32")
            links = {index: name for name, index in (await nl.links()).items()}
            for destination, route in (await nl.our_routes(RTPROT_PODS)).items():  # pods attached before a restart
                self.ipam.reserve(destination.partition("/")[0], device=links.get(route["oif"]))

    async def add(self, container_id: str, netns_path: str, interface: str) -> PodAttachment:
        host_name = host_veth(container_id)
        ip = self.ipam.allocate(container_id, device=host_name)
        try:
            async with netlink() as nl:
                if await nl.index(host_name) is None:
                    await nl.ipr.link("add", ifname=host_name, kind="veth", peer={"ifname": f"tmp{host_name[3:]}"})
                    peer = await nl.require(f"tmp{host_name[3:]}")
                    await nl.move_to_netns(peer, netns_path, interface)
                host = await nl.require(host_name)
                host_index = host
                await nl.up(host, mtu=self.mtu)
                await nl.route(f"{ip}/32", oif=host, scope=SCOPE_LINK, proto=RTPROT_PODS)
            await ip_in_netns(
                netns_path,
                "link set lo up",
                f"link set {interface} mtu {self.mtu} up",
                f"addr replace {ip}/32 dev {interface}",
                f"route replace {self.router_ip}/32 dev {interface} scope link",
                *(f"route replace {net} via {self.router_ip} dev {interface} onlink" for net in self.supernets),
            )
            links = json.loads(await ip_in_netns(netns_path, f"link show dev {interface}"))
            mac = str(links[0].get("address", "")) if links else ""
        except Exception:  # DatapathError, or an OSError opening a vanished netns: nothing half-made stays
            await self.delete(container_id)
            raise
        try:
            cookie = await asyncio.to_thread(netns_cookie, netns_path)
        except OSError as exc:  # its flows through services then name no source pod; nothing else depends on it
            log.warning("pod %s: cannot read its network namespace's cookie: %s", container_id[:12], exc)
            cookie = 0
        log.info("pod %s: %s on %s", container_id[:12], ip, host_name)
        return PodAttachment(container_id, ip, host_name, interface, self.router_ip, mac, host_index, cookie)

    async def delete(self, container_id: str) -> str | None:
        async with netlink() as nl:
            await nl.delete_link(host_veth(container_id))
        return self.ipam.release(container_id, device=host_veth(container_id))

    async def check(self, container_id: str, netns_path: str, interface: str) -> list[str]:
        """What is wrong with a pod's attachment (empty when all is as ADD left it)."""
        problems = []
        ip = self.ipam.allocated.get(container_id)
        if ip is None:
            return [f"no address allocated to {container_id}"]
        async with netlink() as nl:
            if await nl.index(host_veth(container_id)) is None:
                problems.append(f"the node side {host_veth(container_id)} is gone")
        try:
            shown = json.loads(await ip_in_netns(netns_path, f"addr show dev {interface}"))
        except (DatapathError, OSError, ValueError) as exc:
            problems.append(f"cannot find {interface} in {netns_path}: {exc}")
        else:
            present = {f"{a.get('local')}/{a.get('prefixlen')}" for link in shown for a in link.get("addr_info", [])}
            if f"{ip}/32" not in present:
                problems.append(f"{interface} lacks {ip}/32")
        return problems
