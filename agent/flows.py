"""Flows: the datapath's events, named by both sides' labels, in Hubble's shape, kept for `clustermesh observe`.

The ring buffer tells each drop and the first packet of each new allowed flow, with identities and addresses; the
flow log adds what a person needs to read them: each side's labels, namespace, pod and cluster (from the merged
view's identities and ipcache, or this node's own endpoints), the node, the direction, the drop reason by Cilium's
name. A flow is one JSON object as `hubble observe -o json` prints it (`{"flow": {...}, "node_name", "time"}`).
The last `capacity` flows are kept, numbered, so a reader asks for what came after the last one it saw.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from agent.view import MergedView
from bpf.maps import EGRESS, FLOW_EVENT_SIZE, VERDICT_DROPPED, FlowEvent
from clustermesh.model.flows import DROP_REASONS, PROTOCOLS, RESERVED, compact
from clustermesh.model.labels import CLUSTER_LABEL, NAMESPACE_LABEL

__all__ = ["DROP_REASONS", "FlowLog", "compact", "to_flow"]

log = logging.getLogger(__name__)

#: bpf_ktime_get_ns is CLOCK_MONOTONIC: this is what to add to it for the wall clock.
_MONOTONIC_TO_WALL = time.time_ns() - time.monotonic_ns()

#: where a record's protocol, verdict and reason are (bpf/src/datapath.h, struct flow_event)
_PROTOCOL, _VERDICT, _REASON = 28, 29, 30

Describe = Callable[[int, str], dict[str, Any]]


def _timestamp(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def _l4(event: FlowEvent) -> dict[str, Any]:
    name = PROTOCOLS.get(event.protocol)
    if name == "ICMPv4":
        return {"ICMPv4": {k: v for k, v in (("type", event.dport >> 8), ("code", event.dport & 0xFF)) if v}}
    if name is None:
        return {}
    ports = {k: v for k, v in (("source_port", event.sport), ("destination_port", event.dport)) if v}
    return {name: ports}


def to_flow(event: FlowEvent, node: str, describe: Describe) -> dict[str, Any]:
    """One event as Hubble prints a flow; `describe(identity, ip)` names an endpoint."""
    dropped = event.verdict == VERDICT_DROPPED
    time_ns = event.time_ns + _MONOTONIC_TO_WALL
    flow: dict[str, Any] = {"time": _timestamp(time_ns), "verdict": "DROPPED" if dropped else "FORWARDED"}
    if dropped:
        flow["drop_reason"] = event.reason
    flow["IP"] = {"source": event.source, "destination": event.destination, "ipVersion": "IPv4"}
    if l4 := _l4(event):
        flow["l4"] = l4
    flow["source"] = describe(event.src_identity, event.source)
    flow["destination"] = describe(event.dst_identity, event.destination)
    flow["Type"] = "L3_L4"
    flow["node_name"] = node
    flow["event_type"] = {"type": 1, "sub_type": event.reason} if dropped else {"type": 5}
    flow["traffic_direction"] = "EGRESS" if event.direction == EGRESS else "INGRESS"
    if dropped:
        flow["drop_reason_desc"] = DROP_REASONS.get(event.reason, ("", f"REASON_{event.reason}"))[1]
    flow["is_reply"] = event.is_reply
    flow["Summary"] = PROTOCOLS.get(event.protocol, f"protocol {event.protocol}")
    return {"flow": flow, "node_name": node, "time": flow["time"]}


class FlowLog:
    """The last flows of this node, numbered from 1; waiters are woken as flows come."""

    def __init__(self, view: MergedView, node: str, *, local: Callable[[str], tuple[str, str] | None],
                 capacity: int = 10000, registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self.view = view
        self.node = node
        self.local = local  # ip -> (namespace, pod name) of this node's endpoints
        self.flows: deque[tuple[int, bytes]] = deque(maxlen=capacity)
        self.next = 1
        self.changed = asyncio.Event()
        registry = registry or CollectorRegistry()
        self.processed = Counter("hubble_flows_processed", "Flows seen by this node",
                                 ["protocol", "type", "subtype", "verdict"], registry=registry)  # fmt: skip
        self.drops = Counter("hubble_drop", "Drops seen by this node", ["reason", "protocol"], registry=registry)

    def describe(self, identity: int, ip: str) -> dict[str, Any]:
        endpoint: dict[str, Any] = {"identity": identity}
        if identity in RESERVED:
            endpoint["labels"] = [f"reserved:{RESERVED[identity]}"]
        entry = self.view.identities.get(identity)
        if entry is not None:
            labels = {label.key: label.value for label in entry.labels}
            endpoint["cluster_name"] = labels.get(CLUSTER_LABEL, "")
            endpoint["namespace"] = labels.get(NAMESPACE_LABEL, "")
            endpoint["labels"] = sorted(str(label) for label in entry.labels)
        if (here := self.local(ip)) is not None:
            endpoint["namespace"], endpoint["pod_name"] = here
        elif (pair := self.view.ipcache(ip)) is not None and pair.pod_name:
            endpoint["namespace"], endpoint["pod_name"] = pair.namespace, pair.pod_name
        return {key: value for key, value in endpoint.items() if value not in ("", None)}

    def add(self, records: list[bytes]) -> None:
        """Records of the ring buffer, kept as they come and decoded only when read; the counters are counted per
        batch. A burst of new flows costs this node's agent little."""
        batch: dict[tuple[int, int, int], int] = {}
        for record in records:
            if len(record) < FLOW_EVENT_SIZE:
                continue
            self.flows.append((self.next, record))
            self.next += 1
            key = (record[_PROTOCOL], record[_VERDICT], record[_REASON])
            batch[key] = batch.get(key, 0) + 1
        for (protocol, verdict, reason), count in batch.items():
            summary = PROTOCOLS.get(protocol, f"protocol {protocol}")
            if verdict == VERDICT_DROPPED:
                self.processed.labels(summary, "Drop", "", "DROPPED").inc(count)
                self.drops.labels(DROP_REASONS.get(reason, ("", f"REASON_{reason}"))[1], summary).inc(count)
            else:
                self.processed.labels(summary, "PolicyVerdict", "", "FORWARDED").inc(count)
        self.changed.set()

    def since(self, after: int, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        found = [(number, record) for number, record in self.flows if number > after]
        if limit:
            found = found[-limit:]
        return [(number, to_flow(FlowEvent.decode(record), self.node, self.describe)) for number, record in found]

    async def wait(self, after: int, timeout: float) -> None:
        """Until a flow numbered after `after` exists, or `timeout` seconds passed."""
        try:
            async with asyncio.timeout(timeout):
                while self.next - 1 <= after:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass
