"""Seeing the mesh: the browser page of `clustermesh ui` (in Debian's headless Chromium, driven by Selenium; a
screenshot kept in test-artifacts/ui-map.png), the relay (every node's flows, of every connected cluster, merged,
over mutual TLS; nodes it cannot read named) and the metrics of every process (scraped from inside the lab, parsed
with Prometheus' own text parser; the Grafana dashboard names only metrics they export).

One lab of 2 clusters x 1 node (vxlan), a relay per cluster in its control plane's namespace (as `lab up` starts
them). Flows come from a ping across the clusters, seen by both nodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import certs
from clustermesh.daemon.tls import hubble_server_name
from clustermesh.lab import netns
from tests.e2e.labtools import CLI, PYTHON, LabHandle, clustermesh, describe, in_netns, lab_owned, stop, wait_until
from tests.e2e.policytools import PolicyLab

LAB = "e2erly"

#: A TLS client of a node's flow service run from the c1 control plane's namespace: prints the status line or the error.
ASK = """
import socket, ssl, sys
host, name, ca, cert, key = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
if cert != "-":
    context.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, 4244), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"GET /v1/flows?since=0 HTTP/1.1\\r\\nContent-Length: 0\\r\\n\\r\\n")
            data = tls.recv(200)
            print(data.split(b"\\r\\n")[0].decode() if data else "closed without an answer")
except (OSError, ssl.SSLError) as exc:
    print(f"refused: {exc}")
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with lab_owned(LAB, routing="vxlan", clusters=2, nodes=1, pods=1) as handle:
        ping = in_netns(f"{LAB}-c1-pod-1-1", "ping", "-c", "2", "-W", "1", handle.pod_ip("c2/pod-1-1"))
        assert ping.returncode == 0, describe(ping)
        yield handle


def observe(*args: str) -> tuple[list[dict[str, Any]], str]:
    result = clustermesh("observe", "--lab", LAB, "-o", "json", "--last", "100", *args, timeout=60)
    assert result.returncode == 0, describe(result)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()], result.stderr


def nodes_seen(flows: list[dict[str, Any]]) -> set[str]:
    return {flow["node_name"] for flow in flows}


def test_one_relay_gives_the_flows_of_every_node_of_every_cluster_in_time_order(lab: LabHandle) -> None:
    for cluster in ("c1", "c2"):
        found: list[dict[str, Any]] = []

        def both(cluster: str = cluster, found: list[dict[str, Any]] = found) -> tuple[bool, object]:
            found[:] = observe("--cluster", cluster)[0]
            return nodes_seen(found) == {"c1/c1-node-1", "c2/c2-node-1"}, nodes_seen(found)

        wait_until(f"the relay of {cluster} gives both nodes' flows", both, timeout=30)
        times = [flow["time"] for flow in found]
        assert times == sorted(times), "merged in time order"
        icmp = [f for f in found if "ICMPv4" in f["flow"].get("l4", {})]
        assert {f["flow"]["traffic_direction"] for f in icmp} == {"EGRESS", "INGRESS"}, (
            "seen leaving c1 and entering c2"
        )


def test_filters_by_node_and_time_window(lab: LabHandle) -> None:
    flows, _ = observe("--node", "c2/*")
    assert flows and nodes_seen(flows) == {"c2/c2-node-1"}
    assert observe("--since", "2000-01-01T00:00:00Z")[0], "every flow is after 2000"
    assert observe("--until", "2000-01-01T00:00:00Z")[0] == [], "no flow before 2000"
    assert observe("--since", "1h")[0], "a duration before now"
    bad = clustermesh("observe", "--lab", LAB, "--since", "yesterday")
    assert bad.returncode == 2 and "neither a time" in bad.stderr, describe(bad)


def _ask(lab: LabHandle, cert: str, key: str, ca: Path) -> str:
    node = lab.node("c2-node-1")
    name = hubble_server_name("c2", node.name)
    result = in_netns(f"{LAB}-c1-cp", PYTHON, "-c", ASK, node.ip, name, str(ca), cert, key)
    assert result.returncode == 0, describe(result)
    return result.stdout.strip()


def test_a_node_s_flow_service_answers_only_clients_of_the_mesh_ca(lab: LabHandle, tmp_path: Path) -> None:
    ca = Path(f"/run/clustermesh-lab/{LAB}/c1/pki/ca.crt")
    relay = Path(f"/run/clustermesh-lab/{LAB}/c1/relay-certs")
    assert _ask(lab, str(relay / "client.crt"), str(relay / "client.key"), ca) == "HTTP/1.1 200 OK"
    assert _ask(lab, "-", "-", ca) != "HTTP/1.1 200 OK", "no client certificate: refused"
    stranger_ca = certs.create_ca("stranger")
    stranger = certs.CertPaths.in_dir(tmp_path, "stranger")
    certs.write_issued(certs.issue_client(stranger_ca, "hubble-relay"), stranger)
    assert _ask(lab, str(stranger.cert), str(stranger.key), ca) != "HTTP/1.1 200 OK", "another CA's client: refused"


