"""The relay: which nodes to follow (from a peer service: an agent's merged view names every node of every connected
cluster), one follower per node, and their flows merged in time order for readers.

Flows are numbered as they arrive (readers ask for what came after the last number they saw, as of one agent), and
each answer is sorted by the flows' own time. A reader is told every node the relay cannot read, with the reason:
a node's flows are never silently missing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from clustermesh.daemon import client
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.daemon.tls import ReloadingContext
from clustermesh.relay.peers import Peer, PeerFollower

__all__ = ["Relay"]

log = logging.getLogger(__name__)


class Relay:
    def __init__(
        self,
        peer_service: Path,
        client_tls: ssl.SSLContext | ReloadingContext,
        *,
        capacity: int = 20000,
        refresh: float = 5.0,
        history: int = 1000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.peer_service = peer_service
        self.client_tls = client_tls
        self.refresh = refresh
        self.history = history
        self.flows: deque[tuple[int, dict[str, Any]]] = deque(maxlen=capacity)
        self.next = 1
        self.changed = asyncio.Event()
        self.followers: dict[str, tuple[PeerFollower, asyncio.Task[None]]] = {}
        self.peer_service_error = "not asked yet"
        registry = registry or CollectorRegistry()
        self.received = Counter("clustermesh_relay_flows_received", "Flows read from nodes, by cluster", ["cluster"],
                                registry=registry)  # fmt: skip
        self.peer_status = Gauge("hubble_relay_pool_peer_connection_status", "Nodes followed, by connection status",
                                 ["status"], registry=registry)  # fmt: skip

    def _tls(self) -> ssl.SSLContext:
        return self.client_tls.current() if isinstance(self.client_tls, ReloadingContext) else self.client_tls

    # --- following

    async def run(self) -> None:
        try:
            while True:
                await self.refresh_peers()
                await asyncio.sleep(self.refresh)
        finally:
            await cancel_and_wait([task for _, task in self.followers.values()])

    async def refresh_peers(self) -> None:
        try:
            answer = await client.request(self.peer_service, "GET", "/v1/peers", timeout=10)
            document = answer.json()
            if answer.status != 200:
                raise client.BadAnswer(f"answered {answer.status}: {document}")
            peers = [Peer(**{k: str(p[k]) for k in ("name", "cluster", "node", "address", "tls_server_name")})
                     for p in document["peers"]]  # fmt: skip
        except (client.SocketUnreachable, client.BadAnswer, KeyError, TypeError) as exc:
            if self.peer_service_error != str(exc):
                log.warning("peer service %s: %s (following the nodes known before)", self.peer_service, exc)
            self.peer_service_error = str(exc)
            self._count_states()
            return
        self.peer_service_error = ""
        wanted = {peer.name: peer for peer in peers}
        for name in [n for n, (f, _) in self.followers.items() if wanted.get(n) != f.peer]:
            _, task = self.followers.pop(name)
            await cancel_and_wait([task])
            log.info("node %s: no longer followed", name)
        for name, peer in wanted.items():
            if name not in self.followers:
                follower = PeerFollower(peer, self._tls, self._deliver, history=self.history)
                self.followers[name] = (follower, asyncio.create_task(follower.run(), name=f"relay-{name}"))
        self._count_states()

    def _count_states(self) -> None:
        states = [f.state for f, _ in self.followers.values()]
        for state in ("connecting", "connected", "unreachable"):
            self.peer_status.labels(state).set(states.count(state))

    def _deliver(self, peer: Peer, flows: list[dict[str, Any]]) -> None:
        for flow in sorted(flows, key=lambda f: str(f.get("time", ""))):
            self.flows.append((self.next, flow))
            self.next += 1
        self.received.labels(peer.cluster).inc(len(flows))
        self._count_states()
        self.changed.set()

    # --- reading

    def since(self, after: int, last: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        found = sorted(((number, flow) for number, flow in self.flows if number > after),
                       key=lambda item: str(item[1].get("time", "")))  # fmt: skip
        return found[-last:] if last else found

    async def wait(self, after: int, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self.next - 1 <= after:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass

    def nodes(self) -> list[dict[str, Any]]:
        return [follower.describe() for follower, _ in sorted(self.followers.values(), key=lambda f: f[0].peer.name)]

    def unreachable(self) -> list[str]:
        """Every node (or the peer service) whose flows a reader does not get, with the reason."""
        found = [f"{f.peer.name}: {f.error}" for f, _ in self.followers.values() if f.state == "unreachable"]
        if self.peer_service_error:
            found.insert(0, f"peer service {self.peer_service}: {self.peer_service_error}")
        return sorted(found)
