"""Policy enforcement over the in-memory datapath: what the maps hold as pods, identities and policies come and go,
and what it costs (a pod of a known identity anywhere in the mesh: ipcache writes only)."""

from __future__ import annotations

import yaml

from agent.enforcement import CIDR_IDENTITY_BASE, Enforcer, LocalEndpoint
from agent.view import MergedView
from bpf.maps import EGRESS, INGRESS, EndpointSettings, IpcacheEntry
from bpf.testing import MemoryDatapath
from clustermesh.model import keys, wire
from clustermesh.model.admission import IdentityEntry
from clustermesh.model.kinds import kind_by_name
from clustermesh.model.labels import parse_label_string

CNP, NP = kind_by_name("CiliumNetworkPolicy"), kind_by_name("NetworkPolicy")
WEB_ID, CLIENT_ID, REMOTE_CLIENT_ID = 65537, 65538, 131073
TCP = 6


def identity(number: int, app: str, cluster: str, namespace: str = "shop") -> IdentityEntry:
    text = f"k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace={namespace};"
    return IdentityEntry(number, tuple(parse_label_string(text)), text)


def pod(ip: str, number: int, cluster: str, host: str) -> wire.IPIdentityPair:
    return wire.make_ip_pair(ip=ip, host_ip=host, identity=number, namespace="shop", pod_name=f"pod-{ip}")


def make() -> tuple[Enforcer, MergedView, MemoryDatapath]:
    view = MergedView("c1")
    view.upsert("c1", "identity", keys.identity_key(WEB_ID), identity(WEB_ID, "web", "c1"))
    view.upsert("c1", "identity", keys.identity_key(CLIENT_ID), identity(CLIENT_ID, "client", "c1"))
    view.upsert("c2", "identity", keys.identity_key(REMOTE_CLIENT_ID), identity(REMOTE_CLIENT_ID, "client", "c2"))
    view.upsert("c1", "ipcache", keys.ip_key("10.1.1.10"), pod("10.1.1.10", WEB_ID, "c1", "192.168.1.11"))
    view.upsert("c2", "ipcache", keys.ip_key("10.2.1.10"), pod("10.2.1.10", REMOTE_CLIENT_ID, "c2", "192.168.2.11"))
    node = wire.Node(
        Name="n1", Cluster="c2", ClusterID=2, IPAddresses=[wire.Address(Type="InternalIP", IP="192.168.2.11")]
    )
    view.upsert("c2", "node", keys.node_key("c2", "n1"), node)
    datapath = MemoryDatapath()
    enforcer = Enforcer(view, datapath, "c1", "c1/n1", host_addresses=["192.168.1.11", "10.1.1.1"])
    enforcer.resync_ipcache()
    return enforcer, view, datapath


WEB_LABELS = {"app": "web", "io.kubernetes.pod.namespace": "shop", "io.cilium.k8s.policy.cluster": "c1"}
WEB = LocalEndpoint(12, "lxcweb", "10.1.1.10", WEB_ID, WEB_LABELS, "shop", "web-1")

ALLOW_REMOTE_CLIENT = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")


def test_the_ipcache_holds_endpoints_nodes_and_this_nodes_addresses() -> None:
    _, _, datapath = make()
    assert datapath.ipcache.items() == {
        "10.1.1.10/32": IpcacheEntry(WEB_ID, "192.168.1.11"),
        "10.2.1.10/32": IpcacheEntry(REMOTE_CLIENT_ID, "192.168.2.11"),
        "192.168.2.11/32": IpcacheEntry(6, ""),  # another node: remote-node
        "192.168.1.11/32": IpcacheEntry(1, ""),  # this node: host
        "10.1.1.1/32": IpcacheEntry(1, ""),
    }