def test_a_node_that_cannot_be_read_is_named_then_read_again(lab: LabHandle) -> None:
    [agent] = [pid for pid in netns.processes_in([f"{LAB}-c2-n1"]) if b"clustermesh-agent" in
               Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
    os.kill(agent, signal.SIGSTOP)  # it answers nothing, as a node behind a broken link
    try:

        def named() -> tuple[bool, object]:
            flows, stderr = observe()
            return "flows not read from c2/c2-node-1" in stderr and "c1/c1-node-1" in nodes_seen(flows), stderr

        wait_until("the relay names the node it cannot read", named, timeout=40, every=2)
    finally:
        os.kill(agent, signal.SIGCONT)

    def back() -> tuple[bool, object]:
        _, stderr = observe()
        return "c2/c2-node-1" not in stderr, stderr

    wait_until("the node is read again", back, timeout=40, every=1)


# --- metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "clustermesh.json"
SCRAPE = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": (), "summary": ("_count", "_sum"), "unknown": ()}  # fmt: skip


def scrape(namespace: str, address: str) -> dict[str, Metric]:
    result = in_netns(namespace, PYTHON, "-c", SCRAPE, f"http://{address}/metrics")
    assert result.returncode == 0, describe(result)
    return {family.name: family for family in text_string_to_metric_families(result.stdout)}


def value(families: dict[str, Metric], name: str, **labels: str) -> float | None:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture(scope="module")
def scraped(lab: LabHandle) -> dict[str, dict[str, Metric]]:
    node = lab.node("c1-node-1")
    found = {"agent": scrape(node.netns, f"{node.ip}:9962")}
    found["apiserver"] = scrape(f"{LAB}-c1-cp", "192.168.1.2:9962")
    found["relay"] = scrape(f"{LAB}-c1-cp", "192.168.1.2:9966")
    return found


def test_the_agent_exports_cilium_s_clustermesh_and_datapath_metrics(lab: LabHandle) -> None:
    node = lab.node("c1-node-1")

    def ready() -> tuple[bool, object]:
        agent = scrape(node.netns, f"{node.ip}:9962")
        seen = value(agent, "cilium_clustermesh_remote_cluster_readiness_status", target_cluster="c2")
        return seen == 1.0, seen

    wait_until("c1's agent reports c2 ready", ready)
    agent = scrape(node.netns, f"{node.ip}:9962")
    labels = {"source_cluster": "c1", "source_node_name": "c1-node-1"}
    assert value(agent, "cilium_clustermesh_remote_clusters", **labels) == 1.0
    assert value(agent, "cilium_clustermesh_remote_cluster_nodes", target_cluster="c2") == 1.0
    assert (value(agent, "cilium_clustermesh_remote_cluster_endpoints", target_cluster="c2") or 0) >= 1
    assert value(agent, "cilium_clustermesh_remote_cluster_failures", target_cluster="c2") == 0.0
    assert value(agent, "cilium_kvstore_initial_sync_completed", scope="nodes", source_cluster="c2",
                 action="read") == 1.0  # fmt: skip
    assert (value(agent, "cilium_forward_count_total", direction="EGRESS") or 0) > 0, "the ping left c1's pod"
    assert (value(agent, "hubble_flows_processed_total", verdict="FORWARDED", protocol="ICMPv4") or 0) > 0


def test_the_apiserver_and_the_relay_export_theirs(lab: LabHandle, scraped: dict[str, dict[str, Metric]]) -> None:
    apiserver = scraped["apiserver"]
    assert value(apiserver, "cilium_clustermesh_apiserver_kvstore_initial_sync_completed", scope="nodes",
                 source_cluster="c1", action="write") == 1.0  # fmt: skip
    assert value(apiserver, "cilium_clustermesh_apiserver_kvstore_sync_queue_size", scope="nodes",
                 source_cluster="c1") == 0.0  # fmt: skip

    def both_connected() -> tuple[bool, object]:
        relay = scrape(f"{LAB}-c1-cp", "192.168.1.2:9966")
        seen = value(relay, "hubble_relay_pool_peer_connection_status", status="connected")
        return seen == 2.0, seen

    wait_until("c1's relay reads both nodes", both_connected)
    relay = scrape(f"{LAB}-c1-cp", "192.168.1.2:9966")
    assert (value(relay, "clustermesh_relay_flows_received_total", cluster="c2") or 0) > 0


def test_every_query_of_the_grafana_dashboard_names_a_metric_the_project_exports(
    scraped: dict[str, dict[str, Metric]],
) -> None:
    exported = set()
    for families in scraped.values():
        for family in families.values():
            exported |= {family.name, *(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))}
            exported |= {sample.name for sample in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) >= 15
    for query in queries:
        names = set(re.findall(r"\b((?:cilium|hubble|clustermesh)_[a-z0-9_]+)\b", query))
        assert names, f"no metric in {query!r}"
        assert names <= exported, f"{query!r} names {sorted(names - exported)}, which nothing exports"


