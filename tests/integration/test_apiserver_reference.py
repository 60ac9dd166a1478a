"""Cilium's clustermesh-apiserver test scripts (nodes, endpoints, identities, cluster-config, service sync),
reproduced as the project's own tests: the same objects in, the same etcd keys and JSON out, byte for byte.

Every test runs twice: over the standalone store (objects in etcd's `registry/`) and over the Kubernetes stand-in
(objects in a small API server that speaks Kubernetes' list/watch protocol). The vectors were written out by hand
from the reference scripts; the scripts are not read at test time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from kubernetes.client import Configuration

from clustermesh.lab.standin import StandinAPIServer
from clustermesh.resources.kubernetes import KubernetesStore
from clustermesh.resources.standalone import StandaloneStore
from kvstore import etcd
from kvstore.backend import PutOp
from tests.integration.apiserver_env import Bench, bench
from tests.integration.conftest import EtcdCluster

# --- inputs (from the reference scripts)

NODE_1 = """
apiVersion: cilium.io/v2
kind: CiliumNode
metadata:
  name: test-node-1
  labels:
    kubernetes.io/hostname: test-node-1
  annotations:
    network.cilium.io/wg-pub-key: VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI=
spec:
  addresses:
  - {ip: 172.18.0.2, type: InternalIP}
  - {ip: "fc00:c111::2", type: InternalIP}
  - {ip: 10.244.0.10, type: CiliumInternalIP}
  - {ip: "fd00:10:244::e2d6", type: CiliumInternalIP}
  bootid: 570d3fd1-93db-4862-ba99-6a3c2c10c38f
  health: {ipv4: HEALTH_IP, ipv6: "fd00:10:244::d812"}
  ipam:
    podCIDRs: [10.244.0.0/24, "fd00:10:244::/64"]
"""
NODE_2 = """
apiVersion: cilium.io/v2
kind: CiliumNode
metadata:
  name: test-node-2
  labels:
    kubernetes.io/hostname: test-node-2
spec:
  addresses:
  - {ip: 172.18.0.3, type: InternalIP}
  - {ip: "fc00:c111::3", type: InternalIP}
  - {ip: 10.244.1.130, type: CiliumInternalIP}
  - {ip: "fd00:10:244:1::9089", type: CiliumInternalIP}
  bootid: c1d2cda2-aca0-4033-abca-3843298860b9
  encryption: {key: 7}
  health: {ipv4: 10.244.1.153, ipv6: "fd00:10:244:1::835d"}
  ipam:
    podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]
"""


def node_1_expected(health_ip: str) -> bytes:
    return (
        b'{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},'
        b'{"Type":"InternalIP","IP":"fc00:c111::2"},{"Type":"CiliumInternalIP","IP":"10.244.0.10"},'
        b'{"Type":"CiliumInternalIP","IP":"fd00:10:244::e2d6"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},'
        b'"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="},'
        b'"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"' + health_ip.encode() + b'",'
        b'"IPv6HealthIP":"fd00:10:244::d812",'
        b'"IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,'
        b'"Labels":{"kubernetes.io/hostname":"test-node-1"},'
        b'"Annotations":{"network.cilium.io/wg-pub-key":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI="},'
        b'"NodeIdentity":0,"WireguardPubKey":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI=",'
        b'"BootID":"570d3fd1-93db-4862-ba99-6a3c2c10c38f"}'
    )


NODE_2_EXPECTED = (
    b'{"Name":"test-node-2","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.3"},'
    b'{"Type":"InternalIP","IP":"fc00:c111::3"},{"Type":"CiliumInternalIP","IP":"10.244.1.130"},'
    b'{"Type":"CiliumInternalIP","IP":"fd00:10:244:1::9089"}],"IPv4AllocCIDR":{"IP":"10.244.1.0","Mask":"////AA=="},'
    b'"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244:1::","Mask":"//////////8AAAAAAAAAAA=="},'
    b'"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.1.153","IPv6HealthIP":"fd00:10:244:1::835d",'
    b'"IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":7,'
    b'"Labels":{"kubernetes.io/hostname":"test-node-2"},"Annotations":null,"NodeIdentity":0,"WireguardPubKey":"",'
    b'"BootID":"c1d2cda2-aca0-4033-abca-3843298860b9"}'
)


def namespace(name: str, global_: str | None = None) -> str:
    annotations = f'\n  annotations:\n    clustermesh.cilium.io/global: "{global_}"' if global_ else ""
    return f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{annotations}\n"


def endpoint(name: str, ns: str, ipv4: str, ipv6: str | None, node: str, identity: int, key: int | None = None) -> str:
    encryption = f"\n  encryption:\n    key: {key}" if key is not None else ""
    v6 = f'\n      ipv6: "{ipv6}"' if ipv6 else ""
    return f"""
