"""After the cluster's etcd is wiped and brought back, the agent notices its own objects are gone and writes them
again at once: its CiliumNode, and the CiliumEndpoint of every pod it hosts (also across an agent restart)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from agent.endpoints import EndpointKeeper, EndpointManager, EndpointRequest
from agent.publishing import NodePublisher, NodeSpec
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.standalone import StandaloneStore
from kvstore.memory import MemoryBackend
from kvstore.testing import eventually

CILIUM_NODE, CILIUM_ENDPOINT = kind_by_name("CiliumNode"), kind_by_name("CiliumEndpoint")
SPEC = NodeSpec(name="n1", internal_ips=["192.168.1.11"], pod_cidrs=["10.1.1.0/24"])


class Counting:
    """An allocator that hands out numbers in order: a wiped cluster allocates its identities anew."""

    def __init__(self) -> None:
        self.next = 65536 + 256

    async def allocate(self, labels: Mapping[str, str], namespace: str) -> int:
        self.next += 1
        return self.next


async def until(check: Callable[[], Awaitable[object]], timeout: float = 5.0) -> None:
    """Until `check` gives something true: the store is changed by tasks of the agent, not by the test."""

    async def holds() -> None:
        assert await check()

    await eventually(holds, timeout=timeout, interval=0.01)


async def test_the_node_is_published_again_at_once_after_a_wipe() -> None:
    backend = MemoryBackend()
    store = StandaloneStore(backend)
    publisher = NodePublisher(store, SPEC, resync=3600)  # the timer would take an hour: only the informer helps
    task = asyncio.create_task(publisher.run())
    try:
        await until(lambda: store.get(CILIUM_NODE, "n1"))
        await backend.wipe()
        assert await store.get(CILIUM_NODE, "n1") is None
        await until(lambda: store.get(CILIUM_NODE, "n1"))
        assert publisher.published == 2
        changed = await store.get(CILIUM_NODE, "n1")
        assert changed is not None
        changed["spec"]["ipam"]["podCIDRs"] = ["10.9.9.0/24"]  # someone else's hand
        await store.update(changed)

        async def put_back() -> bool:
            current = await store.get(CILIUM_NODE, "n1")
            return current is not None and current["spec"]["ipam"]["podCIDRs"] == ["10.1.1.0/24"]

        await until(put_back)
    finally:
        await cancel_and_wait([task])


async def hosted_names(store: StandaloneStore) -> list[str]:
    return sorted(obj["metadata"]["name"] for obj in (await store.list(CILIUM_ENDPOINT)).items)


async def test_endpoints_of_living_pods_come_back_after_a_wipe_and_after_a_restart(tmp_path: Path) -> None:
    backend = MemoryBackend()
    store = StandaloneStore(backend)
    state = tmp_path / "endpoints.json"
    manager = EndpointManager(store, Counting(), node_ip="192.168.1.11", pod_cidrs=["10.1.1.0/24"], state_file=state)
    keeper = EndpointKeeper(manager)
    task = asyncio.create_task(keeper.run())
    try:
        for name, ip in (("web-1", "10.1.1.10"), ("web-2", "10.1.1.11"), ("gone", "10.1.1.12")):
            await manager.create(EndpointRequest("shop", name, {"app": "web"}, ipv4=ip))
        await manager.delete("shop", "gone")  # its pod went: it must not come back
        await backend.wipe()

        async def back() -> bool:
            return await hosted_names(store) == ["web-1", "web-2"]

        await until(back)
        assert keeper.restored == 2
        restored = await store.get(CILIUM_ENDPOINT, "web-1", "shop")
        assert restored is not None and restored["status"]["networking"]["addressing"] == [{"ipv4": "10.1.1.10"}]
    finally:
        await cancel_and_wait([task])

    # The agent restarts while the store is wiped again: it remembers its endpoints from its state folder.
    await backend.wipe()
    reborn = EndpointManager(store, Counting(), node_ip="192.168.1.11", pod_cidrs=["10.1.1.0/24"], state_file=state)
    assert sorted(name for _, name in reborn.hosted) == ["web-1", "web-2"]
    task = asyncio.create_task(EndpointKeeper(reborn).run())
    try:
        await until(back)
    finally:
        await cancel_and_wait([task])


def test_an_unreadable_state_file_forgets_rather_than_fails(tmp_path: Path) -> None:
    state = tmp_path / "endpoints.json"
    state.write_bytes(b"\xff not json")
    manager = EndpointManager(StandaloneStore(MemoryBackend()), Counting(), node_ip="", state_file=state)
    assert manager.hosted == {}
