"""Policies read and compiled: Kubernetes' and Cilium's semantics, across clusters, and every way a policy is
refused (the field named). The datapath's half (the same entries in real maps) is tests/e2e/test_bpf_datapath.py."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from clustermesh.model.policies import EGRESS, INGRESS, PolicyError, parse_policy
from clustermesh.model.policycompile import ANY, Entry, PolicyContext, cidrs_of, compile_endpoint

TCP, UDP, ICMP = 6, 17, 1


def labels(app: str, namespace: str = "shop", cluster: str = "c1", **extra: str) -> dict[str, str]:
    found = {"app": app, "io.kubernetes.pod.namespace": namespace, "io.cilium.k8s.policy.cluster": cluster}
    found.update({f"io.cilium.k8s.namespace.labels.{k}": v for k, v in extra.items()})
    return found


IDENTITIES = {
    65537: labels("web"),
    65538: labels("client"),
    65539: labels("client", namespace="other", team="blue"),
    131073: labels("client", cluster="c2"),
    131074: labels("web", cluster="c2"),
}
WEB = labels("web")


def context(**options: Any) -> PolicyContext:
    return PolicyContext("c1", IDENTITIES, **options)


def policies(text: str) -> list[Any]:
    return [p for document in yaml.safe_load_all(text) for p in parse_policy(document)]


def entries(text: str, endpoint: dict[str, str] = WEB, **options: Any) -> dict[Entry, bool]:
    return compile_endpoint(endpoint, policies(text), context(**options)).entries


# --- Kubernetes NetworkPolicy


NP = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
"""


def test_a_network_policy_isolates_ingress_by_default_and_allows_what_it_lists() -> None:
    text = (
        NP
        + """  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}, {protocol: UDP, port: 5000, endPort: 5010}]
"""
    )
    compiled = compile_endpoint(WEB, policies(text), context())
    assert compiled.enforce_ingress and not compiled.enforce_egress
    assert compiled.entries == {
        Entry(INGRESS, 65538, TCP, 80, 80): False,  # the client of this namespace and cluster only
        Entry(INGRESS, 65538, UDP, 5000, 5010): False,
    }
    assert compiled.policies == ["netpol shop/web"]


def test_a_network_policy_selects_only_pods_of_its_namespace() -> None:
    other = labels("web", namespace="other")
    assert compile_endpoint(other, policies(NP), context()).policies == []


@pytest.mark.parametrize(
    ("peer", "identities"),
    [
        ("{podSelector: {}}", {65537, 65538}),  # every pod of the namespace
        ("{namespaceSelector: {}}", {65537, 65538, 65539}),  # every pod of every namespace (of this cluster)
        ("{namespaceSelector: {matchLabels: {team: blue}}}", {65539}),
        ("{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: other}}}", {65539}),
        ("{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}", {65538, 65539}),  # AND
    ],
)
def test_network_policy_peers(peer: str, identities: set[int]) -> None:
    text = NP + f"  ingress: [{{from: [{peer}]}}]\n"
    assert {e.identity for e in entries(text)} == identities


def test_a_rule_without_peers_or_ports_allows_everything_and_egress_is_isolated_when_listed() -> None:
    text = NP + "  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n"
    compiled = compile_endpoint(WEB, policies(text), context())
    assert compiled.enforce_ingress and compiled.enforce_egress
    assert compiled.entries == {Entry(INGRESS, ANY, 0, 0, 65535): False}, "every peer, every port: one entry"


def test_ip_blocks_select_cidr_identities_minus_their_exceptions() -> None:
    text = NP + "  ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.5.0/24]}}]}]\n"
    found = policies(text)
    assert cidrs_of(found) == {"192.168.0.0/16", "192.168.5.0/24"}
    cidr_ids = {"192.168.0.0/16": 16777217, "192.168.5.0/24": 16777218}
    assert {e.identity for e in entries(text, cidr_identities=cidr_ids)} == {16777217}


def test_an_ip_block_of_a_network_policy_selects_the_pods_whose_addresses_are_in_it() -> None:
    text = NP + "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.2.0.5/32]}}]}]\n"
    addresses = {65538: ["10.1.0.7"], 65539: ["10.1.0.8", "10.2.0.5"], 131073: ["10.2.0.6"], 131074: ["172.16.0.1"]}
    found = {e.identity for e in entries(text, endpoint_addresses=addresses, cidr_identities={"10.0.0.0/8": 1 << 24})}
    # 65539 has a pod in the exception: an identity is selected whole or not at all; 131074 is outside
    assert found == {65538, 131073, 1 << 24}


def test_a_cilium_cidr_rule_never_selects_endpoints() -> None:
    text = CNP + "  ingress: [{fromCIDR: [10.0.0.0/8]}]\n"
    assert {e.identity for e in entries(text, endpoint_addresses={65538: ["10.1.0.7"]})} == set()


# --- Cilium's policies