# --- the page, in a real browser

ARTIFACTS = Path(os.environ.get("CLUSTERMESH_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
#: c2's pods take ingress from `app=nobody` only: c1's ping is dropped at c2's node (POLICY_DENIED)
DENY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: only-nobody, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: lab}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def ui_url(lab: LabHandle) -> Iterator[str]:
    process = subprocess.Popen([str(CLI), "ui", "--lab", LAB, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("clustermesh ui: http://127.0.0.1:"), line
        yield line.split()[2]
    finally:
        stop(process)


def test_the_page_shows_the_clusters_a_flow_and_a_drop_within_seconds_and_its_filter_narrows_the_table(
    lab: LabHandle, ui_url: str, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    PolicyLab.of(lab).apply("c2", DENY)
    target = lab.pod_ip("c2/pod-1-1")

    def dropped() -> tuple[bool, object]:
        ping = in_netns(f"{LAB}-c1-pod-1-1", "ping", "-c", "1", "-W", "1", target)
        return ping.returncode != 0, ping.stdout

    wait_until("c1's ping to c2's pod is dropped by the policy", dropped, timeout=20)
    browser.get(ui_url)
    started = time.monotonic()
    wait = WebDriverWait(browser, 15)
    wait.until(lambda d: {e.get_attribute("data-cluster") for e in d.find_elements(By.CSS_SELECTOR, ".cluster")}
               == {"c1", "c2"})  # fmt: skip
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "path.edge.dropped"))
    shown = time.monotonic() - started
    cards = {e.get_attribute("data-cluster"): e.text for e in browser.find_elements(By.CSS_SELECTOR, ".cluster")}
    assert "c2: connected" in cards["c1"] and "ready" in cards["c1"], cards
    edge = browser.find_element(By.CSS_SELECTOR, "path.edge.dropped").get_attribute("data-edge")
    assert edge == "c1/default/app=lab -> c2/default/app=lab", edge
    assert "Policy denied" in browser.find_element(By.ID, "graph").text or "POLICY_DENIED" in browser.find_element(
        By.ID, "graph").text  # fmt: skip
    rows = browser.find_elements(By.CSS_SELECTOR, "#flows tbody tr")
    assert any("FORWARDED" in r.text for r in rows) and any("DROPPED" in r.text for r in rows)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-map.png"))
    print(f"screenshot: {ARTIFACTS / 'ui-map.png'} (the map and flows {shown:.1f} s after the page was opened)")

    browser.find_element(By.ID, "filter").send_keys("POLICY_DENIED")

    def only_drops(driver: Any) -> bool:
        found = driver.find_elements(By.CSS_SELECTOR, "#flows tbody tr")
        return bool(found) and all(r.get_attribute("class") == "DROPPED" for r in found)

    wait.until(only_drops)
    narrowed = browser.find_elements(By.CSS_SELECTOR, "#flows tbody tr")
    assert 0 < len(narrowed) < len(rows), (len(narrowed), len(rows))
    assert "of" in browser.find_element(By.ID, "count").text


# --- status that tests the data path


def agent_status(lab: LabHandle) -> tuple[int, dict[str, Any]]:
    socket = f"/run/clustermesh-lab/{LAB}/c1-node-1/agent.sock"
    result = clustermesh("status", "--socket", socket, "-o", "json", timeout=30)
    assert result.returncode in (0, 1), describe(result)
    return result.returncode, json.loads(result.stdout)


def test_status_probes_every_node_and_a_cluster_whose_nodes_cannot_be_reached_is_not_ready(lab: LabHandle) -> None:
    def reached() -> tuple[bool, object]:
        code, document = agent_status(lab)
        health = document["connectivity"]["datapath"].get("c2") or {}
        return code == 0 and health.get("reachable") == 1 and health.get("latency_ms") is not None, health

    wait_until("c1-node-1 reaches c2's node through the data path", reached)
    _, document = agent_status(lab)
    connectivity = document["connectivity"]
    assert connectivity["clusters"] == {"c2": {"total": 1, "ready": 1}} and connectivity["not_ready"] == 0
    assert connectivity["connected"] == {"min": 1, "avg": 1.0, "max": 1}
    [node] = connectivity["datapath"]["c2"]["nodes"]
    assert node["name"] == "c2/c2-node-1" and node["state"] == "reachable" and node["tcp_ms"] is not None, node
    # c2's node drops the tunnel's packets: etcd and the control plane are untouched, the data path is not
    block = ["nft", "add", "table", "inet", "e2eblock", ";", "add", "chain", "inet", "e2eblock", "input",
             "{ type filter hook input priority -10 ; }", ";", "add", "rule", "inet", "e2eblock", "input",
             "udp", "dport", "8472", "drop"]  # fmt: skip
    result = in_netns(f"{LAB}-c2-n1", "nft", " ".join(block[1:]))
    assert result.returncode == 0, describe(result)
    try:

        def unreachable() -> tuple[bool, object]:
            code, document = agent_status(lab)
            c2 = next(c for c in document["clusters"] if c["name"] == "c2")
            codes = [problem["code"] for problem in c2["problems"]]
            return code == 1 and c2["connected"] and "datapath-unreachable" in codes, c2

        wait_until("c2 is not ready from c1 while its node cannot be reached", unreachable, timeout=20)
        _, document = agent_status(lab)
        assert document["connectivity"]["not_ready"] == 1
        assert "c2" in document["connectivity"]["errors"]["c1-node-1"]
        assert any(p["code"] == "datapath-unreachable" for p in document["problems"])
        socket = f"/run/clustermesh-lab/{LAB}/c1-node-1/agent.sock"
        result = clustermesh("troubleshoot", "c2", "--socket", socket, "-o", "json")
        assert result.returncode == 1, describe(result)
        hops = {hop["name"]: hop for hop in json.loads(result.stdout)["clusters"]["c2"]}
        assert hops["data path"]["state"] == "failed" and "c2/c2-node-1" in hops["data path"]["evidence"], hops
        assert hops["tunnel peer"]["state"] == "ok" and hops["heartbeat"]["state"] == "ok", hops
        text = clustermesh("troubleshoot", "--socket", socket)
        assert "data path" in text.stdout and "FAILED" in text.stdout and "fix:" in text.stdout, describe(text)
    finally:
        in_netns(f"{LAB}-c2-n1", "nft", "delete", "table", "inet", "e2eblock")
    wait_until("c2 is ready again once its node is reached", reached, timeout=20)


# --- certificates rotated under a running relay

SERIAL = """
import socket, ssl, sys
host, name, ca, cert, key = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
context.load_cert_chain(cert, key)
with socket.create_connection((host, 4244), timeout=5) as raw, context.wrap_socket(raw, server_hostname=name) as tls:
    print(tls.getpeercert()["serialNumber"])
"""


def test_rotated_flow_service_and_relay_certificates_are_taken_up_without_a_restart(lab: LabHandle) -> None:
    state = Path(f"/run/clustermesh-lab/{LAB}")
    node = lab.node("c2-node-1")
    ca_file = state / "c1" / "pki" / "ca.crt"
    relay_cert = certs.CertPaths.in_dir(state / "c1" / "relay-certs", "client")
    server_cert = certs.CertPaths.in_dir(state / node.name / "hubble-certs", "server")
    name = hubble_server_name("c2", node.name)

    def presented() -> str:
        result = in_netns(f"{LAB}-c1-cp", PYTHON, "-c", SERIAL, node.ip, name, str(ca_file), str(relay_cert.cert),
                          str(relay_cert.key))  # fmt: skip
        assert result.returncode == 0, describe(result)
        return result.stdout.strip()

    before = presented()
    processes = {pid: Path(f"/proc/{pid}/stat").read_text().split()[21]
                 for pid in netns.processes_in([f"{LAB}-c1-cp", node.netns])}  # fmt: skip
    ca = certs.load_issued(certs.CertPaths(ca_file, state / "c1" / "pki" / "ca.key"))
    certs.write_issued(certs.issue_server(ca, f"hubble-{node.name}", hosts=[name, node.ip]), server_cert)
    certs.write_issued(certs.issue_client(ca, "hubble-relay"), relay_cert)

    def rotated() -> tuple[bool, object]:
        now = presented()
        return now != before, now

    wait_until("c2's flow service presents its new certificate", rotated, timeout=15)
    ping = in_netns(f"{LAB}-c2-pod-1-1", "ping", "-c", "1", "-W", "1", lab.pod_ip("c1/pod-1-1"))
    assert ping.returncode == 0, describe(ping)

    def read_again() -> tuple[bool, object]:
        flows, stderr = observe("--node", "c2/*", "--since", "20s")
        return any(f["flow"]["IP"]["source"] == lab.pod_ip("c2/pod-1-1") for f in flows) and not stderr, stderr

    wait_until("the relay reads c2's node with the new certificates on both sides", read_again, timeout=20)
    after = {pid: Path(f"/proc/{pid}/stat").read_text().split()[21]
             for pid in netns.processes_in([f"{LAB}-c1-cp", node.netns])}  # fmt: skip
    assert after == processes, "no process restarted"
