"""CiliumNetworkPolicy across clusters, enforced in eBPF, in every routing mode: a server in c1, clients in both
clusters. A peer selector names the remote cluster with `io.cilium.k8s.policy.cluster`; without it, it selects the
local cluster only (Cilium's `policy-default-local-cluster`), or every cluster when an agent is started with
`--policy-default-local-cluster=false`. Deny rules win over allow rules; the replies of an allowed connection pass
an endpoint that allows nothing in; a new pod of an allowed identity anywhere in the mesh changes the ipcache only,
never a policy map. Each denied case leaves a drop flow that names both sides by their labels.

Policies are applied from the host's shell through `clustermesh lab env`, as a user applies them; a guard counts
every packet the host's namespace sends to a lab address, and there must be none.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from clustermesh.contexts import ContextFile
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.standalone import registry_key
from kvstore import etcd
from tests.e2e.labtools import LabHandle, clustermesh, describe, lab_owned, wait_until
from tests.e2e.policytools import HostGuard, PolicyLab, Probe, run_cli

SERVER, LOCAL_CLIENT, REMOTE_CLIENT, REMOTE_OTHER = (
    "c1/shop/server",
    "c1/shop/client",
    "c2/shop/client",
    "c2/shop/other",
)
SHOP = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: shop}}\n"
CLIENTS = [LOCAL_CLIENT, REMOTE_CLIENT, REMOTE_OTHER]
Applied = list[tuple[str, str]]  # (cluster, manifest) a test applied
TO_SERVER: list[Probe] = [(client, SERVER, "tcp", port) for client in CLIENTS for port in (80, 81)]


def cnp(name: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n"
            f"spec:\n{spec}")  # fmt: skip


SERVER_FROM_REMOTE_CLIENTS = cnp("server-from-c2-clients", """  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")  # fmt: skip

SERVER_FROM_CLIENTS = cnp("server-from-clients", """  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
""")  # fmt: skip


def build(lab: PolicyLab) -> None:
    """Namespace shop in both clusters, then the four pods (on different nodes where there are), each serving."""
    lab.apply("c1", SHOP)
    lab.apply("c2", SHOP)
    nodes = {cluster: [n.name for n in lab.lab.state.node_layouts() if n.cluster == cluster] for cluster in (1, 2)}
    placed = [(SERVER, "server", nodes[1][0]), (LOCAL_CLIENT, "client", nodes[1][-1]),
              (REMOTE_CLIENT, "client", nodes[2][0]), (REMOTE_OTHER, "other", nodes[2][-1])]  # fmt: skip
    for reference, app, node in placed:
        lab.add_pod_with_namespace_labels(reference, {"app": app}, node)
        lab.serve(reference)


def tear_down(lab: PolicyLab) -> None:
    for reference in list(lab.pods):
        lab.delete_pod(reference)
    lab.delete("c1", SHOP)
    lab.delete("c2", SHOP)


@pytest.fixture(scope="module")
def shop(mesh_lab: LabHandle) -> Iterator[PolicyLab]:
    """Name: shop. Scope: module (one per routing mode). The shared lab with namespace shop in both clusters, a
    server in c1, a client in each cluster and another pod in c2; all removed at the end. The host must have sent
    no packet to a lab address meanwhile."""
    lab = PolicyLab.of(mesh_lab)
    with HostGuard(mesh_lab.name) as guard:
        try:
            build(lab)
            yield lab
        finally:
            tear_down(lab)
        assert guard.packets() == 0, "the host's own namespace sent packets to lab addresses"


@pytest.fixture
def applied(shop: PolicyLab) -> Iterator[Applied]:
    """Name: applied. (cluster, manifest) a test applies; deleted at its end."""
    manifests: Applied = []
    yield manifests
    for cluster, manifest in manifests:
        shop.delete(cluster, manifest)


def apply(lab: PolicyLab, applied: Applied, cluster: str, manifest: str) -> None:
    applied.append((cluster, manifest))
    lab.apply(cluster, manifest)


