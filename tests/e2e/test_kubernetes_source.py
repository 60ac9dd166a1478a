"""The lab with `--source kubernetes`: each cluster's resources in a stand-in Kubernetes API server of its own (the
real list/watch protocol, objects validated on create, a token per service account with RBAC's shape), the
apiservers and agents reading and writing there. The checks of the standalone labs pass this way too: pods reach
each other across the clusters (TCP and UDP), a CiliumNetworkPolicy applied through the API server drops and its
removal lets through, and a global Service answers from the other cluster's backend.

One lab of 2 clusters x 1 node (vxlan).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.labtools import clustermesh, describe, lab_owned, wait_until
from tests.e2e.policytools import PolicyLab, run_cli

LAB = "e2ek8s"
STATE = Path(f"/run/clustermesh-lab/{LAB}")

DENY_FROM_C1 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: local-only, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.cluster: c2}}]
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[PolicyLab]:
    with lab_owned(LAB, routing="vxlan", clusters=2, nodes=1, pods=1, source="kubernetes") as handle:
        lab = PolicyLab.of(handle)
        for cluster in ("c1", "c2"):
            lab.apply(cluster, "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        lab.add_pod("c1/shop/client", {"app": "client"})
        lab.add_pod("c2/shop/server", {"app": "server"})
        lab.serve("c2/shop/server")
        yield lab


def standin(cluster: str) -> tuple[int, dict[str, str]]:
    """The host port of a cluster's stand-in, and the token of each service account."""
    port = int(json.loads((STATE / cluster / "standin.json").read_text())["host_port"])
    tokens = {}
    for user in ("apiserver", "agent", "admin"):
        config = yaml.safe_load((STATE / cluster / f"kubeconfig-{user}.yaml").read_text())
        tokens[user] = config["users"][0]["user"]["token"]
    return port, tokens


def ask(port: int, path: str, token: str | None, method: str = "GET", body: dict[str, object] | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_clusters_objects_live_in_their_api_servers(mesh: PolicyLab) -> None:
    listed = run_cli(mesh.config, "--context", "c1", "get", "ciliumendpoints", "-A", "-o", "json")
    assert listed.returncode == 0, describe(listed)
    names = {item["metadata"]["name"] for item in json.loads(listed.stdout)["items"]}
    assert {"client", "pod-1-1"} <= names, names
    port, tokens = standin("c1")
    path = "/apis/cilium.io/v2/namespaces/shop/ciliumendpoints/client"
    assert ask(port, path, tokens["agent"]) == 200, "the agent wrote the pod's CiliumEndpoint there"
    nodes = ask(port, "/apis/cilium.io/v2/ciliumnodes/c1-node-1", tokens["apiserver"])
    assert nodes == 200, "the agent published its CiliumNode there"


def test_each_service_account_may_do_what_its_role_allows_only(mesh: PolicyLab) -> None:
    port, tokens = standin("c2")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sneaky", "namespace": "shop"},
               "spec": {"ports": [{"port": 80}]}}  # fmt: skip
    assert ask(port, "/api/v1/namespaces/shop/services", None) == 401
    assert ask(port, "/api/v1/namespaces/shop/services", "not-a-token") == 401
    assert ask(port, "/api/v1/namespaces/shop/services", tokens["agent"], "POST", service) == 403
    assert ask(port, "/api/v1/namespaces/shop/services", tokens["apiserver"], "POST", service) == 403
    assert ask(port, "/api/v1/namespaces/shop/services", tokens["apiserver"]) == 200, "it reads"


def test_pods_reach_each_other_across_the_clusters(mesh: PolicyLab) -> None:
    probes = [("c1/shop/client", "c2/shop/server", protocol, 80) for protocol in ("tcp", "udp")]
    mesh.expect_matrix("c1's client reaches c2's server over TCP and UDP", probes, lambda *_: True)


def test_a_policy_applied_through_the_api_server_drops_then_its_removal_lets_through(mesh: PolicyLab) -> None:
    probes = [("c1/shop/client", "c2/shop/server", "tcp", 80)]
    mesh.apply("c2", DENY_FROM_C1)
    try:
        mesh.expect_matrix("the policy stops c1's client", probes, lambda *_: False)
    finally:
        mesh.delete("c2", DENY_FROM_C1)
    mesh.expect_matrix("and its removal lets it through again", probes, lambda *_: True)


def test_a_global_service_answers_from_the_other_clusters_backend(mesh: PolicyLab) -> None:
    for cluster in ("c1", "c2"):
        made = clustermesh("lab", "service", "add", LAB, cluster, "server", "--namespace", "shop", "--selector",
                           "app=server", "--port", "80", "--global", "-o", "json")  # fmt: skip
        assert made.returncode == 0, describe(made)
        assert json.loads(made.stdout)["cluster_ip"].startswith(f"10.96.{cluster[1:]}."), "given by the API server"
    address = json.loads(made.stdout)["cluster_ip"]
    c1_address = json.loads(clustermesh("service", "list", "--lab", LAB, "--cluster", "c1", "-o", "json").stdout)
    frontend = next(iter(c1_address.values()))["frontends"][0]["frontend"].split(":")[0]
    assert frontend != address

    def answered() -> tuple[bool, object]:
        result = clustermesh("lab", "exec", LAB, "c1/shop/client", "--", "python3", "-m", "clustermesh.lab.probe",
                             "check", "--timeout", "1", f"tcp:{frontend}:80")  # fmt: skip
        return result.returncode == 0 and json.loads(result.stdout or "{}").get(f"tcp:{frontend}:80") is True, (
            result.stdout + result.stderr
        )

    wait_until("c1's client reaches the global Service's backend in c2", answered, timeout=30)
