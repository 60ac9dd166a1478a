"""One node's flow service, followed: its flows as they come, and whether it can be reached, with the reason.

A follower asks the node for what came after the last flow it has (`/v1/flows?since=N&wait=S`, a long poll over
mutual TLS); the first time, for the last `history` flows. A node that does not answer is marked unreachable with the
error, and asked again after a backoff of 1 s up to 10 s; the relay names it to every reader until it answers.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clustermesh.daemon import client

__all__ = ["Peer", "PeerFollower"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A node as the peer service names it: `cluster/node`, where its flow service listens, its certificate's name."""

    name: str
    cluster: str
    node: str
    address: str
    tls_server_name: str


@dataclass
class PeerFollower:
    peer: Peer
    context: Callable[[], ssl.SSLContext]  # asked at each request: rotated certificates are taken up at once
    deliver: Callable[[Peer, list[dict[str, Any]]], None]
    history: int = 1000
    wait: float = 5.0
    state: str = "connecting"  # connecting | connected | unreachable
    error: str = ""
    flows: int = 0
    last_seen: float = 0.0
    next: int = field(default=-1)

    def describe(self) -> dict[str, Any]:
        ago = round(time.monotonic() - self.last_seen, 1) if self.last_seen else None
        return {"name": self.peer.name, "cluster": self.peer.cluster, "address": self.peer.address,
                "state": self.state, "error": self.error, "flows": self.flows, "last_seen_s_ago": ago}  # fmt: skip

    async def run(self) -> None:
        backoff = 1.0
        while True:
            path = (f"/v1/flows?since=0&last={self.history}" if self.next < 0
                    else f"/v1/flows?since={self.next}&wait={self.wait}")  # fmt: skip
            try:
                host, _, port = self.peer.address.rpartition(":")
                target = client.TlsTarget(host, int(port), self.context(), self.peer.tls_server_name)
                answer = await client.request(target, "GET", path, connect_timeout=3, timeout=self.wait + 10)
                document = answer.json()
                if answer.status != 200:
                    error = document.get("error") if isinstance(document, dict) else document
                    raise client.BadAnswer(f"{self.peer.address} answered {answer.status}: {error}")
            except (client.SocketUnreachable, client.BadAnswer) as exc:
                if self.state != "unreachable" or self.error != str(exc):
                    log.warning("node %s: flows unreachable: %s", self.peer.name, exc)
                self.state, self.error = "unreachable", str(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if self.state != "connected":
                log.info("node %s: following its flows at %s", self.peer.name, self.peer.address)
            self.state, self.error, backoff = "connected", "", 1.0
            self.last_seen = time.monotonic()
            flows = document.get("flows") or []
            if int(document.get("newest", self.next)) < self.next:  # the agent restarted: its numbers start again
                log.info("node %s: its flows are numbered anew (agent restarted)", self.peer.name)
                self.next = -1
                continue
            self.next = int(document.get("next", self.next))
            if flows:
                self.flows += len(flows)
                self.deliver(self.peer, flows)