def test_an_endpoint_gets_its_maps_before_its_programs_and_policies_enforce_it() -> None:
    enforcer, _, datapath = make()
    enforcer.add_endpoint(WEB)
    assert datapath.attached == ["lxcweb"]
    assert datapath.endpoints.get(12) == EndpointSettings(WEB_ID, False, False), "no policy: allow everything"
    enforcer.on_upsert(CNP, ALLOW_REMOTE_CLIENT)
    enforcer.recompute()
    assert datapath.endpoints.get(12) == EndpointSettings(WEB_ID, True, False)
    policy = datapath.policy_map(12)
    assert policy.verdict(INGRESS, REMOTE_CLIENT_ID, TCP, 8080) is False
    assert policy.verdict(INGRESS, CLIENT_ID, TCP, 8080) is None, "the local client is not the c2 client"
    assert policy.verdict(INGRESS, REMOTE_CLIENT_ID, TCP, 8081) is None
    assert policy.verdict(EGRESS, REMOTE_CLIENT_ID, TCP, 8080) is None
    assert enforcer.compiled[12].policies == ["cnp shop/web"]
    enforcer.on_delete(CNP, ALLOW_REMOTE_CLIENT)
    enforcer.recompute()
    assert datapath.endpoints.get(12) == EndpointSettings(WEB_ID, False, False)
    assert policy.items() == {}, "a policy deleted: its entries are gone"


def test_a_new_pod_of_a_known_identity_anywhere_writes_the_ipcache_only() -> None:
    enforcer, view, datapath = make()
    enforcer.add_endpoint(WEB)
    enforcer.on_upsert(CNP, ALLOW_REMOTE_CLIENT)
    enforcer.recompute()
    before = (enforcer.counts.policy_writes, enforcer.counts.endpoint_writes, enforcer.counts.ipcache_writes)
    subscription = view.subscribe()
    for i in range(100):  # c2 scales its client deployment
        view.upsert(
            "c2", "ipcache", keys.ip_key(f"10.2.2.{i}"), pod(f"10.2.2.{i}", REMOTE_CLIENT_ID, "c2", "192.168.2.12")
        )
    enforcer.on_changes(list(subscription.pending))
    enforcer.recompute()
    assert (enforcer.counts.policy_writes, enforcer.counts.endpoint_writes) == before[:2], "no policy map write"
    assert enforcer.counts.ipcache_writes - before[2] == 100
    assert datapath.ipcache.lookup("10.2.2.7") == IpcacheEntry(REMOTE_CLIENT_ID, "192.168.2.12")


def test_a_new_identity_writes_only_its_own_entries() -> None:
    enforcer, view, datapath = make()
    enforcer.add_endpoint(WEB)
    enforcer.on_upsert(CNP, ALLOW_REMOTE_CLIENT)
    enforcer.recompute()
    writes = enforcer.counts.policy_writes
    newcomer = identity(REMOTE_CLIENT_ID + 1, "client", "c2")
    view.upsert("c2", "identity", keys.identity_key(newcomer.id), newcomer)
    enforcer.recompute()
    assert enforcer.counts.policy_writes - writes == 1
    assert datapath.policy_map(12).verdict(INGRESS, REMOTE_CLIENT_ID + 1, TCP, 8080) is False


