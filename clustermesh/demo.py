"""`make demo`: a real two-cluster mesh on this host, pods talking across clusters over WireGuard, then gone.

Steps, each printed with the command a user would type: `clustermesh lab up` (2 clusters x 2 nodes x 2 pods, each
node an agent with its wireguard-go tunnel, pods attached by the CNI plugin, the clusters joined with `clustermesh
connect`); `clustermesh status` of a node of each cluster; a ping and an HTTP request from a pod of cluster c1 to a
pod of cluster c2; the WireGuard peers of a node (`wg show`), with their handshakes and bytes; then network policy in
eBPF: a CiliumNetworkPolicy that lets only `app=client` pods of cluster c2 reach `app=server` in c1 on port 8080, a
client that gets through, an intruder that is refused, what the agent enforces (`clustermesh policy get`) and the drop
as `clustermesh observe` shows it, with both sides' labels, on the server's node and then through the relay from every
node of both clusters; a global service answered from both clusters, then from c1 alone once c2's backend is gone;
`clustermesh lab down` (`--keep` keeps the lab for `clustermesh ui --lab demo`, which the demo points at).
A lab left by an earlier demo that crashed is removed first; the lab is removed at the end, also on an error or
Ctrl-C. Needs root (network namespaces); `clustermesh demo --control-plane` shows the control plane without it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clustermesh import output
from clustermesh.lab import cgroups, netns
from clustermesh.lab.lab import Lab, down, require_root
from clustermesh.lab.layout import LabLayout
from clustermesh.lab.pods import add_named_pod, delete_pod, pod_command
from clustermesh.lab.services import add_service, parse_ports
from clustermesh.processes.child import Child
from clustermesh.status import fetch_status, render_status

__all__ = ["main"]

LAB = "demo"
HTTP_PORT = 8080


def _say(title: str, command: str | None = None) -> None:
    output.out.print(f"\n[bold]{title}[/]")
    if command:
        output.out.print(f"[dim]$ {command}[/]")


def _in_pod(lab: Lab, pod: str, *command: str, timeout: float = 20) -> str:
    """`command` as one of the pod's processes (its network namespace, cgroup and resolver), as `lab exec` runs it."""
    record = lab.state.pods[pod]
    cgroup = Path(record["cgroup"]) if record.get("cgroup") else None
    result = subprocess.run(pod_command(record, list(command)), capture_output=True, text=True, timeout=timeout,
                            check=False, preexec_fn=(lambda: cgroups.join(cgroup)) if cgroup else None)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {pod} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _status(lab: Lab) -> None:
    for node in (n for n in lab.state.node_layouts() if n.index == 1):
        _say(f"The agent of {node.name} (cluster c{node.cluster}): every cluster connected and synced",
             f"clustermesh status --socket {lab.socket(node)}")  # fmt: skip
        render_status(asyncio.run(fetch_status(lab.socket(node))))


def _ping(lab: Lab, source: str, target: str) -> None:
    ip = lab.state.pods[target]["ip"]
    _say(f"Ping from {source} to {target} ({ip}), across clusters, through both nodes' WireGuard tunnel",
         f"clustermesh lab exec {LAB} {source} -- ping -c 3 {ip}")  # fmt: skip
    output.out.print(_in_pod(lab, source, "ping", "-c", "3", "-i", "0.2", "-W", "2", ip).rstrip())


def _http(lab: Lab, source: str, target: str, workdir: Path) -> None:
    ip = lab.state.pods[target]["ip"]
    site = workdir / "site"
    site.mkdir()
    cluster = target.partition("/")[0]
    (site / "index.html").write_text(f"hello from {target} ({ip}) in cluster {cluster}\n")
    server = Child(
        f"http server in {target}",
        [*netns.nsenter(lab.state.pods[target]["netns"]), sys.executable, "-m", "http.server", str(HTTP_PORT),
         "--bind", ip, "--directory", str(site)],
        workdir / "http.log",
    )  # fmt: skip
    url = f"http://{ip}:{HTTP_PORT}/"
    fetch = f"import urllib.request; print(urllib.request.urlopen('{url}', timeout=5).read().decode())"
    _say(f"An HTTP server in {target}, and a request to it from {source}",
         f'clustermesh lab exec {LAB} {source} -- python3 -c "{fetch}"')  # fmt: skip
    server.start()
    try:
        server.wait_for(r"Serving HTTP")
        output.out.print(_in_pod(lab, source, sys.executable, "-c", fetch).rstrip())
    finally:
        server.stop(grace=2)


def _wireguard(lab: Lab) -> None:
    node = lab.state.node_layouts()[0]
    _say(f"The WireGuard peers of {node.name}: one per other node, of either cluster, with their pod CIDRs",
         f"ip netns exec {node.netns} wg show {node.wireguard_interface}")  # fmt: skip
    output.out.print(netns.run(*netns.nsenter(node.netns), "wg", "show", node.wireguard_interface).rstrip())


