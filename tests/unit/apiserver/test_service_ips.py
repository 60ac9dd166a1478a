"""The ClusterIP allocator over the standalone store: Services without an address get the next free one, once
every Service is listed; addresses in use are never given twice; a deleted Service frees its address."""

from __future__ import annotations

import asyncio
from typing import Any

from apiserver.serviceips import SERVICE, ServiceIPAllocator
from clustermesh.resources.informing import Informer
from clustermesh.resources.standalone import StandaloneStore
from kvstore.memory import MemoryBackend
from kvstore.testing import eventually


def service(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": [{"port": 80}], **spec}}  # fmt: skip


async def cluster_ips(store: StandaloneStore) -> dict[str, str | None]:
    listed = await store.list(SERVICE)
    return {obj["metadata"]["name"]: obj["spec"].get("clusterIP") for obj in listed.items}


async def until(check: Any) -> None:
    async def holds() -> None:
        assert await check()

    await eventually(holds, timeout=5, interval=0.01)


async def test_services_get_free_addresses_and_keep_them() -> None:
    store = StandaloneStore(MemoryBackend())
    await store.create(service("old", clusterIP="10.96.1.2"))  # given before a restart
    await store.create(service("headless", clusterIP="None"))
    await store.create(service("web"))
    allocator = ServiceIPAllocator(store, "10.96.1.0/29")
    informer = Informer(store, SERVICE, allocator)
    tasks = [asyncio.create_task(informer.run()), asyncio.create_task(allocator.run(informer.synced))]
    try:
        await until(lambda: _equals(store, {"old": "10.96.1.2", "headless": "None", "web": "10.96.1.3"}))
        await store.create(service("api"))
        await until(lambda: _equals(store, {"old": "10.96.1.2", "headless": "None", "web": "10.96.1.3",
                                            "api": "10.96.1.4"}))  # fmt: skip
        for name in ("a", "b", "c"):  # .5 and .6 left: the third waits
            await store.create(service(name))
        await until(lambda: _count(store, 6))  # headless counts: it has its None
        assert (await cluster_ips(store))["c"] is None and allocator.failures.labels("exhausted")._value.get() == 1
        await store.delete(SERVICE, "old", "shop")
        await until(lambda: _has(store, "c", "10.96.1.2"))  # the freed address goes to the one waiting
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _equals(store: StandaloneStore, wanted: dict[str, str]) -> bool:
    return await cluster_ips(store) == wanted


async def _count(store: StandaloneStore, given: int) -> bool:
    return sum(ip is not None for ip in (await cluster_ips(store)).values()) == given


async def _has(store: StandaloneStore, name: str, ip: str) -> bool:
    return (await cluster_ips(store)).get(name) == ip
