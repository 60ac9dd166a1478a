"""Global services load-balanced in eBPF across three clusters: a lab of 3 clusters (1 node each, vxlan), a backend
pod `web-cN` in each (TCP 80 answers its name, UDP 80 echoes it), a client pod in each, and the Service `shop/web`
made in each cluster with `clustermesh lab service add ... --global`. Connections go through the socket load
balancer (the client runs in its pod's cgroup, as `lab exec` runs it) unless a test says per packet.

Covered: reachable by ClusterIP and by name from every cluster, spread over every cluster's backends; `shared:
false`; each affinity; local backends made not ready and back; a backend pod deleted; UDP through the service; a
service that is not global; the per-packet path for TCP and UDP; policy checked against the backend's identity; a
cluster's etcd stopped (its backends kept until the cache TTL, then drained). The agents run with
`--clustermesh-cache-ttl 6` so that the last one does not wait 15 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from clustermesh.lab import netns
from tests.e2e.labtools import PYTHON, LabHandle, clustermesh, describe, lab_owned, wait_until
from tests.e2e.policytools import PolicyLab

CLUSTERS = ("c1", "c2", "c3")
SERVER = """
import socket, sys, threading
name = sys.argv[1]
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 80)); s.listen(256)
    while True:
        c, _ = s.accept(); c.sendall(name.encode()); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 80))
    while True:
        data, peer = s.recvfrom(100); s.sendto(name.encode(), peer)
threading.Thread(target=tcp, daemon=True).start(); threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""
CLIENT = """
import json, socket, sys
target, count, protocol = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen, peers = {}, set()
for _ in range(count):
    try:
        if protocol == "tcp":
            s = socket.create_connection((target, 80), timeout=1.5)
            answer = s.recv(100).decode(); peers.add(s.getpeername()[0]); s.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
            s.sendto(b"?", (target, 80)); data, sender = s.recvfrom(100); answer = data.decode()
            peers.add(sender[0]); s.close()
    except OSError as exc:
        answer = f"error {exc.errno}"
    seen[answer] = seen.get(answer, 0) + 1
print(json.dumps({"seen": seen, "peers": sorted(peers)}))
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[PolicyLab]:
    """Name: mesh. Scope: module. The three-cluster lab with its backends, clients and the global Service."""
    with lab_owned("e2elb", routing="vxlan", clusters=3, nodes=1, pods=1,
                   agent_args=("--clustermesh-cache-ttl=6",)) as handle:  # fmt: skip
        lab = PolicyLab.of(handle)
        for cluster in CLUSTERS:
            lab.apply(cluster, "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        for cluster in CLUSTERS:
            for name, app in ((f"web-{cluster}", "web"), ("client", "client")):
                lab.add_pod(f"{cluster}/shop/{name}", {"app": app})
            serve(handle, f"{cluster}/shop/web-{cluster}")
            add_service(handle, cluster, "web", "--global")
        yield lab


def serve(lab: LabHandle, pod: str) -> None:
    name = pod.rsplit("/", 1)[1]
    log = f"/tmp/clustermesh-e2e-lb-{lab.name}-{name}.log"
    result = clustermesh("lab", "exec", lab.name, pod, "--", "sh", "-c",
                         f"exec {PYTHON} -c '{SERVER}' {name} >{log} 2>&1 &")  # fmt: skip
    assert result.returncode == 0, describe(result)
    wait_until(f"the server in {pod}", lambda: (_read(log).startswith("ready"), _read(log)), timeout=15, every=0.05)


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def add_service(lab: LabHandle, cluster: str, name: str, *flags: str, selector: str = "app=web") -> str:
    result = clustermesh("lab", "service", "add", lab.name, cluster, name, "--namespace", "shop", "--selector",
                         selector, "--port", "80", "--port", "80/udp", *flags, "-o", "json")  # fmt: skip
    assert result.returncode == 0, describe(result)
    return str(json.loads(result.stdout)["cluster_ip"])


def ask(lab: PolicyLab, cluster: str, target: str, count: int = 30, protocol: str = "tcp",
        per_packet: bool = False) -> dict[str, Any]:  # fmt: skip
    """What `count` connections (or datagrams) from the client of `cluster` to `target` got: answers by backend
    name, and the peers the client saw."""
    pod = f"{cluster}/shop/client"
    if per_packet:  # a process outside the pod's cgroup: no socket program sees it
        result = subprocess.run([*netns.nsenter(lab.netns(pod)), sys.executable, "-c", CLIENT, target, str(count),
                                 protocol], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    else:
        result = clustermesh("lab", "exec", lab.lab.name, pod, "--", PYTHON, "-c", CLIENT, target, str(count),
                             protocol, timeout=120)  # fmt: skip
    assert result.returncode == 0, describe(result)
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def backends_seen(found: dict[str, Any]) -> set[str]:
    return {answer for answer in found["seen"] if answer.startswith("web-")}


def until_backends(lab: PolicyLab, cluster: str, wanted: set[str], target: str = "web.shop.svc.cluster.local",
                   **options: Any) -> dict[str, Any]:  # fmt: skip
    """Until the client of `cluster` reaches exactly these backends (the agents apply a change within a moment)."""
    last: dict[str, Any] = {}

    def check() -> tuple[bool, object]:
        nonlocal last
        last = ask(lab, cluster, target, **options)
        return backends_seen(last) == wanted and not any(a.startswith("error") for a in last["seen"]), last

    wait_until(f"the client of {cluster} reaches {sorted(wanted)}", check, timeout=30, every=0.2)
    return last


ALL = {"web-c1", "web-c2", "web-c3"}


def test_reachable_by_name_from_every_cluster_and_spread_over_every_cluster(mesh: PolicyLab) -> None:
    for cluster in CLUSTERS:
        found = until_backends(mesh, cluster, ALL)
        assert found["peers"] == [cluster_ip(mesh, cluster)], "the client sees the ClusterIP as its peer"
    spread = Counter(ask(mesh, "c1", "web.shop.svc.clusterset.local", count=300)["seen"])
    assert set(spread) == ALL and min(spread.values()) >= 50, f"300 connections over the 3 clusters: {spread}"


def test_flows_name_the_service_its_frontend_and_the_backend_chosen_with_its_cluster(mesh: PolicyLab) -> None:
    """Each connect() the socket load balancer translates is a trace-sock flow (Hubble's `post-xlate-fwd
    TRANSLATED`), read through the relay with `--service`: the client pod, the Service, the ClusterIP, and the
    backend it went to in whichever cluster."""
    address = cluster_ip(mesh, "c1")
    frontend = f"{address}:80"
    ask(mesh, "c1", address, count=60)
    found: list[dict[str, Any]] = []

    def every_cluster() -> tuple[bool, object]:
        result = clustermesh("observe", "--lab", mesh.lab.name, "--service", "shop/web", "-t", "trace-sock",
                             "--since", "2m", "--last", "500", "-o", "json")  # fmt: skip
        assert result.returncode == 0, describe(result)
        found[:] = [json.loads(line)["flow"] for line in result.stdout.splitlines() if line.strip()]
        clusters = {flow["service"].get("backend_cluster") for flow in found if flow["service"]["frontend"] == frontend}
        return clusters == set(CLUSTERS), clusters

    wait_until("trace-sock flows of shop/web to backends in every cluster", every_cluster, timeout=30)
    for flow in (f for f in found if f["service"]["frontend"] == frontend):
        assert flow["Type"] == "SOCK" and flow["verdict"] == "TRANSLATED", flow
        assert flow["destination_service"] == {"name": "web", "namespace": "shop"}
        assert flow["source"]["pod_name"] == "client" and flow["source"]["namespace"] == "shop", flow["source"]
        cluster = flow["service"]["backend_cluster"]
        assert flow["destination"]["pod_name"] == f"web-{cluster}", flow
        assert flow["service"]["backend"] == f"{flow['IP']['destination']}:80"
    compact = clustermesh("observe", "--lab", mesh.lab.name, "--service", "web", "--since", "2m", "--last", "5")
    assert "shop/web" in compact.stdout and "post-xlate-fwd TRANSLATED" in compact.stdout, describe(compact)


def cluster_ip(lab: PolicyLab, cluster: str) -> str:
    result = clustermesh("service", "list", "--lab", lab.lab.name, "--cluster", cluster, "-o", "json")
    assert result.returncode == 0, describe(result)
    [document] = json.loads(result.stdout).values()
    return str(document["frontends"][0]["frontend"].split(":")[0])


def test_udp_through_the_service_answers_from_the_cluster_ip(mesh: PolicyLab) -> None:
    found = until_backends(mesh, "c1", ALL, protocol="udp")
    assert found["peers"] == [cluster_ip(mesh, "c1")]


def test_the_per_packet_path_balances_tcp_and_udp_too(mesh: PolicyLab) -> None:
    ip = cluster_ip(mesh, "c2")
    for protocol in ("tcp", "udp"):
        found = until_backends(mesh, "c2", ALL, target=ip, protocol=protocol, per_packet=True)
        assert found["peers"] == [ip], f"{protocol}: replies carry the ClusterIP back"


def test_each_affinity_and_failover_to_remote_backends_and_back(mesh: PolicyLab) -> None:
    try:
        add_service(mesh.lab, "c1", "web", "--global", "--affinity", "local")
        until_backends(mesh, "c1", {"web-c1"})
        clustermesh("lab", "pod", "unready", mesh.lab.name, "c1/shop/web-c1")
        until_backends(mesh, "c1", {"web-c2", "web-c3"})  # no local backend ready: the remote ones take over
        clustermesh("lab", "pod", "ready", mesh.lab.name, "c1/shop/web-c1")
        until_backends(mesh, "c1", {"web-c1"})  # and the local one takes back
        add_service(mesh.lab, "c1", "web", "--global", "--affinity", "remote")
        until_backends(mesh, "c1", {"web-c2", "web-c3"})
        add_service(mesh.lab, "c1", "web", "--global", "--affinity", "none")
        until_backends(mesh, "c1", ALL)
    finally:
        clustermesh("lab", "pod", "ready", mesh.lab.name, "c1/shop/web-c1")
        add_service(mesh.lab, "c1", "web", "--global")


def test_shared_false_keeps_a_clusters_backends_to_itself(mesh: PolicyLab) -> None:
    try:
        add_service(mesh.lab, "c2", "web", "--global", "--shared", "false")
        until_backends(mesh, "c1", {"web-c1", "web-c3"})
        until_backends(mesh, "c2", ALL)  # c2 still uses every cluster's backends
    finally:
        add_service(mesh.lab, "c2", "web", "--global")
    until_backends(mesh, "c1", ALL)


def test_a_service_that_is_not_global_stays_local(mesh: PolicyLab) -> None:
    for cluster in CLUSTERS:
        add_service(mesh.lab, cluster, "plain")
    until_backends(mesh, "c3", {"web-c3"}, target="plain.shop.svc.cluster.local")
    found = ask(mesh, "c3", "plain.shop.svc.clusterset.local", count=1)
    assert all(answer.startswith("error") for answer in found["seen"]), f"not global: no clusterset name {found}"


def test_a_deleted_backend_pod_gets_no_new_connection(mesh: PolicyLab) -> None:
    mesh.add_pod("c3/shop/web-c3b", {"app": "web"})
    serve(mesh.lab, "c3/shop/web-c3b")
    until_backends(mesh, "c1", ALL | {"web-c3b"})
    mesh.delete_pod("c3/shop/web-c3b")
    until_backends(mesh, "c1", ALL)


def test_policy_is_checked_against_the_backends_identity(mesh: PolicyLab) -> None:
    """c2's backend lets in only clients of c3: connections from c1 that the balancer sends there are dropped, with
    a drop that names the backend; the others are answered."""
    policy = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-from-c3, namespace: shop}\n"
              "spec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n"
              "  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.cluster: c3}}]\n")  # fmt: skip
    mesh.apply("c2", policy)
    try:
        found = until_backends(mesh, "c3", ALL)
        assert "web-c2" in backends_seen(found), "c3's clients are let in"

        def c1_refused_at_c2() -> tuple[bool, object]:
            seen = ask(mesh, "c1", "web", count=12)["seen"]
            return "web-c2" not in seen and any(a.startswith("error") for a in seen), seen

        wait_until("c1's connections to c2's backend are dropped", c1_refused_at_c2, timeout=30, every=0.2)
        drops = [f["flow"] for f in mesh.flows("--verdict", "DROPPED", "--to-label", "app=web")]
        assert any(d["destination"].get("cluster_name") == "c2" and d["source"].get("cluster_name") == "c1"
                   for d in drops), drops[-3:]  # fmt: skip
    finally:
        mesh.delete("c2", policy)


def test_a_stopped_clusters_backends_are_kept_until_the_cache_ttl_then_drained(mesh: PolicyLab) -> None:
    """Last: it leaves c3 without its etcd."""
    until_backends(mesh, "c1", ALL)
    os.kill(mesh.lab.etcd_pid(3), signal.SIGKILL)
    found = ask(mesh, "c1", "web", count=30)
    assert "web-c3" in found["seen"], "c3's backends still serve while the cache lives"
    until_backends(mesh, "c1", {"web-c1", "web-c2"})  # the TTL (6 s) passed: drained
