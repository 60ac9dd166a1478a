from __future__ import annotations

import asyncio

from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.standalone import StandaloneStore, registry_key
from clustermesh.resources.testing import check_gone, check_store, node
from kvstore.memory import MemoryBackend

CILIUM_NODE = kind_by_name("CiliumNode")


async def test_standalone_store_honours_the_contract() -> None:
    await check_store(StandaloneStore(MemoryBackend()))


async def test_objects_live_under_registry_like_kube_apiserver() -> None:
    backend = MemoryBackend()
    store = StandaloneStore(backend)
    await store.create(node("n1"))
    await store.create(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {}}
    )
    assert backend.keys() == ["registry/ciliumnodes/n1", "registry/services/shop/web"]
    entry = await backend.get("registry/ciliumnodes/n1")
    assert entry is not None and b"resourceVersion" not in entry.value, "the resourceVersion is etcd's, not stored"


async def test_a_compacted_resource_version_is_gone() -> None:
    backend = MemoryBackend()
    store = StandaloneStore(backend)
    old = (await store.list(CILIUM_NODE)).resource_version
    await store.create(node("n1"))
    await store.create(node("n2"))
    await backend.compact(int((await store.list(CILIUM_NODE)).resource_version))
    await check_gone(store, CILIUM_NODE, old)


async def test_a_malformed_stored_object_is_skipped_and_named_without_stopping_the_others() -> None:
    backend = MemoryBackend()
    store = StandaloneStore(backend)
    await store.create(node("good-1"))
    await backend.put(registry_key(CILIUM_NODE, "garbage"), b"{not json")
    await backend.put(registry_key(CILIUM_NODE, "bad-ip"), b'{"metadata":{"name":"bad-ip"},"spec":{"addresses":[1]}}')
    await store.create(node("good-2"))
    listing = await store.list(CILIUM_NODE)
    assert [item["metadata"]["name"] for item in listing.items] == ["good-1", "good-2"]
    assert set(store.skipped) == {"registry/ciliumnodes/garbage", "registry/ciliumnodes/bad-ip"}
    assert "spec.addresses[0]" in store.skipped["registry/ciliumnodes/bad-ip"]

    stream = store.watch(CILIUM_NODE, listing.resource_version)
    await backend.put(registry_key(CILIUM_NODE, "garbage-2"), b"[]")
    await store.create(node("good-3"))
    event = await asyncio.wait_for(anext(stream), 5)
    await stream.aclose()  # type: ignore[attr-defined]
    assert (event.type, event.object["metadata"]["name"]) == ("ADDED", "good-3")
    assert "registry/ciliumnodes/garbage-2" in store.skipped


async def test_a_service_keeps_its_cluster_ip_through_an_update_and_cannot_change_it() -> None:
    import pytest

    from clustermesh.resources.store import Invalid
    from clustermesh.resources.writing import create_or_update

    store = StandaloneStore(MemoryBackend())
    manifest = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ports": [{"port": 80}]}}  # fmt: skip
    created = await store.create(manifest)
    await store.update({**created, "spec": {"ports": [{"port": 80}], "clusterIP": "10.96.1.2"}})  # the allocator
    _, applied = await create_or_update(store, {**manifest, "spec": {"ports": [{"port": 8080}]}})  # applied again
    assert applied["spec"] == {"ports": [{"port": 8080}], "clusterIP": "10.96.1.2"}
    with pytest.raises(Invalid, match=r"spec\.clusterIP: field is immutable"):
        await create_or_update(store, {**manifest, "spec": {"ports": [{"port": 80}], "clusterIP": "10.96.1.9"}})