apiVersion: cilium.io/v2
kind: CiliumEndpoint
metadata:
  name: {name}
  namespace: {ns}
status:{encryption}
  id: 1481
  identity:
    id: {identity}
    labels: [k8s:app=bar]
  networking:
    addressing:
    - ipv4: {ipv4}{v6}
    node: {node}
  service-account: default
  state: ready
"""


def ip_entry(ip: str, host: str, identity: int, key: int, ns: str, pod: str) -> tuple[str, bytes]:
    value = (
        f'{{"IP":"{ip}","Mask":null,"HostIP":"{host}","ID":{identity},"Key":{key},"Metadata":"",'
        f'"K8sNamespace":"{ns}","K8sPodName":"{pod}","K8sServiceAccount":"default"}}'
    )
    return f"cilium/state/ip/v1/default/{ip}", value.encode()


def identity(name: str, app: str, ns: str) -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumIdentity
metadata:
  name: "{name}"
security-labels:
  k8s:app: {app}
  k8s:io.cilium.k8s.policy.cluster: cluster3
  k8s:io.kubernetes.pod.namespace: {ns}
"""


def identity_entry(name: str, app: str, ns: str) -> tuple[str, bytes]:
    value = f"k8s:app={app};k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace={ns};"
    return f"cilium/state/identities/v1/id/{name}", value.encode()


SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: test
  annotations:
    service.cilium.io/global: "GLOBAL"
    SHARED_KEY: "SHARED"
spec:
  clusterIP: 10.96.50.104
  clusterIPs: [10.96.50.104]
  ports:
  - {name: PORTNAME, port: 80, protocol: TCP, targetPort: TARGET}
  selector: {name: echo}
  type: ClusterIP
"""
SLICE = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  labels: {kubernetes.io/service-name: echo}
  name: echo-kvlm2
  namespace: test
addressType: IPv4
endpoints:
- addresses: [BACKEND]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: nodeport-worker
  zone: zone1
  hints:
    forZones: [{name: zone1}]
- addresses: [10.244.1.2]
  conditions: {ready: false, serving: false, terminating: false}
  nodeName: nodeport-worker
ports:
- {name: PORTNAME, port: TARGET, protocol: TCP}
"""


def service(global_: str = "true", shared: str = "true", shared_key: str = "service.cilium.io/shared",
            port_name: str = "http", target: int = 8080) -> str:  # fmt: skip
    name = f"{port_name}" if port_name else '""'
    return (
        SERVICE.replace("GLOBAL", global_)
        .replace("SHARED_KEY", shared_key)
        .replace("SHARED", shared)
        .replace("PORTNAME", name)
        .replace("TARGET", str(target))
    )


def endpoint_slice(backend: str = "10.244.1.1", port_name: str = "http", target: int = 8080) -> str:
    name = f"{port_name}" if port_name else '""'
    return SLICE.replace("BACKEND", backend).replace("PORTNAME", name).replace("TARGET", str(target))


SERVICE_KEY = "cilium/state/services/v1/cluster3/test/echo"


def service_expected(backend: str | None = None, port: int = 8080, port_name: str = "http") -> bytes:
    frontends = f'{{"10.96.50.104":{{"{port_name}":{{"Protocol":"TCP","Port":80}}}}}}'
    if backend is None:
        backends = "{}"
        zones = ""
    else:
        backends = f'{{"{backend}":{{"{port_name}":{{"Protocol":"TCP","Port":{port}}}}}}}'
        zones = f',"zones":{{"{backend}":{{"zone":"zone1","forZones":[{{"name":"zone1"}}]}}}}'
    return (
        f'{{"cluster":"cluster3","namespace":"test","name":"echo","frontends":{frontends},"backends":{backends}'
        f'{zones},"labels":{{}},"selector":{{"name":"echo"}},"includeExternal":true,"shared":true,"clusterID":3}}'
    ).encode()


