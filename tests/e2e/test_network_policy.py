"""Kubernetes NetworkPolicy enforced in eBPF, checked as the upstream network policy e2e suite checks it: namespaces
x, y and z, pods a, b and c in each (spread over the cluster's two nodes), each serving TCP and UDP on ports 80 and
81, and the full reachability matrix (every pod to every other pod, each protocol and port) after each policy.

The policies are applied from the host's shell through `clustermesh lab env` (a loopback bridge into the lab), as a
user applies them; a guard in the host's namespace counts every packet sent to a lab address, and there must be
none. Traffic a pod sends to itself never leaves it (loopback), so the matrix leaves it out, as the datapath does.
The matrix runs in one routing mode: a pod's veth is where policy is enforced, whatever carries the packet between
nodes; test_cilium_policy checks the cross-cluster cases in every mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.labtools import LabHandle
from tests.e2e.policytools import PORTS, HostGuard, PolicyLab

NAMESPACES = ["x", "y", "z"]
PODS = ["a", "b", "c"]
REFS = [f"c1/{namespace}/{pod}" for namespace in NAMESPACES for pod in PODS]
MATRIX = [(s, d, protocol, port) for s in REFS for d in REFS if s != d for protocol, port in PORTS]

NAMESPACE_MANIFEST = "\n---\n".join(
    f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}, labels: {{ns: {n}}}}}" for n in NAMESPACES
)

pytestmark = pytest.mark.parametrize("mesh_lab", ["vxlan"], indirect=True)


def ns(reference: str) -> str:
    return reference.split("/")[1]


def name(reference: str) -> str:
    return reference.split("/")[2]


@pytest.fixture(scope="module")
def netpol(mesh_lab: LabHandle) -> Iterator[PolicyLab]:
    """Name: netpol. Scope: module. The shared vxlan lab with namespaces x, y, z and pods a, b, c in each, serving;
    the pods and namespaces are removed at the end, and the host must have sent no packet to a lab address."""
    lab = PolicyLab.of(mesh_lab)
    nodes = [node.name for node in mesh_lab.state.node_layouts() if node.cluster == 1]
    with HostGuard(mesh_lab.name) as guard:
        try:
            lab.apply("c1", NAMESPACE_MANIFEST)
            for index, reference in enumerate(REFS):
                lab.add_pod_with_namespace_labels(reference, {"pod": name(reference)}, nodes[index % len(nodes)])
                lab.serve(reference)
            yield lab
        finally:
            for reference in list(lab.pods):
                lab.delete_pod(reference)
            lab.delete("c1", NAMESPACE_MANIFEST)
        assert guard.packets() == 0, "the host's own namespace sent packets to lab addresses"


def policy(policy_name: str, namespace: str, spec: str) -> str:
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {policy_name}, "
            f"namespace: {namespace}}}\nspec:\n{spec}")  # fmt: skip


@pytest.fixture
def applied(netpol: PolicyLab) -> Iterator[list[str]]:
    """Name: applied. The manifests a test appends are applied by it and deleted at its end, so that the next test
    starts from no policy."""
    manifests: list[str] = []
    yield manifests
    for manifest in manifests:
        netpol.delete("c1", manifest)


def apply(lab: PolicyLab, applied: list[str], *manifests: str) -> None:
    for manifest in manifests:
        applied.append(manifest)
        lab.apply("c1", manifest)


def test_no_policy_allows_everything_and_a_deleted_policy_opens_again(netpol: PolicyLab, applied: list[str]) -> None:
    netpol.expect_matrix("no policy: every pod reaches every pod", MATRIX, lambda s, d, p, port: True)
    deny = policy("deny-all", "x", "  podSelector: {}\n  policyTypes: [Ingress]\n")
    apply(netpol, applied, deny)
    netpol.expect_matrix("x isolated for ingress", MATRIX, lambda s, d, p, port: ns(d) != "x")
    netpol.delete("c1", deny)
    netpol.expect_matrix("the policy deleted: open again", MATRIX, lambda s, d, p, port: True)


def test_default_deny_ingress(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("deny-ingress", "x", "  podSelector: {}\n  policyTypes: [Ingress]\n"))
    netpol.expect_matrix("nothing reaches x; x reaches everything", MATRIX, lambda s, d, p, port: ns(d) != "x")
    netpol.expect_drop("c1/y/b", "c1/x/a")


def test_default_deny_egress(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("deny-egress", "x", "  podSelector: {}\n  policyTypes: [Egress]\n"))
    netpol.expect_matrix("x reaches nothing; everything reaches x", MATRIX, lambda s, d, p, port: ns(s) != "x")
    netpol.expect_drop("c1/x/c", "c1/z/a")


def test_pod_selector_allows_pods_of_the_same_namespace(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-from-b", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a only from x/b", MATRIX, lambda s, d, p, port: d != "c1/x/a" or s == "c1/x/b")
    netpol.expect_drop("c1/y/b", "c1/x/a")  # pod=b, but of another namespace


def test_namespace_selector(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-from-y", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a only from y/*", MATRIX, lambda s, d, p, port: d != "c1/x/a" or ns(s) == "y")
    netpol.expect_drop("c1/z/c", "c1/x/a")


def test_namespace_and_pod_selector_in_one_peer_is_and(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-from-y-c", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: c}}}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a only from y/c", MATRIX, lambda s, d, p, port: d != "c1/x/a" or s == "c1/y/c")


def test_namespace_and_pod_selector_in_two_peers_is_or(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-from-y-or-c", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: c}}}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a from y/* or x/c", MATRIX,
                         lambda s, d, p, port: d != "c1/x/a" or ns(s) == "y" or s == "c1/x/c")  # fmt: skip


def test_match_expressions_select_namespaces(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-not-from-z", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [z]}]}}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a from x and y", MATRIX, lambda s, d, p, port: d != "c1/x/a" or ns(s) != "z")


def test_a_port_allows_only_its_protocol_and_port(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-tcp-81", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{protocol: TCP, port: 81}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a only on TCP 81", MATRIX,
                         lambda s, d, p, port: d != "c1/x/a" or (p, port) == ("tcp", 81))  # fmt: skip


def test_a_port_range_with_end_port(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-udp-80-81", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{protocol: UDP, port: 80, endPort: 81}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a on UDP 80-81 from every namespace", MATRIX,
                         lambda s, d, p, port: d != "c1/x/a" or p == "udp")  # fmt: skip


def test_ip_block_with_except(netpol: PolicyLab, applied: list[str]) -> None:
    excluded = netpol.ip("c1/y/b")
    apply(netpol, applied, policy("a-from-cidr", "x", f"""  podSelector: {{matchLabels: {{pod: a}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{excluded}/32]}}}}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a from every pod but y/b", MATRIX, lambda s, d, p, port: d != "c1/x/a" or s != "c1/y/b")
    netpol.expect_drop("c1/y/b", "c1/x/a")


