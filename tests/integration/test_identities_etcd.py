"""Two agents allocating identities for the same label sets at once, each over its own connection to a real etcd."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from agent.identities import CILIUM_IDENTITY, IdentityAllocator
from clustermesh.model.clusters import ClusterInfo
from clustermesh.resources.standalone import StandaloneStore
from tests.integration.conftest import EtcdCluster


async def test_two_agents_racing_end_with_exactly_one_identity_per_label_set(etcd_cluster: EtcdCluster) -> None:
    backends = [await etcd_cluster.connect(), await etcd_cluster.connect()]
    try:
        cluster = ClusterInfo("c1", 1)
        registries = CollectorRegistry(), CollectorRegistry()
        one, two = (
            IdentityAllocator(StandaloneStore(backend), cluster, registry=registry)
            for backend, registry in zip(backends, registries, strict=True)
        )
        label_sets = [{"app": f"app-{i}", "tier": ("front", "back")[i % 2]} for i in range(50)]
        results = await asyncio.gather(
            *(one.allocate(labels, "shop") for labels in label_sets),
            *(two.allocate(labels, "shop") for labels in reversed(label_sets)),
        )
        by_one = results[:50]
        by_two = results[50:][::-1]
        assert by_one == by_two, "both agents got the same identity for every label set"
        assert len(set(by_one)) == 50

        stored = (await StandaloneStore(backends[0]).list(CILIUM_IDENTITY)).items
        assert sorted(int(obj["metadata"]["name"]) for obj in stored) == sorted(by_one)
        labels_by_id = {int(obj["metadata"]["name"]): obj["security-labels"]["k8s:app"] for obj in stored}
        assert [labels_by_id[number] for number in by_one] == [labels["app"] for labels in label_sets]
        created = sum(
            registry.get_sample_value("clustermesh_identity_allocations_total", {"outcome": "created"}) or 0
            for registry in registries
        )
        assert created == 50
    finally:
        for backend in backends:
            await backend.close()