def test_the_cluster_label_selects_clients_of_the_remote_cluster(shop: PolicyLab, applied: Applied) -> None:
    shop.expect_matrix("no policy: every client reaches the server", TO_SERVER, lambda s, d, p, port: True)
    apply(shop, applied, "c1", SERVER_FROM_REMOTE_CLIENTS)
    shop.expect_matrix("only c2's clients, on TCP 80", TO_SERVER,
                       lambda s, d, p, port: s == REMOTE_CLIENT and port == 80)  # fmt: skip
    shop.expect_drop(REMOTE_OTHER, SERVER)
    shop.expect_drop(LOCAL_CLIENT, SERVER)  # app=client, but of c1
    documents = shop.policy_documents()
    server = shop.endpoint(SERVER)
    assert server["enforced"] == {"ingress": True, "egress": False}, server
    [rule] = server["rules"]
    assert rule["policy"] == "cnp shop/server-from-c2-clients" and rule["ports"] == ["TCP/80"], rule
    assert [p["identity"] for p in rule["identities"]] == [shop.pods[REMOTE_CLIENT]["identity"]], (rule, documents)


def test_a_selector_without_the_cluster_label_selects_the_local_cluster(shop: PolicyLab,
                                                                        applied: Applied) -> None:  # fmt: skip
    apply(shop, applied, "c1", SERVER_FROM_CLIENTS)
    shop.expect_matrix("only c1's client", TO_SERVER, lambda s, d, p, port: s == LOCAL_CLIENT)
    shop.expect_drop(REMOTE_CLIENT, SERVER)


def test_deny_wins_over_allow(shop: PolicyLab, applied: Applied) -> None:
    apply(shop, applied, "c1", cnp("server-all-but-c2-other", """  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: other, io.cilium.k8s.policy.cluster: c2}}]
"""))  # fmt: skip
    shop.expect_matrix("everyone but c2's other pod", TO_SERVER, lambda s, d, p, port: s != REMOTE_OTHER)
    shop.expect_drop(REMOTE_OTHER, SERVER, reason="POLICY_DENY")


def test_replies_of_an_allowed_connection_pass_an_isolated_client(shop: PolicyLab,
                                                                  applied: Applied) -> None:  # fmt: skip
    apply(shop, applied, "c1", SERVER_FROM_REMOTE_CLIENTS)
    apply(shop, applied, "c2", cnp("clients-closed", "  endpointSelector: {matchLabels: {app: client}}\n"
                                                     "  ingress: [{}]\n"))  # fmt: skip
    probes: list[Probe] = [(REMOTE_CLIENT, SERVER, "tcp", 80), (SERVER, REMOTE_CLIENT, "tcp", 80),
                           (SERVER, REMOTE_CLIENT, "udp", 81)]  # fmt: skip
    shop.expect_matrix("the client connects (its replies come back in); nothing new reaches it", probes,
                       lambda s, d, p, port: s == REMOTE_CLIENT)  # fmt: skip
    shop.expect_drop(SERVER, REMOTE_CLIENT)


def test_a_new_remote_pod_of_an_allowed_identity_writes_no_policy_map(shop: PolicyLab,
                                                                      applied: Applied) -> None:  # fmt: skip
    apply(shop, applied, "c1", SERVER_FROM_REMOTE_CLIENTS)
    shop.expect_matrix("c2's client reaches the server", TO_SERVER[2:4],
                       lambda s, d, p, port: port == 80)  # fmt: skip
    before = {node: document["map_writes"] for node, document in shop.policy_documents().items()}
    newcomer = "c2/shop/client-2"
    nodes = [n.name for n in shop.lab.state.node_layouts() if n.cluster == 2]
    made = shop.add_pod(newcomer, {"app": "client"}, nodes[-1])
    try:
        assert made["identity"] == shop.pods[REMOTE_CLIENT]["identity"], made
        shop.expect_matrix("the new client reaches the server at once", [(newcomer, SERVER, "tcp", 80)],
                           lambda s, d, p, port: True)  # fmt: skip
        after = {node: document["map_writes"] for node, document in shop.policy_documents().items()}
        for node in before:
            assert after[node]["policy_writes"] == before[node]["policy_writes"], (node, before, after)
        c1_nodes = [node for node in before if node.startswith("c1/")]
        assert all(after[n]["ipcache_writes"] > before[n]["ipcache_writes"] for n in c1_nodes), (before, after)
    finally:
        shop.delete_pod(newcomer)


# --- the flag's other meaning, in a lab of its own


