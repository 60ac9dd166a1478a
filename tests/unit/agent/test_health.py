"""The health prober's verdicts, from the probes' outcomes: probing, reachable, failing, unreachable after the
threshold; a cluster's summary with its latency; nodes that leave the view leave the prober."""

from __future__ import annotations

import pytest

from agent import health
from agent.health import HealthProber, NodeHealth
from agent.view import MergedView
from clustermesh.model import wire
from clustermesh.model.kinds import kind_by_name

NODES = kind_by_name("CiliumNode")


def node(cluster: str, name: str, cidr: str) -> wire.Node:
    return wire.Node(
        Name=name, Cluster=cluster, IPv4AllocCIDR=cidr, IPAddresses=[wire.Address("InternalIP", "192.168.2.11")]
    )


def test_a_node_is_unreachable_only_after_the_threshold_and_reachable_again_after_one_answer() -> None:
    probed = NodeHealth("c2/n1", "c2", "10.2.1.1")
    assert probed.describe(2)["state"] == "probing"
    probed.rounds, probed.failures = 1, 1
    assert probed.describe(2)["state"] == "failing"
    probed.rounds, probed.failures = 2, 2
    assert probed.describe(2)["state"] == "unreachable"
    probed.rounds, probed.failures, probed.icmp_ms = 3, 0, 0.4
    assert probed.describe(2)["state"] == "reachable"


async def test_probes_follow_the_view_and_summarise_each_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    view = MergedView("c1")
    answers = {"10.2.1.1": 0.5, "10.2.2.1": None}  # None: no answer

    async def echo(source: str, target: str, timeout: float, ident: int, sequence: int) -> float:
        assert source == "10.1.1.1", "from this node's router address, so the pods' path is taken"
        if answers[target] is None:
            raise TimeoutError
        return answers[target]

    async def connect(source: str, target: str, port: int, timeout: float) -> float:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(health, "icmp_echo", echo)
    monkeypatch.setattr(health, "tcp_connect", connect)
    prober = HealthProber(view, "c1/n1", "10.1.1.1", threshold=2)
    for key, value in (("c1/n1", node("c1", "n1", "10.1.1.0/24")), ("c2/n1", node("c2", "n1", "10.2.1.0/24")),
                       ("c2/n2", node("c2", "n2", "10.2.2.0/24"))):  # fmt: skip
        view._upsert_node(value.Cluster, key, value)
    await prober.probe_once()
    summary = prober.cluster("c2")
    assert (summary["total"], summary["reachable"], summary["unreachable"]) == (2, 1, []), "one failure: failing"
    await prober.probe_once()
    summary = prober.cluster("c2")
    assert summary["unreachable"] == ["c2/n2"] and summary["latency_ms"] == {"min": 0.5, "avg": 0.5, "max": 0.5}
    assert summary["nodes"][0]["tcp_error"] == "Connection refused", "the agent's port: shown, not judged"
    assert prober.cluster("c1")["total"] == 0, "this node does not probe itself"
    view._delete_node("c2", "c2/n2", node("c2", "n2", "10.2.2.0/24"))
    await prober.probe_once()
    assert prober.cluster("c2")["unreachable"] == [], "a node gone from the view is no longer probed"


def test_a_subscription_of_some_kinds_is_handed_those_only() -> None:
    view = MergedView("c1")
    nodes_only, everything = view.subscribe(kinds=["node"]), view.subscribe()
    view._upsert_ipcache("c2", "10.2.1.10", wire.IPIdentityPair(IP="10.2.1.10", ID=131328))
    view._upsert_node("c2", "c2/n1", node("c2", "n1", "10.2.1.0/24"))
    assert [c.kind for c in nodes_only.pending] == ["node"]
    assert [c.kind for c in everything.pending] == ["ipcache", "node"]
