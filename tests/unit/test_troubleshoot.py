"""The diagnosis on statuses as the agent answers them: every problem code the agent has is placed on a hop, a
missing tunnel peer fails its hop, a problem no hop explains is still said."""

from __future__ import annotations

from clustermesh.model.api import AgentStatus, ClusterStatus, DatapathStatus, Problem
from clustermesh.troubleshoot import FIXES, HOPS, diagnose


def status(cluster: ClusterStatus, datapath: DatapathStatus | None = None) -> AgentStatus:
    local = ClusterStatus(name="c1", local=True, ready=True)
    return AgentStatus(cluster="c1", cluster_id=1, node="n1", ready=cluster.ready, not_ready=[],
                       clusters=[local, cluster], datapath=datapath)  # fmt: skip


def test_every_code_of_the_agent_is_placed_on_a_hop_with_a_fix() -> None:
    assert {hop for hop, _ in FIXES.values()} <= set(HOPS)
    for code, (hop, fix) in FIXES.items():
        c2 = ClusterStatus(name="c2", ready=False, problems=[Problem(code, f"the words of {code}")])
        hops = diagnose(status(c2), c2)
        [failed] = [h for h in hops if h.state == "failed"]
        assert (failed.name, failed.fix) == (hop, fix) and f"the words of {code}" in failed.evidence


def test_a_node_of_the_cluster_without_a_tunnel_peer_fails_that_hop() -> None:
    health = {"total": 1, "reachable": 1, "unreachable": [], "probing": [], "latency_ms": None,
              "nodes": [{"name": "c2/n1", "state": "reachable"}]}  # fmt: skip
    c2 = ClusterStatus(name="c2", ready=True, health=health)
    hops = diagnose(status(c2, DatapathStatus(driver="wireguard", peers=[], last_error="wg: no such device")), c2)
    tunnel = next(h for h in hops if h.name == "tunnel peer")
    assert tunnel.state == "failed" and "c2/n1" in tunnel.evidence and "no such device" in tunnel.evidence
    assert next(h for h in hops if h.name == "data path").state == "not reached"


def test_a_problem_no_hop_explains_is_still_said() -> None:
    c2 = ClusterStatus(name="c2", ready=False, problems=[Problem("something-new", "a new kind of trouble")])
    hops = diagnose(status(c2), c2)
    assert hops[-1].name == "other" and hops[-1].state == "failed" and "something-new" in hops[-1].evidence