@pytest.fixture(scope="module")
def any_cluster_lab() -> Iterator[PolicyLab]:
    """Name: any_cluster_lab. Scope: module. A lab (vxlan, 2 clusters x 1 node) whose agents run with
    `--policy-default-local-cluster=false`, with the shop's pods."""
    with lab_owned("e2eanyc", routing="vxlan", nodes=1, pods=1,
                   agent_args=("--policy-default-local-cluster=false",)) as handle:  # fmt: skip
        lab = PolicyLab.of(handle)
        build(lab)
        yield lab


def test_with_the_flag_off_a_selector_without_the_cluster_label_selects_every_cluster(
    any_cluster_lab: PolicyLab,
) -> None:
    any_cluster_lab.apply("c1", SHOP + "---\n" + SERVER_FROM_CLIENTS)
    any_cluster_lab.expect_matrix("the clients of both clusters", TO_SERVER, lambda s, d, p, port: s != REMOTE_OTHER)
    any_cluster_lab.expect_drop(REMOTE_OTHER, SERVER)


# --- malformed policies


BAD_POLICIES = {
    "spec.ingress[0].fromEndpointz": cnp("typo", """  endpointSelector: {}
  ingress: [{fromEndpointz: [{matchLabels: {app: client}}]}]
"""),
    "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator": cnp("bad-operator", """  endpointSelector: {}
  ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: Maybe, values: [x]}]}]}]
"""),
    "spec.egress[0].toCIDR[0]": cnp("bad-cidr", """  endpointSelector: {}
  egress: [{toCIDR: [10.0.0.300/8]}]
"""),
}  # fmt: skip


@pytest.mark.parametrize("mesh_lab", ["vxlan"], indirect=True)
def test_apply_refuses_a_malformed_policy_naming_the_field(shop: PolicyLab) -> None:
    for field, manifest in BAD_POLICIES.items():
        result = run_cli(shop.config, "--context", "c1", "apply", "-f", "-", stdin=manifest)
        assert result.returncode != 0 and field in result.stderr, (field, describe(result))


async def _write_around_apply(config: Path, objects: dict[str, bytes]) -> None:
    """What `apply` would refuse, written straight into c1's store (as a buggy or hostile writer could)."""
    context = ContextFile.load(config).get("c1")
    backend = await etcd.connect(context.etcd_config(config.parent))
    try:
        for key, value in objects.items():
            await backend.create(key, value)
    finally:
        await backend.close()


@pytest.mark.parametrize("mesh_lab", ["vxlan"], indirect=True)
def test_an_agent_reading_a_malformed_policy_skips_it_and_keeps_enforcing(shop: PolicyLab,
                                                                          applied: Applied) -> None:  # fmt: skip
    apply(shop, applied, "c1", SERVER_FROM_REMOTE_CLIENTS)
    shop.expect_matrix("the good policy holds", TO_SERVER, lambda s, d, p, port: s == REMOTE_CLIENT and port == 80)
    kind = kind_by_name("CiliumNetworkPolicy")
    maybe = {"matchExpressions": [{"key": "app", "operator": "Maybe"}]}
    bad = json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                      "metadata": {"name": "written-around", "namespace": "shop"},
                      "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                               "ingress": [{"fromEndpoints": [maybe]}]}})  # fmt: skip
    objects = {registry_key(kind, "written-around", "shop"): bad.encode(),
               registry_key(kind, "not-json", "shop"): b"\xff{not json"}  # fmt: skip
    asyncio.run(_write_around_apply(shop.config, objects))
    try:

        def skipped() -> tuple[bool, object]:
            documents = shop.policy_documents()  # c1's agents: c2's read c2's policies
            named = [d["not_enforced"] for node, d in documents.items() if node.startswith("c1/")]
            wanted = {"CiliumNetworkPolicy shop/written-around", "CiliumNetworkPolicy shop/not-json"}
            return all(wanted <= set(n) for n in named), named

        wait_until("every agent of c1 names both malformed policies as not enforced", skipped, timeout=15)
        shop.expect_matrix("the good policy still holds", TO_SERVER,
                           lambda s, d, p, port: s == REMOTE_CLIENT and port == 80)  # fmt: skip
        status = clustermesh("lab", "status", shop.lab.name, "-o", "json")
        assert status.returncode == 0, describe(status)
        assert all(node["ready"] for node in json.loads(status.stdout)["nodes"].values()), status.stdout
    finally:
        for name in ("written-around", "not-json"):
            run_cli(shop.config, "--context", "c1", "delete", "-f", "-",
                    stdin=f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, "
                          "namespace: shop}\n")  # fmt: skip
