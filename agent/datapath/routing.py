"""Routing between nodes, programmed from the merged view: every node of every cluster is a peer.

`peers_from_view` turns the view's nodes into `Peer`s (pure); a `Driver` makes the node's kernel match a set of
peers (idempotent: it compares with what is there and changes only the difference); the `Router` feeds it: once at
start, after every batch of node changes in the view, and every `resync` seconds (a wireguard-go that died, a
route deleted by hand: put back).

Drivers: `native` (plain routes, via the peer or via the underlay's gateway, which learns pod CIDRs as a cloud
router would), `wireguard` (wireguard-go on TUN, configured with `wg`), `vxlan` (a VXLAN overlay with static
forwarding entries), and `ipsec` (strongSwan's charon over vici, `agent/datapath/ipsec.py`). A driver that is still
converging (an IKE SA being negotiated: `pending()`), or a round that failed, makes the next round come after
`retry` seconds rather than `resync`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.view import MergedView
from clustermesh.model import wire

__all__ = ["Driver", "Peer", "Router", "peers_from_view"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    key: str  # <cluster>/<node>
    ip: str  # the node's InternalIP (IPv4)
    pod_cidrs: tuple[str, ...]
    wireguard_key: str = ""


def node_peer(key: str, node: wire.Node) -> Peer | None:
    ips = [ip for ip in node.addresses_of("InternalIP") if ipaddress.ip_address(ip).version == 4]
    cidrs = [str(c) for c in [node.IPv4AllocCIDR, *(node.IPv4SecondaryAllocCIDRs or [])] if c is not None]
    if not ips or not cidrs:
        return None
    return Peer(key, ips[0], tuple(cidrs), node.WireguardPubKey)


def peers_from_view(nodes: Mapping[str, wire.Node], own: str) -> dict[str, Peer]:
    """Every node but our own that has an IPv4 address and a pod CIDR."""
    peers = {}
    for key, node in nodes.items():
        if key == own:
            continue
        peer = node_peer(key, node)
        if peer is not None:
            peers[key] = peer
    return peers


class Driver(Protocol):
    name: str
    mtu: int

    async def setup(self) -> None:
        """Create what the node needs once (devices, processes); safe to call again."""
        ...

    async def apply(self, peers: dict[str, Peer]) -> None:
        """Make the kernel match `peers`, and nothing else of ours."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, object]:
        """For status and debugging."""
        ...


@dataclass
class Router:
    view: MergedView
    driver: Driver
    own: str  # <cluster>/<node>
    resync: float = 10.0
    retry: float = 1.0  # the round after one that failed, or that left the driver still converging (an IKE SA)
    applied: dict[str, Peer] = field(default_factory=dict)
    last_error: str = ""
    applies: int = 0

    async def _apply(self) -> None:
        peers = peers_from_view(self.view.nodes, self.own)
        try:
            await self.driver.setup()
            await self.driver.apply(peers)
        except Exception as exc:  # the next round tries again: a datapath error must not stop the agent
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("datapath %s: applying %d peers failed", self.driver.name, len(peers))
            return
        if peers != self.applied:
            added = sorted(peers.keys() - self.applied.keys())
            removed = sorted(self.applied.keys() - peers.keys())
            log.info("datapath %s: %d peers (added %s, removed %s)", self.driver.name, len(peers), added or "-",
                     removed or "-")  # fmt: skip
        self.applied = peers
        self.last_error = ""
        self.applies += 1

    def converged(self) -> bool:
        pending = getattr(self.driver, "pending", None)
        return not self.last_error and not (callable(pending) and pending())

    async def run(self) -> None:
        subscription = self.view.subscribe()
        try:
            await self._apply()
            while True:
                try:
                    async with asyncio.timeout(self.resync if self.converged() else self.retry):
                        while True:
                            changes = await subscription.drain()
                            if any(change.kind == "node" for change in changes):
                                break
                except TimeoutError:
                    pass
                await self._apply()
        finally:
            subscription.close()
            await self.driver.close()