def test_cidr_rules_get_cidr_identities_in_the_ipcache() -> None:
    enforcer, _, datapath = make()
    enforcer.add_endpoint(WEB)
    enforcer.on_upsert(NP, yaml.safe_load("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.16.5.0/24]}}]}]
"""))  # fmt: skip
    enforcer.recompute()
    cidr_id, except_id = CIDR_IDENTITY_BASE, CIDR_IDENTITY_BASE + 1
    assert datapath.ipcache.lookup("172.20.0.1") == IpcacheEntry(cidr_id, "")
    assert datapath.ipcache.lookup("172.16.5.1") == IpcacheEntry(except_id, "")
    policy = datapath.policy_map(12)
    assert policy.verdict(EGRESS, cidr_id, TCP, 443) is False and policy.verdict(EGRESS, except_id, TCP, 443) is None
    assert datapath.endpoints.get(12) == EndpointSettings(WEB_ID, False, True)


EXCEPT_A_POD = yaml.safe_load("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.2.1.10/32]}}]}]
""")


def test_a_cidr_naming_a_pod_never_takes_its_identity_and_a_pod_selected_by_address_is_allowed() -> None:
    enforcer, view, datapath = make()
    enforcer.add_endpoint(WEB)
    enforcer.on_upsert(NP, EXCEPT_A_POD)
    enforcer.recompute()
    assert datapath.ipcache.lookup("10.2.1.10") == IpcacheEntry(REMOTE_CLIENT_ID, "192.168.2.11"), "still the pod's"
    policy = datapath.policy_map(12)
    assert policy.verdict(INGRESS, REMOTE_CLIENT_ID, TCP, 80) is None, "its pod is in the exception"
    view.upsert("c1", "ipcache", keys.ip_key("10.1.1.20"), pod("10.1.1.20", CLIENT_ID, "c1", "192.168.1.11"))
    enforcer.recompute()
    assert policy.verdict(INGRESS, CLIENT_ID, TCP, 80) is False, "a pod inside the block: its identity allowed"
    enforcer.on_delete(NP, EXCEPT_A_POD)
    enforcer.recompute()
    assert datapath.ipcache.lookup("10.2.1.10") == IpcacheEntry(REMOTE_CLIENT_ID, "192.168.2.11"), "kept"
    assert datapath.ipcache.lookup("10.9.9.9") is None, "the CIDR identities are gone with their policy"


def test_a_policy_that_cannot_be_enforced_is_skipped_and_the_others_stay() -> None:
    enforcer, _, datapath = make()
    enforcer.add_endpoint(WEB)
    enforcer.on_upsert(CNP, ALLOW_REMOTE_CLIENT)
    broken = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: broken, namespace: shop}
spec: {endpointSelector: {}, egress: [{toFQDNs: [{matchName: example.com}]}]}
""")  # written to the store around apply (by hand, or by an older version)
    enforcer.on_upsert(CNP, broken)
    enforcer.recompute()
    assert "CiliumNetworkPolicy shop/broken" in enforcer.problems
    assert datapath.policy_map(12).verdict(INGRESS, REMOTE_CLIENT_ID, TCP, 8080) is False
    assert datapath.endpoints.get(12) == EndpointSettings(WEB_ID, True, False), "the broken one enforces nothing"


def test_a_node_that_goes_leaves_the_ipcache_and_an_endpoint_that_goes_its_maps() -> None:
    enforcer, view, datapath = make()
    enforcer.add_endpoint(WEB)
    subscription = view.subscribe()
    node = view.nodes["c2/n1"]
    view.delete("c2", "node", keys.node_key("c2", "n1"), node)
    view.delete("c2", "ipcache", keys.ip_key("10.2.1.10"), view.ipcache("10.2.1.10"))
    enforcer.on_changes(list(subscription.pending))
    assert datapath.ipcache.lookup("192.168.2.11") is None and datapath.ipcache.lookup("10.2.1.10") is None
    enforcer.remove_endpoint(12)
    assert datapath.endpoints.get(12) is None and 12 not in datapath.policies


def test_endpoints_are_remembered_across_a_restart(tmp_path: object) -> None:
    from pathlib import Path

    state = Path(str(tmp_path)) / "enforced.json"
    _, view, datapath = make()
    first = Enforcer(view, datapath, "c1", "c1/n1", state_file=state)
    first.add_endpoint(WEB)
    again = Enforcer(view, datapath, "c1", "c1/n1", state_file=state)
    assert again.endpoints == {12: WEB}


def test_policies_the_store_skipped_are_named_as_not_enforced() -> None:
    view = MergedView("c1")
    skipped = {"registry/ciliumnetworkpolicies/shop/broken": "not a valid CiliumNetworkPolicy: ...",
               "registry/ciliumclusterwidenetworkpolicies/wide": "not a valid CiliumClusterwideNetworkPolicy: ...",
               "registry/ciliumnodes/n1": "not a valid CiliumNode: ..."}  # fmt: skip
    enforcer = Enforcer(view, MemoryDatapath(), "c1", "c1/n1", skipped=lambda: skipped)
    enforcer.on_upsert(CNP, {**ALLOW_REMOTE_CLIENT, "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                                                            "ingress": [{"fromEndpointz": []}]}})  # fmt: skip
    assert set(enforcer.not_enforced()) == {
        "CiliumNetworkPolicy shop/broken",
        "CiliumNetworkPolicy shop/web",
        "CiliumClusterwideNetworkPolicy wide",
    }