CNP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
"""


def test_peers_without_a_cluster_label_select_the_local_cluster_only() -> None:
    text = CNP + "  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]\n"
    assert {e.identity for e in entries(text)} == {65538}, "same namespace, same cluster"
    assert {e.identity for e in entries(text, default_local_cluster=False)} == {65538, 131073}


def test_the_cluster_label_selects_another_cluster() -> None:
    text = (
        CNP
        + """  ingress:
  - fromEndpoints: [{matchLabels: {app: client, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
    )
    assert entries(text) == {Entry(INGRESS, 131073, TCP, 8080, 8080): False}


def test_a_namespace_label_in_the_selector_leaves_the_policys_namespace() -> None:
    text = CNP + "  ingress: [{fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: other}}]}]\n"
    assert {e.identity for e in entries(text)} == {65539}


def test_deny_wins_over_a_more_specific_allow() -> None:
    text = (
        CNP
        + """  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", endPort: 90, protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "85", protocol: TCP}]}]
"""
    )
    assert entries(text) == {
        Entry(INGRESS, 65538, TCP, 85, 85): True,
        Entry(INGRESS, 65538, TCP, 80, 84): False,
        Entry(INGRESS, 65538, TCP, 86, 90): False,
    }
    everything = (
        CNP
        + """  ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80"}]}]}]
  ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}]}]
"""
    )
    assert entries(everything) == {Entry(INGRESS, 65538, 0, 0, 65535): True}, "a deny of every protocol"


def test_entities_l4_only_rules_icmp_and_empty_rules() -> None:
    text = (
        CNP
        + """  egress:
  - toEntities: [world, host]
  - toPorts: [{ports: [{port: "53", protocol: ANY}]}]
  - icmps: [{fields: [{type: EchoRequest}]}]
  ingress: [{}]
"""
    )
    compiled = compile_endpoint(WEB, policies(text), context(cidr_identities={"10.9.0.0/16": 16777300}))
    assert compiled.enforce_ingress and compiled.enforce_egress
    assert compiled.entries == {
        Entry(EGRESS, 2, 0, 0, 65535): False,
        Entry(EGRESS, 16777300, 0, 0, 65535): False,  # world holds the CIDR identities
        Entry(EGRESS, 1, 0, 0, 65535): False,
        Entry(EGRESS, ANY, TCP, 53, 53): False,  # ANY with a port: TCP, UDP and SCTP
        Entry(EGRESS, ANY, UDP, 53, 53): False,
        Entry(EGRESS, ANY, 132, 53, 53): False,
        Entry(EGRESS, ANY, ICMP, 8, 8): False,
    }


def test_the_cluster_entity_is_every_local_identity_and_the_nodes() -> None:
    text = CNP + "  ingress: [{fromEntities: [cluster]}]\n"
    assert {e.identity for e in entries(text)} == {65537, 65538, 65539, 1, 4, 6}


def test_a_clusterwide_policy_selects_every_namespace_and_enable_default_deny() -> None:
    text = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: audit}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingress: [{fromEndpoints: [{}]}]
"""
    found = policies(text)
    compiled = compile_endpoint(labels("web", namespace="other"), found, context())
    assert compiled.policies == ["ccnp audit"] and not compiled.enforce_ingress
    assert {e.identity for e in compiled.entries} == {65537, 65538, 65539}, "every namespace of this cluster"


def test_several_specs_and_policies_are_unioned() -> None:
    text = (
        CNP
        + "  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]\n---\n"
        + NP
        + ("  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n")
    )
    assert {e.identity for e in entries(text)} == {65537, 65538}


# --- refused, with the field named


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (NP + "  bogus: 1\n", "spec.bogus", "unknown field"),
        (
            NP.replace("podSelector: {matchLabels: {app: web}}", "podSelector: {matchLabels: {app: 'we b'}}"),
            "spec.podSelector.matchLabels[app]",
            "not a valid label value",
        ),
        (
            NP + "  ingress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: Near}]}}]}]\n",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
            "must be one of",
        ),
        (
            NP + "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.300/8}}]}]\n",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "is not a CIDR",
        ),
        (
            NP + "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]\n",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "is not inside",
        ),
        (NP + "  ingress: [{ports: [{port: http}]}]\n", "spec.ingress[0].ports[0].port", "named ports"),
        (NP + "  ingress: [{ports: [{port: 90, endPort: 80}]}]\n", "spec.ingress[0].ports[0].endPort", "no lower"),
        (NP + "  policyTypes: [Sideways]\n", "spec.policyTypes[0]", "must be Ingress or Egress"),
        (CNP + "  egress: [{toFQDNs: [{matchName: example.com}]}]\n", "spec.egress[0].toFQDNs", "DNS-based"),
        (
            CNP + "  ingress: [{toPorts: [{ports: [{port: '80'}], rules: {http: [{}]}}]}]\n",
            "spec.ingress[0].toPorts[0].rules",
            "L7 rules",
        ),
        (CNP + "  ingress: [{fromEntities: [everyone]}]\n", "spec.ingress[0].fromEntities[0]", "not an entity"),
        (CNP + "  egress: [{toCIDR: [fd00::/8]}]\n", "spec.egress[0].toCIDR[0]", "IPv6"),
        (
            CNP + "  ingress: [{fromEndpoints: [{matchLabels: {reserved:host: ''}}]}]\n",
            "spec.ingress[0].fromEndpoints[0].matchLabels[reserved:host]",
            "entities",
        ),
        (
            CNP.replace("endpointSelector: {matchLabels: {app: web}}", "nodeSelector: {}"),
            "spec.nodeSelector",
            "host policies",
        ),
        (
            CNP + "  ingress: [{icmps: [{fields: [{type: Bogus}]}]}]\n",
            "spec.ingress[0].icmps[0].fields[0].type",
            "not an ICMP type",
        ),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n", "spec", "needs spec"),
    ],
)
def test_a_policy_that_cannot_be_enforced_as_written_is_refused(text: str, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policies(text)
    assert caught.value.field == field, caught.value
    assert words in caught.value.reason


def test_a_plan_writes_only_what_differs() -> None:
    from clustermesh.model.policycompile import plan

    changes = plan({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 9, "d": 4})
    assert changes.writes == {"b": 2, "c": 3}
    assert changes.deletes == ["d"]
    assert len(changes) == 3
    assert len(plan({"a": 1}, {"a": 1})) == 0