# --- the two sources


@pytest.fixture
def standin() -> Iterator[StandinAPIServer]:
    """Name: standin. Scope: function. A fresh stand-in Kubernetes API server (no Kubernetes can run here)."""
    with StandinAPIServer() as server:
        yield server


@pytest.fixture(params=["standalone", "kubernetes"])
async def env(request: pytest.FixtureRequest, etcd_cluster: EtcdCluster) -> AsyncIterator[Bench]:
    make: Callable[[etcd.EtcdBackend], Any] = StandaloneStore
    server = None
    if request.param == "kubernetes":
        server = request.getfixturevalue("standin")

        def make(backend: etcd.EtcdBackend) -> Any:
            return KubernetesStore(Configuration(host=server.url))

    async with bench(etcd_cluster, make) as running:
        running.standin = server
        yield running


# --- the scripts


async def test_ciliumnodes(env: Bench) -> None:
    await env.start_apiserver()
    await env.apply(NODE_1.replace("HEALTH_IP", "10.244.0.134") + "---" + NODE_2)
    prefix = "cilium/state/nodes/v1/cluster3/"
    await env.wait_keys(
        prefix, {prefix + "test-node-1": node_1_expected("10.244.0.134"), prefix + "test-node-2": NODE_2_EXPECTED}
    )
    assert "cilium/synced/cluster3/cilium/state/nodes/v1" in env.keys("cilium/synced/")

    await env.apply(NODE_1.replace("HEALTH_IP", "10.244.0.135"))
    await env.wait_keys(
        prefix, {prefix + "test-node-1": node_1_expected("10.244.0.135"), prefix + "test-node-2": NODE_2_EXPECTED}
    )
    await env.delete(NODE_2)
    await env.wait_keys(prefix, {prefix + "test-node-1": node_1_expected("10.244.0.135")})


async def test_ciliumendpoints(env: Bench) -> None:
    await env.start_apiserver()
    await env.apply(namespace("foo") + "---" + namespace("bar"))
    ep1 = endpoint("cep-001", "foo", "10.244.1.79", "fd00:10:244:1::d643", "172.18.0.3", 199472)
    ep2 = endpoint("cep-002", "bar", "10.244.2.74", "fd00:10:244:2::e024", "172.18.0.2", 199475, key=5)
    await env.apply(ep1 + "---" + ep2)
    prefix = "cilium/state/ip/v1/"
    e1 = [
        ip_entry("10.244.1.79", "172.18.0.3", 199472, 0, "foo", "cep-001"),
        ip_entry("fd00:10:244:1::d643", "172.18.0.3", 199472, 0, "foo", "cep-001"),
    ]
    e2 = [
        ip_entry("10.244.2.74", "172.18.0.2", 199475, 5, "bar", "cep-002"),
        ip_entry("fd00:10:244:2::e024", "172.18.0.2", 199475, 5, "bar", "cep-002"),
    ]
    await env.wait_keys(prefix, dict(e1 + e2))
    assert "cilium/synced/cluster3/cilium/state/ip/v1" in env.keys("cilium/synced/")

    # Update: a new IPv4 and no IPv6 any more.
    await env.apply(endpoint("cep-001", "foo", "10.244.1.80", None, "172.18.0.3", 199472))
    e1v2 = [ip_entry("10.244.1.80", "172.18.0.3", 199472, 0, "foo", "cep-001")]
    await env.wait_keys(prefix, dict(e1v2 + e2))

    ep3 = endpoint("cep-002", "foo", "10.244.2.91", "fd00:10:244:2::e4b4", "172.18.0.2", 199472)
    await env.apply(ep3)
    e3 = [
        ip_entry("10.244.2.91", "172.18.0.2", 199472, 0, "foo", "cep-002"),
        ip_entry("fd00:10:244:2::e4b4", "172.18.0.2", 199472, 0, "foo", "cep-002"),
    ]
    await env.wait_keys(prefix, dict(e1v2 + e2 + e3))
    await env.delete(ep2)
    await env.wait_keys(prefix, dict(e1v2 + e3))
    await env.apply(namespace("foo", global_="false"))
    await env.wait_keys(prefix, {})


