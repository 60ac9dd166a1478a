"""Flows: a datapath event named by both sides' labels in Hubble's shape, the one-line form, and the filters of
`clustermesh observe`."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from agent.flows import FlowLog
from agent.view import MergedView
from bpf.maps import INGRESS, VERDICT_DROPPED, VERDICT_FORWARDED, FlowEvent
from clustermesh.cli.policy import matches
from clustermesh.model import keys, wire
from clustermesh.model.admission import IdentityEntry
from clustermesh.model.flows import compact
from clustermesh.model.labels import parse_label_string

SERVER_ID, CLIENT_ID = 65537, 131073
NO_FILTERS = dict.fromkeys(("from_label", "to_label"), ()) | dict.fromkeys(
    ("from_namespace", "to_namespace", "from_cluster", "to_cluster", "verdict", "port", "protocol")
)


def identity(number: int, app: str, cluster: str) -> IdentityEntry:
    text = f"k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=shop;"
    return IdentityEntry(number, tuple(parse_label_string(text)), text)


def flow_log() -> tuple[FlowLog, CollectorRegistry]:
    view = MergedView("c1")
    view.upsert("c1", "identity", keys.identity_key(SERVER_ID), identity(SERVER_ID, "server", "c1"))
    view.upsert("c2", "identity", keys.identity_key(CLIENT_ID), identity(CLIENT_ID, "client", "c2"))
    pair = wire.make_ip_pair(ip="10.2.1.10", host_ip="192.168.2.11", identity=CLIENT_ID, namespace="shop",
                             pod_name="client-1")  # fmt: skip
    view.upsert("c2", "ipcache", keys.ip_key("10.2.1.10"), pair)
    registry = CollectorRegistry()
    local = {"10.1.1.10": ("shop", "server-1")}
    return FlowLog(view, "c1/node-1", local=local.get, registry=registry), registry


def event(verdict: int, reason: int = 0, dport: int = 8080) -> bytes:
    """A record as the ring buffer holds it."""
    return FlowEvent(1_000, CLIENT_ID, SERVER_ID, "10.2.1.10", "10.1.1.10", 40000, dport, 6, verdict, reason,
                     INGRESS, 12, False).encode()  # fmt: skip


def test_a_drop_names_both_sides_and_the_reason_as_hubble_does() -> None:
    log, registry = flow_log()
    log.add([event(VERDICT_DROPPED, 133)])
    [(number, document)] = log.since(0)
    flow = document["flow"]
    assert number == 1
    assert flow["verdict"] == "DROPPED" and flow["drop_reason"] == 133 and flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["source"]["pod_name"] == "client-1" and flow["source"]["cluster_name"] == "c2"
    assert "k8s:app=client" in flow["source"]["labels"]
    assert flow["destination"]["pod_name"] == "server-1" and flow["destination"]["namespace"] == "shop"
    assert flow["l4"] == {"TCP": {"source_port": 40000, "destination_port": 8080}}
    assert flow["traffic_direction"] == "INGRESS" and flow["event_type"] == {"type": 1, "sub_type": 133}
    line = compact(document)
    assert "shop/client-1:40000 (k8s:app=client, c2) -> shop/server-1:8080 (k8s:app=server, c1)" in line
    assert line.endswith("DROPPED Policy denied")
    assert registry.get_sample_value("hubble_drop_total", {"reason": "POLICY_DENIED", "protocol": "TCP"}) == 1


def test_readers_ask_for_what_came_after_the_last_flow_they_saw() -> None:
    log, _ = flow_log()
    log.add([event(VERDICT_FORWARDED), event(VERDICT_DROPPED, 181)])
    assert [number for number, _ in log.since(1)] == [2]
    assert log.since(2) == []

    async def waiting() -> list[int]:
        waiter = asyncio.create_task(log.wait(2, timeout=5))
        await asyncio.sleep(0)
        log.add([event(VERDICT_FORWARDED)])
        await waiter
        return [number for number, _ in log.since(2)]

    assert asyncio.run(waiting()) == [3]


def test_observe_filters_as_hubble_observe_does() -> None:
    log, _ = flow_log()
    log.add([event(VERDICT_DROPPED, 133), event(VERDICT_FORWARDED, dport=80)])
    dropped, forwarded = (document for _, document in log.since(0))
    assert matches(dropped, NO_FILTERS)
    assert matches(dropped, NO_FILTERS | {"verdict": "DROPPED", "from_cluster": "c*", "to_label": ("app=server",)})
    assert not matches(forwarded, NO_FILTERS | {"verdict": "DROPPED"})
    assert matches(forwarded, NO_FILTERS | {"port": 80, "protocol": "TCP"})
    assert not matches(forwarded, NO_FILTERS | {"protocol": "udp"})
    assert not matches(dropped, NO_FILTERS | {"from_label": ("app=server",)})
    assert not matches(dropped, NO_FILTERS | {"to_namespace": "other"})
