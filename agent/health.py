"""Probing every other node of the mesh through the data path, as cilium-health does: an ICMP echo to the node's
router address (inside its pod CIDR, so the packet takes the tunnel or route the pods' traffic takes, from this
node's own router address) and a TCP connection to its agent's health port (4240, Cilium's), every `interval`.

A node is *unreachable* once its ICMP probe failed `threshold` rounds in a row (`failing` after one): its cluster is
then not ready, whatever the control plane says; so is a cluster with a node not probed yet (`probing`), which lasts
a moment: a new node in the merged view is probed at once. The TCP probe tells whether the node's agent answers
(shown, not judged: a node whose agent restarts still carries traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.view import MergedView

__all__ = ["HEALTH_PORT", "HealthProber", "NodeHealth"]

log = logging.getLogger(__name__)

HEALTH_PORT = 4240


@dataclass
class NodeHealth:
    name: str  # cluster/node
    cluster: str
    address: str  # its router address
    icmp_ms: float | None = None
    tcp_ms: float | None = None
    icmp_error: str = ""
    tcp_error: str = ""
    failures: int = 0  # ICMP rounds failed in a row
    rounds: int = 0

    def describe(self, threshold: int) -> dict[str, Any]:
        state = ("probing" if self.rounds == 0 else "unreachable" if self.failures >= threshold
                 else "failing" if self.failures else "reachable")  # fmt: skip
        return {"name": self.name, "address": self.address, "state": state, "icmp_ms": self.icmp_ms,
                "tcp_ms": self.tcp_ms, "icmp_error": self.icmp_error or None,
                "tcp_error": self.tcp_error or None}  # fmt: skip


def _router_address(cidr: str) -> str:
    network = ipaddress.ip_network(cidr, strict=False)
    return str(network.network_address + 1)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


async def icmp_echo(source: str, target: str, timeout: float, ident: int, sequence: int) -> float:
    """One echo request from `source` to `target`; the round trip in ms, or an OSError/TimeoutError."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setblocking(False)
        sock.bind((source, 0))
        header = struct.pack("!BBHHH", 8, 0, 0, ident, sequence)
        payload = b"clustermesh-health"
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, sequence) + payload
        started = time.monotonic()
        await loop.sock_sendto(sock, packet, (target, 0))
        async with asyncio.timeout(timeout):
            while True:
                data, (sender, _) = await loop.sock_recvfrom(sock, 2048)
                offset = (data[0] & 0x0F) * 4  # past the IP header
                kind, _, _, got_ident, got_sequence = struct.unpack("!BBHHH", data[offset : offset + 8])
                if sender == target and kind == 0 and (got_ident, got_sequence) == (ident, sequence):
                    return (time.monotonic() - started) * 1000


async def tcp_connect(source: str, target: str, port: int, timeout: float) -> float:
    started = time.monotonic()
    _, writer = await asyncio.wait_for(asyncio.open_connection(target, port, local_addr=(source, 0)), timeout)
    elapsed = (time.monotonic() - started) * 1000
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return elapsed


class HealthProber:
    def __init__(self, view: MergedView, own_node: str, source: str, *, port: int = HEALTH_PORT,
                 interval: float = 2.0, timeout: float = 1.0, threshold: int = 2,
                 on_change: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.view = view
        self.own_node = own_node  # cluster/node
        self.source = source
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.threshold = threshold
        self.on_change = on_change or (lambda: None)
        self.nodes: dict[str, NodeHealth] = {}
        self._ident = os.getpid() & 0xFFFF
        self._sequence = 0
        self._server: asyncio.Server | None = None

    async def serve(self) -> None:
        """The health port other nodes' agents connect to: accept, close."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        self._server = await asyncio.start_server(answer, "0.0.0.0", self.port)

    async def run(self) -> None:
        await self.serve()
        subscription = self.view.subscribe(kinds=["node"])
        try:
            while True:
                await self.probe_once()
                # a node failing is asked again soon (its tunnel may be coming up); one added or changed at once
                wait = min(self.interval, 0.5) if any(h.failures for h in self.nodes.values()) else self.interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await subscription.drain()
        finally:
            subscription.close()
            if self._server is not None:
                self._server.close()

    def _targets(self) -> dict[str, tuple[str, str]]:
        found = {}
        for key, node in self.view.nodes.items():
            if key == self.own_node or node.IPv4AllocCIDR is None:
                continue
            found[key] = (key.partition("/")[0], _router_address(str(node.IPv4AllocCIDR)))
        return found

    async def probe_once(self) -> None:
        targets = self._targets()
        for gone in set(self.nodes) - set(targets):
            del self.nodes[gone]
        for key, (cluster, address) in targets.items():
            if key not in self.nodes or self.nodes[key].address != address:
                self.nodes[key] = NodeHealth(key, cluster, address)
        before = {key: health.failures >= self.threshold for key, health in self.nodes.items()}
        await asyncio.gather(*(self._probe(health) for health in list(self.nodes.values())))
        after = {key: health.failures >= self.threshold for key, health in self.nodes.items()}
        for key, unreachable in after.items():
            if unreachable != before.get(key):
                health = self.nodes[key]
                if unreachable:
                    log.warning("node %s (%s) unreachable through the data path: %s", key, health.address,
                                health.icmp_error)  # fmt: skip
                else:
                    log.info("node %s (%s) reachable through the data path", key, health.address)
        if after != before or any(h.rounds == 1 for h in self.nodes.values()):
            self.on_change()

    async def _probe(self, health: NodeHealth) -> None:
        self._sequence = (self._sequence + 1) & 0xFFFF
        icmp, tcp = await asyncio.gather(
            icmp_echo(self.source, health.address, self.timeout, self._ident, self._sequence),
            tcp_connect(self.source, health.address, self.port, self.timeout),
            return_exceptions=True,
        )
        health.rounds += 1
        if isinstance(icmp, BaseException):
            health.failures += 1
            health.icmp_ms, health.icmp_error = None, _reason(icmp)
        else:
            health.failures, health.icmp_ms, health.icmp_error = 0, round(icmp, 3), ""
        if isinstance(tcp, BaseException):
            health.tcp_ms, health.tcp_error = None, _reason(tcp)
        else:
            health.tcp_ms, health.tcp_error = round(tcp, 3), ""

    def cluster(self, name: str) -> dict[str, Any]:
        """This cluster's nodes as probed: counts, latency (ICMP, ms) and each node."""
        nodes = [h.describe(self.threshold) for h in sorted(self.nodes.values(), key=lambda h: h.name)
                 if h.cluster == name]  # fmt: skip
        latencies = [n["icmp_ms"] for n in nodes if n["icmp_ms"] is not None]
        return {
            "total": len(nodes), "reachable": sum(n["state"] == "reachable" for n in nodes),
            "unreachable": [n["name"] for n in nodes if n["state"] == "unreachable"],
            "probing": [n["name"] for n in nodes if n["state"] == "probing"],
            "latency_ms": {"min": min(latencies), "avg": round(sum(latencies) / len(latencies), 3),
                           "max": max(latencies)} if latencies else None,
            "nodes": nodes,
        }  # fmt: skip


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"