async def test_ciliumidentities(env: Bench) -> None:
    await env.start_apiserver()
    await env.apply(namespace("foo") + "---" + namespace("bar"))
    await env.apply(identity("196915", "baz", "bar") + "---" + identity("199472", "baz", "foo"))
    prefix = "cilium/state/identities/v1/"
    await env.wait_keys(prefix, dict([identity_entry("196915", "baz", "bar"), identity_entry("199472", "baz", "foo")]))
    assert "cilium/synced/cluster3/cilium/state/identities/v1" in env.keys("cilium/synced/")

    await env.apply(identity("196915", "fred", "bar"))
    await env.wait_keys(prefix, dict([identity_entry("196915", "fred", "bar"), identity_entry("199472", "baz", "foo")]))
    await env.apply(identity("214794", "baz", "bar"))
    one_and_three = dict([identity_entry("196915", "fred", "bar"), identity_entry("214794", "baz", "bar")])
    await env.wait_keys(prefix, {**one_and_three, **dict([identity_entry("199472", "baz", "foo")])})
    await env.delete(identity("199472", "baz", "foo"))
    await env.wait_keys(prefix, one_and_three)
    await env.apply(namespace("bar", global_="false"))
    await env.wait_keys(prefix, {})
    await env.apply(namespace("bar"))
    await env.wait_keys(prefix, one_and_three)


CONFIG_KEY = "cilium/cluster-config/cluster3"
CONFIG = b'{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}'


async def test_cluster_config_is_created_and_enforced(env: Bench) -> None:
    await env.start_apiserver()
    await env.wait_keys("cilium/cluster-config/", {CONFIG_KEY: CONFIG})
    await env.backend.put(CONFIG_KEY, CONFIG.replace(b'"id":3', b'"id":5'))
    await env.wait_for(lambda state: state.get(CONFIG_KEY) == CONFIG.replace(b'"id":3', b'"id":5'))
    await env.wait_keys("cilium/cluster-config/", {CONFIG_KEY: CONFIG})
    await env.backend.delete(CONFIG_KEY)
    await env.wait_for(lambda state: CONFIG_KEY not in state)
    await env.wait_keys("cilium/cluster-config/", {CONFIG_KEY: CONFIG})


async def test_service_sync(env: Bench) -> None:
    await env.start_apiserver()
    prefix = "cilium/state/services/"
    # 1. the service before its endpoint slice
    await env.apply(service())
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected()})
    assert "cilium/synced/cluster3/cilium/state/services/v1" in env.keys("cilium/synced/")
    # 2. the endpoint slice: ready backends only, with their zone
    await env.apply(endpoint_slice())
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected("10.244.1.1")})
    # 3. backend IPs change
    await env.apply(endpoint_slice("10.244.2.2"))
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected("10.244.2.2")})
    # 4. the backend port changes
    await env.apply(service(target=9090) + "---" + endpoint_slice("10.244.2.2", target=9090))
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected("10.244.2.2", 9090)})
    # 5. the slice goes: no backends
    await env.delete(endpoint_slice("10.244.2.2", target=9090))
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected()})
    # 6. the service goes
    await env.delete(service(target=9090))
    await env.wait_keys(prefix, {})
    # 7-8. the slice before the service: nothing until the service exists
    await env.apply(endpoint_slice("10.244.2.2", target=9090))
    await env.apply(service(target=9090))
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected("10.244.2.2", 9090)})
    # 9. not global any more: gone
    await env.apply(service(global_="false", target=9090))
    await env.wait_keys(prefix, {})
    # 10. global again, without the shared annotation (shared by default)
    await env.apply(service(shared_key="placeholder", target=9090))
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected("10.244.2.2", 9090)})
    # 11. explicitly not shared: gone
    await env.apply(service(shared="false", target=9090))
    await env.wait_keys(prefix, {})
    # 12. unnamed ports
    await env.apply(service(port_name="", target=9090) + "---" + endpoint_slice("10.244.2.2", "", 9090))
    await env.wait_keys(prefix, {SERVICE_KEY: service_expected("10.244.2.2", 9090, port_name="")})


