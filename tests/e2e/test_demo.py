"""`make demo` end to end, so it keeps working: a two-cluster lab over WireGuard, a cross-cluster ping and HTTP
request, the WireGuard peers, and nothing left behind. Run as a separate process, as a user runs it: the demo moves
its process into the lab's namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from clustermesh.lab import netns

CLI = Path(sys.executable).parent / "clustermesh"


def test_demo_shows_cross_cluster_traffic_over_wireguard_and_cleans_up() -> None:
    result = subprocess.run([str(CLI), "demo"], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "3 packets transmitted, 3 received" in out, out
    assert "hello from c2/pod-1-2 (10.2.1.11) in cluster c2" in out, out
    assert out.count("\npeer: ") == 3, "c1-node-1 has one WireGuard peer per other node"
    assert "latest handshake" in out, "the ping went through a WireGuard session"
    assert out.count(": ready") == 2, "both clusters' status say ready"
    assert "HTTP 200" in out and "timed out: no answer, the SYN was dropped" in out, out
    assert "shop/server 10.1.1.12 identity 65793 on c1/c1-node-1: enforced ingress" in out, out
    forwarded = [line for line in out.splitlines() if "INGRESS FORWARDED" in line and "shop/client" in line]
    dropped = [line for line in out.splitlines() if "DROPPED Policy denied" in line]
    assert forwarded and "(k8s:app=client, c2) -> shop/server:8080 (k8s:app=server, c1)" in forwarded[0], out
    assert dropped and "shop/intruder" in dropped[0] and "(k8s:app=intruder, c2)" in dropped[0], out
    relayed = out.partition("through c1's relay")[2].partition("A backend web")[0]
    assert "[c1/c1-node-" in relayed and "[c2/c2-node-" in relayed, "the relay gives both clusters' nodes' flows"
    assert "clustermesh ui --lab demo" in out, "the demo points at the browser map"
    before, _, after = out.partition("c2's backend goes")
    both = before.split("12 requests by name")[-1]
    assert "in cluster c1" in both and "in cluster c2" in both, "the global service answered from both clusters"
    assert " 12 x hello from c1/shop/web" in after, "then only from c1's backend"
    assert netns.list_netns("demo-") == []
    assert not Path("/run/clustermesh-lab/demo").exists()
