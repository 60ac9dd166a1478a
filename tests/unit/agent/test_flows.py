"""Flows: a datapath event named by both sides' labels in Hubble's shape, the one-line form, and the filters of
`clustermesh observe`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from agent.flows import FlowLog
from agent.view import MergedView
from bpf.lbmaps import SOCK_NO_BACKEND, SOCK_TRANSLATED, SockEvent
from bpf.maps import INGRESS, VERDICT_DROPPED, VERDICT_FORWARDED, FlowEvent
from clustermesh.cli import cli
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


# --- a Service's translations (the socket load balancer's events)


class Names:
    """What the load balancer answers: reverse-NAT 7 is shop/server; cluster 2 is c2."""

    def service_of(self, rev_nat: int) -> str | None:
        return {7: "shop/server"}.get(rev_nat)

    def cluster_name(self, cluster_id: int) -> str | None:
        return {1: "c1", 2: "c2"}.get(cluster_id)


def sock_log() -> FlowLog:
    log, _ = flow_log()
    pods = {4242: ("10.1.1.10", SERVER_ID)}  # the client pod here is the node's own pod (netns cookie 4242)
    return FlowLog(log.view, "c1/node-1", local={"10.1.1.10": ("shop", "server-1")}.get, registry=CollectorRegistry(),
                   pod_of_netns=pods.get, services=Names())  # fmt: skip


def sock_event(verdict: int = SOCK_TRANSLATED, netns: int = 4242) -> bytes:
    backend = "10.2.1.10" if verdict == SOCK_TRANSLATED else "0.0.0.0"
    return SockEvent(2_000, 99, netns, "10.96.1.20", backend, 80, 8080 if verdict == SOCK_TRANSLATED else 0,
                     5, 7, 2 if verdict == SOCK_TRANSLATED else 0, 6, verdict).encode()  # fmt: skip


def test_a_connect_to_a_service_names_the_frontend_the_backend_and_its_cluster() -> None:
    log = sock_log()
    log.add_sock([sock_event()])
    [(_, document)] = log.since(0)
    flow = document["flow"]
    assert flow["Type"] == "SOCK" and flow["verdict"] == "TRANSLATED"
    assert flow["event_type"] == {"type": 7, "sub_type": 2}
    assert flow["sock_xlation_point"] == "SOCK_XLATION_POINT_POST_DIRECTION_FWD"
    assert flow["destination_service"] == {"name": "server", "namespace": "shop"}
    assert flow["service"] == {"frontend": "10.96.1.20:80", "name": "shop/server", "backend": "10.2.1.10:8080",
                               "backend_cluster": "c2"}  # fmt: skip
    assert flow["source"]["pod_name"] == "server-1" and flow["IP"]["source"] == "10.1.1.10"
    assert flow["destination"]["pod_name"] == "client-1" and flow["destination"]["cluster_name"] == "c2"
    assert flow["l4"] == {"TCP": {"destination_port": 8080}}
    line = compact(document)
    assert "shop/server (10.96.1.20:80) => shop/client-1:8080" in line and "in c2" in line, line
    assert "post-xlate-fwd TRANSLATED" in line


def test_a_connect_refused_for_want_of_a_backend_is_a_drop_naming_the_service() -> None:
    log = sock_log()
    log.add_sock([sock_event(SOCK_NO_BACKEND)])
    [(_, document)] = log.since(0)
    flow = document["flow"]
    assert flow["verdict"] == "DROPPED" and flow["drop_reason"] == 158 and flow["drop_reason_desc"] == "NO_SERVICE"
    assert flow["service"] == {"frontend": "10.96.1.20:80", "name": "shop/server"}
    assert "backend" not in flow["service"]


def test_a_connect_from_a_namespace_the_agent_does_not_know_is_kept_without_a_source() -> None:
    log = sock_log()
    log.add_sock([sock_event(netns=1), b"short"])
    [(_, document)] = log.since(0)
    assert document["flow"]["source"] == {"identity": 0} and document["flow"]["IP"]["source"] == ""


def test_observe_picks_flows_by_service_and_type() -> None:
    log = sock_log()
    log.add_sock([sock_event()])
    log.add([event(VERDICT_FORWARDED)])
    documents = [document for _, document in log.since(0)]
    by = lambda **f: [d["flow"]["Type"] for d in documents if matches(d, NO_FILTERS | f)]  # noqa: E731
    assert by(service="shop/server") == ["SOCK"]
    assert by(service="server") == ["SOCK"]
    assert by(service="other/server") == []
    assert by(flow_type="trace-sock") == ["SOCK"]
    assert by(flow_type="policy-verdict") == ["L3_L4"]
    assert by(verdict="TRANSLATED") == ["SOCK"]


def test_observe_context_reads_the_relay_the_context_names(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    base = ["--config", str(config)]
    add = ["context", "add", "--endpoints", "https://127.0.0.1:2379", "--ca", "ca", "--cert", "c", "--key", "k"]
    assert CliRunner().invoke(cli, [*base, *add, "c1", "--relay", str(tmp_path / "relay.sock")]).exit_code == 0
    assert CliRunner().invoke(cli, [*base, *add, "c2"]).exit_code == 0
    result = CliRunner().invoke(cli, [*base, "observe", "--context", "c1"])
    assert result.exit_code != 0 and "relay.sock" in result.output, result.output  # read, and nothing listens
    result = CliRunner().invoke(cli, [*base, "observe", "--context", "c2"])
    assert result.exit_code == 1 and "names no relay" in result.output, result.output
    result = CliRunner().invoke(cli, [*base, "--context", "c2", "observe"])
    assert "names no relay" in result.output, "the root's --context counts too"