async def test_namespace_annotation_hides_services_too(env: Bench) -> None:
    """DESIGN section 3: only global namespaces are exported; a missing Namespace object counts as global."""
    await env.start_apiserver()
    await env.apply(service() + "---" + endpoint_slice())
    await env.wait_keys("cilium/state/services/", {SERVICE_KEY: service_expected("10.244.1.1")})
    await env.apply(namespace("test", global_="false"))
    await env.wait_keys("cilium/state/services/", {})
    await env.apply(namespace("test", global_="true"))
    await env.wait_keys("cilium/state/services/", {SERVICE_KEY: service_expected("10.244.1.1")})


# --- restarts and bad objects


async def test_restart_under_a_live_reader_deletes_nothing(env: Bench) -> None:
    await env.start_apiserver()
    await env.apply(NODE_2 + "---" + identity("196915", "baz", "bar") + "---" + service() + "---" + endpoint_slice())
    await env.wait_for(
        lambda state: (
            len([k for k in state if k.startswith("cilium/state/")]) == 3
            and state.get(SERVICE_KEY) == service_expected("10.244.1.1")
        )
    )
    before = {k: v for k, v in env.recorder.state.items() if k.startswith("cilium/state/")}
    env.recorder.clear()
    await env.stop_apiserver()
    apiserver = await env.start_apiserver()
    await env.fence()  # the reader has seen all the restarted apiserver wrote (and deleted) while getting ready
    assert env.recorder.deletes() == [], "a restarted apiserver must not make readers see deletes"
    assert {k: v for k, v in env.recorder.state.items() if k.startswith("cilium/state/")} == before
    # and every key is on the new apiserver's leases: none is left to vanish with the old one's
    listing = await env.backend.list_prefix("cilium/state/")
    assert listing.entries and all(apiserver.leases.owns(entry.lease) for entry in listing.entries), [
        (entry.key, entry.lease) for entry in listing.entries
    ]


async def test_restart_after_deletes_while_down_removes_exactly_those(env: Bench) -> None:
    await env.start_apiserver()
    await env.apply(namespace("foo"))
    eps = [endpoint(f"cep-{i}", "foo", f"10.244.3.{i}", None, "172.18.0.2", 199472) for i in range(1, 5)]
    await env.apply("---".join(eps))
    await env.apply(NODE_1.replace("HEALTH_IP", "10.244.0.134") + "---" + NODE_2)
    await env.wait_for(lambda state: len([k for k in state if k.startswith("cilium/state/ip/")]) == 4)
    await env.wait_for(lambda state: len([k for k in state if k.startswith("cilium/state/nodes/")]) == 2)
    await env.stop_apiserver()
    await env.delete(eps[1] + "---" + eps[3] + "---" + NODE_2)
    env.recorder.clear()
    await env.start_apiserver()
    await env.wait_for(lambda state: len([k for k in state if k.startswith("cilium/state/")]) == 3)
    assert sorted(env.recorder.deletes()) == [
        "cilium/state/ip/v1/default/10.244.3.2",
        "cilium/state/ip/v1/default/10.244.3.4",
        "cilium/state/nodes/v1/cluster3/test-node-2",
    ]


async def test_a_malformed_object_in_the_store_does_not_stop_the_others(env: Bench) -> None:
    await env.start_apiserver()
    if isinstance(env.store, StandaloneStore):
        await env.backend.commit([PutOp("registry/ciliumnodes/broken", b'{"kind":"CiliumNode","spec":"x"}')])
    else:
        assert env.standin is not None
        env.standin.put_raw({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "broken"},
                        "spec": {"addresses": "not-a-list"}})  # fmt: skip
    await env.apply(NODE_2)
    prefix = "cilium/state/nodes/v1/cluster3/"
    await env.wait_keys(prefix, {prefix + "test-node-2": NODE_2_EXPECTED})
