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
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from agent.view import MergedView
from bpf.lbmaps import SOCK_EVENT_SIZE, SOCK_NO_BACKEND, SockEvent
from bpf.maps import EGRESS, FLOW_EVENT_SIZE, VERDICT_DROPPED, FlowEvent
from clustermesh.model.flows import DROP_REASONS, PROTOCOLS, RESERVED, compact
from clustermesh.model.labels import CLUSTER_LABEL, NAMESPACE_LABEL

__all__ = ["DROP_REASONS", "FlowLog", "ServiceNames", "compact", "to_flow", "to_sock_flow"]

log = logging.getLogger(__name__)

#: bpf_ktime_get_ns is CLOCK_MONOTONIC: this is what to add to it for the wall clock.
_MONOTONIC_TO_WALL = time.time_ns() - time.monotonic_ns()

#: where a record's protocol, verdict and reason are (bpf/src/datapath.h, struct flow_event)
_PROTOCOL, _VERDICT, _REASON = 28, 29, 30

Describe = Callable[[int, str], dict[str, Any]]

#: Hubble's trace-sock event type, and the translation point of a connect() (flow.proto SocketTranslationPoint)
TRACE_SOCK = 7
POST_XLATE_FWD = 2
DROP_NO_SERVICE = 158


class ServiceNames(Protocol):
    """What the load balancer knows to name a translation: the Service of a reverse-NAT index, a cluster's name."""

    def service_of(self, rev_nat: int) -> str | None: ...

    def cluster_name(self, cluster_id: int) -> str | None: ...


#: netns cookie -> (pod IP, identity) of this node's pod in that namespace
PodOfNetns = Callable[[int], tuple[str, int] | None]


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


def to_sock_flow(event: SockEvent, node: str, describe: Describe, identity_of: Callable[[str], int],
                 pod_of_netns: PodOfNetns, services: ServiceNames | None) -> dict[str, Any]:  # fmt: skip
    """A socket's connect() translated by the load balancer, as Hubble prints a trace-sock flow
    (`post-xlate-fwd TRANSLATED`), with the Service, its frontend and the chosen backend with its cluster."""
    refused = event.verdict == SOCK_NO_BACKEND
    time_ns = event.time_ns + _MONOTONIC_TO_WALL
    pod = pod_of_netns(event.netns_cookie)
    source_ip, source_identity = pod if pod is not None else ("", 0)
    destination_ip = event.frontend if refused else event.backend
    destination_port = event.frontend_port if refused else event.backend_port
    flow: dict[str, Any] = {"time": _timestamp(time_ns), "verdict": "DROPPED" if refused else "TRANSLATED"}
    if refused:
        flow["drop_reason"] = DROP_NO_SERVICE
    flow["IP"] = {"source": source_ip, "destination": destination_ip, "ipVersion": "IPv4"}
    name = PROTOCOLS.get(event.protocol, f"protocol {event.protocol}")
    flow["l4"] = {name: {"destination_port": destination_port}}
    flow["source"] = describe(source_identity, source_ip) if source_ip else {"identity": 0}
    flow["destination"] = describe(identity_of(destination_ip), destination_ip) if not refused else {}
    flow["Type"] = "SOCK"
    flow["node_name"] = node
    flow["event_type"] = {"type": TRACE_SOCK, "sub_type": POST_XLATE_FWD}
    flow["traffic_direction"] = "EGRESS"
    service_key = services.service_of(event.rev_nat) if services is not None else None
    if service_key:
        namespace, _, service_name = service_key.partition("/")
        flow["destination_service"] = {"name": service_name, "namespace": namespace}
    translation: dict[str, Any] = {"frontend": f"{event.frontend}:{event.frontend_port}"}
    if service_key:
        translation["name"] = service_key
    if not refused:
        translation["backend"] = f"{event.backend}:{event.backend_port}"
        cluster = services.cluster_name(event.cluster_id) if services is not None else None
        translation["backend_cluster"] = cluster or (str(event.cluster_id) if event.cluster_id else "")
    flow["service"] = translation
    flow["sock_xlation_point"] = "SOCK_XLATION_POINT_POST_DIRECTION_FWD"
    flow["socket_cookie"] = str(event.socket_cookie)
    if refused:
        flow["drop_reason_desc"] = DROP_REASONS.get(DROP_NO_SERVICE, ("", "NO_SERVICE"))[1]
    flow["is_reply"] = False
    flow["Summary"] = name
    return {"flow": flow, "node_name": node, "time": flow["time"]}


class FlowLog:
    """The last flows of this node, numbered from 1; waiters are woken as flows come."""

    def __init__(self, view: MergedView, node: str, *, local: Callable[[str], tuple[str, str] | None],
                 capacity: int = 10000, registry: CollectorRegistry | None = None,
                 pod_of_netns: PodOfNetns | None = None, services: ServiceNames | None = None) -> None:  # fmt: skip
        self.view = view
        self.node = node
        self.local = local  # ip -> (namespace, pod name) of this node's endpoints
        self.pod_of_netns: PodOfNetns = pod_of_netns or (lambda cookie: None)
        self.services = services
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

    def add_sock(self, records: list[bytes]) -> None:
        """Records of the socket load balancer's ring buffer (a connect() translated or refused): kept with the
        flows, told apart by their size."""
        for record in records:
            if len(record) != SOCK_EVENT_SIZE:
                continue
            self.flows.append((self.next, record))
            self.next += 1
            event = SockEvent.decode(record)
            summary = PROTOCOLS.get(event.protocol, f"protocol {event.protocol}")
            if event.verdict == SOCK_NO_BACKEND:
                self.processed.labels(summary, "Drop", "", "DROPPED").inc()
                self.drops.labels(DROP_REASONS.get(DROP_NO_SERVICE, ("", "NO_SERVICE"))[1], summary).inc()
            else:
                self.processed.labels(summary, "SOCK", "post-xlate-fwd", "TRANSLATED").inc()
        if records:
            self.changed.set()

    def identity_of(self, ip: str) -> int:
        entry = self.view.ipcache(ip)
        return int(entry.ID) if entry is not None else 0

    def _decode(self, record: bytes) -> dict[str, Any]:
        if len(record) == SOCK_EVENT_SIZE:
            return to_sock_flow(SockEvent.decode(record), self.node, self.describe, self.identity_of,
                                self.pod_of_netns, self.services)  # fmt: skip
        return to_flow(FlowEvent.decode(record), self.node, self.describe)

    def since(self, after: int, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        found = [(number, record) for number, record in self.flows if number > after]
        if limit:
            found = found[-limit:]
        return [(number, self._decode(record)) for number, record in found]

    async def wait(self, after: int, timeout: float) -> None:
        """Until a flow numbered after `after` exists, or `timeout` seconds passed."""
        try:
            async with asyncio.timeout(timeout):
                while self.next - 1 <= after:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass
