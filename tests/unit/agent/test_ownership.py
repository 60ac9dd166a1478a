"""Ownership of addresses in a running mesh of agents' stores (memory backends): what is held, admitted later,
taken back, and what a hijack attempt leaves of the view. The rules themselves: tests/unit/model/test_admission.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.mesh import Mesh
from agent.view import MergedView
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model import converters, keys, wire
from clustermesh.model.admission import Claimant
from clustermesh.model.clusters import ClusterInfo
from kvstore.backend import Backend, DeleteOp, PutOp
from kvstore.config import EtcdConfig
from kvstore.memory import MemoryBackend
from kvstore.syncing import rfc3339_now

C1 = ClusterInfo("c1", 1)
C2 = ClusterInfo("c2", 2)
PREFIXES = (keys.NODES_PREFIX, keys.IPCACHE_PREFIX, keys.IDENTITIES_PREFIX, keys.SERVICES_PREFIX)


def node(cluster: ClusterInfo, name: str, cidr: str, ip: str) -> wire.Node:
    return wire.Node(Name=name, Cluster=cluster.name, ClusterID=cluster.id, IPv4AllocCIDR=wire.ip_net(cidr),
                     IPAddresses=[wire.Address(Type="InternalIP", IP=ip)])  # fmt: skip


def endpoint(cluster: ClusterInfo, ip: str) -> PutOp:
    return PutOp(keys.ip_key(ip), wire.encode(wire.IPIdentityPair(IP=ip, ID=(cluster.id << 16) + 1)))


def put_node(value: wire.Node) -> PutOp:
    return PutOp(keys.node_key(value.Cluster, value.Name), wire.encode(value))


async def publish(backend: MemoryBackend, cluster: ClusterInfo, *ops: PutOp) -> None:
    """A cluster as its apiserver leaves it: cluster-config, heartbeat, the state, every canary."""
    await backend.commit(
        [
            PutOp(keys.cluster_config_key(cluster.name), wire.encode(converters.cluster_config(cluster))),
            PutOp(keys.HEARTBEAT_KEY, rfc3339_now().encode()),
            *ops,
            *(PutOp(keys.synced_key(cluster.name, prefix), rfc3339_now().encode()) for prefix in PREFIXES),
        ]
    )


@dataclass
class Running:
    mesh: Mesh
    backends: dict[str, MemoryBackend]

    @property
    def view(self) -> MergedView:
        return self.mesh.view

    async def until(self, condition: Callable[[Running], bool], timeout: float = 5.0) -> None:
        """Until `condition` holds, checked after each change of the view or the status."""
        subscription = self.view.subscribe()
        try:
            async with asyncio.timeout(timeout):
                while not condition(self):
                    self.mesh.changed.clear()
                    waiters = [
                        asyncio.ensure_future(subscription.get()),
                        asyncio.ensure_future(self.mesh.changed.wait()),
                    ]
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        await cancel_and_wait(waiters)
        finally:
            subscription.close()

    def rejected(self, cluster: str) -> dict[str, str]:
        return dict(self.mesh.remotes[cluster].rejected_reasons())


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    backends = {"c1": MemoryBackend(), "c2": MemoryBackend()}
    config_dir = tmp_path / "remotes"
    config_dir.mkdir()
    (config_dir / "c2").write_text(
        "endpoints: [https://c2.test:2379]\ntrusted-ca-file: ca\ncert-file: c\nkey-file: k\n"
    )

    async def connect(config: EtcdConfig) -> Backend:
        return backends[config.parsed[0].host.split(".")[0]]

    await publish(backends["c1"], C1)
    await publish(backends["c2"], C2)
    mesh = Mesh(
        C1,
        EtcdConfig(["https://c1.test:2379"], Path("ca"), Path("c"), Path("k")),
        config_dir,
        node_name="n1",
        connect=connect,
        scan_interval=0.01,
        own_node=node(C1, "n1", "10.1.1.0/24", "192.168.1.11"),
    )
    task = asyncio.create_task(mesh.run())
    try:
        yield Running(mesh, backends)
    finally:
        await cancel_and_wait([task])


async def test_an_endpoint_before_its_node_is_held_then_admitted(running: Running) -> None:
    c2 = running.backends["c2"]
    await c2.commit([endpoint(C2, "10.2.1.10")])
    await running.until(lambda r: keys.ip_key("10.2.1.10") in r.rejected("c2"))
    assert running.view.ipcache("10.2.1.10") is None
    assert running.rejected("c2")[keys.ip_key("10.2.1.10")].startswith("address not owned")
    await c2.commit([put_node(node(C2, "n1", "10.2.1.0/24", "192.168.2.11"))])
    await running.until(lambda r: r.view.ipcache("10.2.1.10") is not None)
    assert running.rejected("c2") == {}, "admitted: no longer named as rejected"


async def test_a_node_that_goes_takes_its_endpoints_with_it(running: Running) -> None:
    c2 = running.backends["c2"]
    await c2.commit([put_node(node(C2, "n1", "10.2.1.0/24", "192.168.2.11")), endpoint(C2, "10.2.1.10")])
    await running.until(lambda r: r.view.ipcache("10.2.1.10") is not None)
    await c2.commit([DeleteOp(keys.node_key("c2", "n1"))])
    await running.until(lambda r: r.view.ipcache("10.2.1.10") is None)
    assert "c2/n1" not in running.view.nodes
    assert running.rejected("c2")[keys.ip_key("10.2.1.10")].startswith("address not owned")
    # the same addresses claimed by another cluster's node are not shadowed by c2's stale endpoint
    assert running.mesh.ownership.owner("10.2.1.10") is None


async def test_the_local_cluster_takes_back_what_a_remote_claimed_first(running: Running) -> None:
    c1, c2 = running.backends["c1"], running.backends["c2"]
    await c2.commit([put_node(node(C2, "n7", "10.1.2.0/24", "192.168.2.17")), endpoint(C2, "10.1.2.10")])
    await running.until(lambda r: r.view.ipcache("10.1.2.10") is not None and "c2/n7" in r.view.nodes)
    # c1's second node comes up with the pod CIDR it was given: c2 took it first, c1 wins it back
    await c1.commit([put_node(node(C1, "n2", "10.1.2.0/24", "192.168.1.12"))])
    await running.until(lambda r: "c2/n7" not in r.view.nodes and r.view.ipcache("10.1.2.10") is None)
    assert "c1/n2" in running.view.nodes
    assert running.mesh.ownership.owner("10.1.2.10") == Claimant("c1", "n2")
    reasons = running.rejected("c2")
    assert reasons[keys.node_key("c2", "n7")].startswith("pod CIDR conflict: 10.1.2.0/24 overlaps a pod CIDR of c1/n2")
    assert reasons[keys.ip_key("10.1.2.10")].startswith("address not owned: 10.1.2.10 belongs to c1/n2")


async def test_a_remote_cannot_take_this_nodes_cidr_even_before_the_local_etcd_answers(running: Running) -> None:
    c2 = running.backends["c2"]
    await c2.commit([put_node(node(C2, "thief", "10.1.1.0/25", "192.168.2.66")), endpoint(C2, "10.1.1.9")])
    await running.until(lambda r: keys.ip_key("10.1.1.9") in r.rejected("c2"))
    assert "c2/thief" not in running.view.nodes and running.view.ipcache("10.1.1.9") is None
    assert running.rejected("c2")[keys.node_key("c2", "thief")].startswith("pod CIDR conflict: 10.1.1.0/25")
    assert running.mesh.status().clusters[1].rejected == {"nodes": 1, "endpoints": 1}