NAMESPACE = """apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
"""
POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-from-c2-clients, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def _cli(*args: str, stdin: str | None = None) -> str:
    command = [str(Path(sys.executable).parent / "clustermesh"), *args]
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"clustermesh {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _policy(lab: Lab, workdir: Path) -> None:
    # this process lives in the lab's world namespace since `up`: it reaches etcd with the lab's own contexts, where
    # a user's shell uses `lab env`'s (through a loopback bridge)
    contexts = str(lab.state_dir / "contexts.yaml")
    (workdir / "shop.yaml").write_text(NAMESPACE)
    (workdir / "policy.yaml").write_text(POLICY)
    _say("Namespace shop in both clusters (its labels become part of its pods' identities)",
         f'eval "$(clustermesh lab env {LAB})"; clustermesh --context c1 apply -f shop.yaml; '
         "clustermesh --context c2 apply -f shop.yaml")  # fmt: skip
    for cluster in ("c1", "c2"):
        output.out.print(_cli("--config", contexts, "--context", cluster, "apply", "-f", str(workdir / "shop.yaml"))
                         .rstrip())  # fmt: skip
    for cluster, name, app in (("c1", "server", "server"), ("c2", "client", "client"), ("c2", "intruder", "intruder")):
        _say(f"A pod {name} (app={app}) in namespace shop of cluster {cluster}",
             f"clustermesh lab pod add {LAB} {cluster} {name} --namespace shop --labels app={app}")  # fmt: skip
        made = add_named_pod(lab, int(cluster[1:]), name, namespace="shop", labels={"app": app})
        output.out.print(f"{made['ip']} on {made['node']}, identity {made['identity']}")
    _say("A policy in c1: only app=client pods of cluster c2 reach app=server, and only on TCP 8080",
         "clustermesh --context c1 apply -f policy.yaml")  # fmt: skip
    output.out.print(POLICY.rstrip(), markup=False, highlight=False)
    output.out.print(_cli("--config", contexts, "--context", "c1", "apply", "-f", str(workdir / "policy.yaml"))
                     .rstrip())  # fmt: skip
    server_ip = lab.state.pods["c1/shop/server"]["ip"]
    server = Child("http server in c1/shop/server", [*netns.nsenter(lab.state.pods["c1/shop/server"]["netns"]),
                   sys.executable, "-m", "http.server", "8080", "--bind", server_ip, "--directory", str(workdir)],
                   workdir / "server.log")  # fmt: skip
    server.start()
    try:
        server.wait_for(r"Serving HTTP")
        fetch = (f"import urllib.request; urllib.request.urlopen('http://{server_ip}:8080/policy.yaml', timeout=3); "
                 "print('HTTP 200')")  # fmt: skip
        _say("c2/shop/client (app=client, cluster c2) asks the server: allowed",
             f'clustermesh lab exec {LAB} c2/shop/client -- python3 -c "..."')  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # the agents write the maps within a moment of the policy
            try:
                output.out.print(_in_pod(lab, "c2/shop/client", sys.executable, "-c", fetch).rstrip())
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        _say("c2/shop/intruder (app=intruder) asks the same: dropped in eBPF at the server's veth",
             f'clustermesh lab exec {LAB} c2/shop/intruder -- python3 -c "..."')  # fmt: skip
        try:
            _in_pod(lab, "c2/shop/intruder", sys.executable, "-c", fetch)
            output.out.print("[red]it got through: the policy is not enforced[/]")
        except RuntimeError:
            output.out.print("timed out: no answer, the SYN was dropped")
    finally:
        server.stop(grace=2)
    node = next(n for n in lab.state.node_layouts() if n.name == lab.state.pods["c1/shop/server"]["node"])
    _say(f"What {node.name}, the server's node, enforces", f"clustermesh policy get --socket {lab.socket(node)}")
    output.out.print(_cli("policy", "get", "--socket", str(lab.socket(node))).rstrip(), markup=False,
                     highlight=False)  # fmt: skip
    for verdict, what in (("FORWARDED", "The allowed flow"), ("DROPPED", "The drop")):
        _say(f"{what} at the server, as Hubble shows flows: both sides by their labels and clusters",
             f"clustermesh observe --socket {lab.socket(node)} --to-label app=server --verdict {verdict} "
             "--last 1")  # fmt: skip
        flows = _cli("observe", "--socket", str(lab.socket(node)), "--to-label", "app=server", "--verdict", verdict,
                     "--last", "1")  # fmt: skip
        output.out.print(flows.rstrip(), markup=False, highlight=False)
    _say("The same flows seen by every node of both clusters, through c1's relay (mutual TLS to each node's :4244)",
         f"clustermesh observe --lab {LAB} --to-label app=server --last 4")  # fmt: skip
    deadline = time.monotonic() + 10
    while True:  # the relay reads each node within a moment
        flows = _cli("observe", "--lab", LAB, "--to-label", "app=server", "--last", "4")
        if ("[c1/" in flows and "[c2/" in flows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    output.out.print(flows.rstrip(), markup=False, highlight=False)


WEB_SERVER = """
import socket, sys
name = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 80)); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.recv(1024)
    c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nhello from " + name.encode() + b"\\n"); c.close()
"""
ASK = """
import collections, sys, urllib.request
answers = collections.Counter(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode().strip()
                              for _ in range(int(sys.argv[2])))
for answer, count in sorted(answers.items()):
    print(f"{count:3} x {answer}")
"""


def _global_service(lab: Lab, workdir: Path) -> None:
    servers = []
    try:
        for cluster in ("c1", "c2"):
            pod = f"{cluster}/shop/web"
            _say(f"A backend web (app=web) in cluster {cluster}, and the Service shop/web there, global",
                 f"clustermesh lab pod add {LAB} {cluster} web --namespace shop --labels app=web; "
                 f"clustermesh lab service add {LAB} {cluster} web --namespace shop --selector app=web --port 80 "
                 "--global")  # fmt: skip
            add_named_pod(lab, int(cluster[1:]), "web", namespace="shop", labels={"app": "web"})
            record = lab.state.pods[pod]
            command = [sys.executable, "-u", "-c", WEB_SERVER, f"{pod} ({record['ip']}) in cluster {cluster}"]
            server = Child(f"web server in {pod}", pod_command(record, command), workdir / f"web-{cluster}.log")
            server.start()
            servers.append(server)
            server.wait_for("ready")
            made = asyncio.run(add_service(lab, int(cluster[1:]), "web", "shop", {"app": "web"}, parse_ports(["80"]),
                                           is_global=True, shared=True, affinity=None))  # fmt: skip
            output.out.print(f"ClusterIP {made['cluster_ip']}")
        _say("What the nodes load-balance: each cluster's ClusterIP, with the backends of both clusters",
             f"clustermesh service list --lab {LAB}")  # fmt: skip
        output.out.print(_cli("service", "list", "--lab", LAB).rstrip(), markup=False, highlight=False)
        url = "http://web.shop.svc.clusterset.local/"
        typed = f'clustermesh lab exec {LAB} c2/shop/client -- python3 -c "... urlopen({url!r})"'
        _say("12 requests by name from c2/shop/client: answered by the backends of both clusters, balanced in eBPF "
             "at connect()", typed)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # the agents write the maps within a moment of the Service
            answers = _in_pod(lab, "c2/shop/client", sys.executable, "-c", ASK, url, "12")
            if ("cluster c1" in answers and "cluster c2" in answers) or time.monotonic() > deadline:
                break
        output.out.print(answers.rstrip())
        _say("c2's backend goes: the same requests are answered by c1's, across the clusters",
             f"clustermesh lab pod delete {LAB} c2/shop/web")  # fmt: skip
        servers.pop().stop(grace=1)
        delete_pod(lab, "c2/shop/web")
        deadline = time.monotonic() + 10
        while True:
            answers = _in_pod(lab, "c2/shop/client", sys.executable, "-c", ASK, url, "12")
            if "cluster c2" not in answers or time.monotonic() > deadline:
                break
        output.out.print(answers.rstrip())
    finally:
        for server in servers:
            server.stop(grace=1)


def main(*, keep: bool = False) -> None:
    require_root()
    started = time.monotonic()
    layout = LabLayout(LAB, clusters=2, nodes=2, pods=2, routing="wireguard")
    if layout.state_dir.exists() or netns.list_netns(f"{LAB}-"):
        output.step(f"a lab named {LAB} is left from an earlier run: removing it")
        down(LAB, progress=output.step)
    _say("Two clusters of two nodes, two pods per node, over WireGuard",
         f"clustermesh lab up --name {LAB} --clusters 2 --nodes 2 --pods 2 --routing wireguard")  # fmt: skip
    lab = Lab(layout, progress=output.step)
    try:
        with tempfile.TemporaryDirectory(prefix="clustermesh-demo-") as workdir:
            lab.up()
            _status(lab)
            _ping(lab, "c1/pod-1-1", "c2/pod-2-2")
            _http(lab, "c1/pod-2-1", "c2/pod-1-2", Path(workdir))
            _wireguard(lab)
            _policy(lab, Path(workdir))
            _global_service(lab, Path(workdir))
    finally:
        if not keep:
            _say("Removing the lab: every process, namespace, socket and file it made",
                 f"clustermesh lab down --name {LAB}")  # fmt: skip
            down(LAB, progress=output.step)
    output.out.print(f"\n[bold green]demo done in {time.monotonic() - started:.0f} s[/]")
    if keep:
        output.out.print(f"The lab is kept. See the mesh in your browser: [bold]clustermesh ui --lab {LAB}[/] "
                         f"(then http://127.0.0.1:12000/), and remove it with: clustermesh lab down {LAB}")  # fmt: skip
    else:
        output.out.print("To see the mesh live in your browser: [bold]clustermesh demo --keep[/], then "
                         f"[bold]clustermesh ui --lab {LAB}[/] and open http://127.0.0.1:12000/")  # fmt: skip
