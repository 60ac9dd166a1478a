"""create_or_update, the one way the CLI and the agent write objects they do not own alone."""

from __future__ import annotations

import pytest

from clustermesh.model.kinds import Object
from clustermesh.resources.standalone import StandaloneStore
from clustermesh.resources.store import Conflict
from clustermesh.resources.testing import node
from clustermesh.resources.writing import create_or_update
from kvstore.memory import MemoryBackend


def same_spec(current: Object, wanted: Object) -> bool:
    return current.get("spec") == wanted.get("spec")


async def test_created_then_unchanged_then_updated_against_the_stored_version() -> None:
    store = StandaloneStore(MemoryBackend())
    wanted = node("n1")
    written, stored = await create_or_update(store, wanted, same=same_spec)
    assert written == "created" and stored["metadata"]["resourceVersion"]
    assert (await create_or_update(store, wanted, same=same_spec))[0] == "unchanged"
    wanted["spec"] = {"addresses": [{"type": "InternalIP", "ip": "192.168.1.12"}]}
    written, updated = await create_or_update(store, wanted, same=same_spec)
    assert written == "updated" and updated["spec"] == wanted["spec"]
    assert updated["metadata"]["uid"] == stored["metadata"]["uid"], "an update keeps the object's identity"


class AlwaysChanging(StandaloneStore):
    """Someone else writes the object between every read and our write."""

    async def update(self, obj: Object) -> Object:
        raise Conflict("changed meanwhile")


async def test_an_object_that_keeps_changing_is_a_conflict_after_the_attempts() -> None:
    store = AlwaysChanging(MemoryBackend())
    await store.create(node("n1"))
    changed = node("n1")
    changed["spec"] = {"addresses": []}
    with pytest.raises(Conflict, match="CiliumNode n1 kept changing"):
        await create_or_update(store, changed, attempts=3)