def test_policies_selecting_a_pod_are_unioned(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied,
          policy("a-from-b", "x", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n"
                 "  - from: [{podSelector: {matchLabels: {pod: b}}}]\n"),
          policy("a-from-z-tcp-80", "x", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n"
                 "  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n    ports: [{protocol: TCP, port: 80}]\n"),
          )  # fmt: skip
    netpol.expect_matrix("x/a from x/b, or from z/* on TCP 80", MATRIX,
                         lambda s, d, p, port: d != "c1/x/a" or s == "c1/x/b"
                         or (ns(s) == "z" and (p, port) == ("tcp", 80)))  # fmt: skip


def test_egress_to_a_namespace_on_one_port(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("a-to-y-tcp-80", "x", """  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{protocol: TCP, port: 80}]
"""))  # fmt: skip
    netpol.expect_matrix("x/a reaches only y/* on TCP 80 (replies to others still pass)", MATRIX,
                         lambda s, d, p, port: s != "c1/x/a" or (ns(d), p, port) == ("y", "tcp", 80))  # fmt: skip
    netpol.expect_drop("c1/x/a", "c1/z/b")


def test_ingress_and_egress_isolation_together(netpol: PolicyLab, applied: list[str]) -> None:
    apply(netpol, applied, policy("y-closed", "y", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
          policy("y-a-from-x", "y", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n"
                 "  - from: [{namespaceSelector: {matchLabels: {ns: x}}}]\n"))  # fmt: skip
    netpol.expect_matrix("y talks to nothing but x -> y/a (and its replies)", MATRIX,
                         lambda s, d, p, port: (ns(s) != "y" and ns(d) != "y")
                         or (ns(s) == "x" and d == "c1/y/a"))  # fmt: skip
