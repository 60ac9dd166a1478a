"""The informer keeps going through every kind of store error: the apiserver must not stop for a refusal."""

from __future__ import annotations

import asyncio

from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.resources.informing import Informer
from clustermesh.resources.standalone import StandaloneStore
from clustermesh.resources.store import NotFound, ObjectList, ResourceError
from clustermesh.resources.testing import node
from kvstore.memory import MemoryBackend

CILIUM_NODE = kind_by_name("CiliumNode")


class RefusingAtFirst(StandaloneStore):
    """Answers its first lists as a Kubernetes API server does before RBAC or the CRD is in place."""

    def __init__(self, refusals: list[ResourceError]) -> None:
        super().__init__(MemoryBackend())
        self.refusals = refusals

    async def list(self, kind: Kind) -> ObjectList:
        if self.refusals:
            raise self.refusals.pop(0)
        return await super().list(kind)


class Seen:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.changed = asyncio.Event()

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        self.names.append(obj["metadata"]["name"])
        self.changed.set()

    def on_delete(self, kind: Kind, obj: Object) -> None:
        self.names.remove(obj["metadata"]["name"])


async def test_refusals_are_retried_and_named_until_the_list_works() -> None:
    forbidden = ResourceError("cannot list ciliumnodes: HTTP 403 Forbidden")
    forbidden.code = 403
    store = RefusingAtFirst([forbidden, NotFound("ciliumnodes: not found: is its CRD installed?")])
    await store.create(node("n1"))
    seen = Seen()
    informer = Informer(store, CILIUM_NODE, seen)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        assert seen.names == ["n1"]
        assert not task.done()
        await store.create(node("n2"))  # and it watches on
        async with asyncio.timeout(5):
            while seen.names != ["n1", "n2"]:
                seen.changed.clear()
                await seen.changed.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
