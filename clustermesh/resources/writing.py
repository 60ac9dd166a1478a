"""Create-or-update over any ResourceStore, optimistically: read, write against what was read, read again on a
conflict. `kubectl apply`, the agent's CiliumNode and the CNI plugin's CiliumEndpoints all write this way."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

from clustermesh.model.kinds import Object, kind_by_name
from clustermesh.resources.store import AlreadyExists, Conflict, NotFound, ResourceStore, describe

__all__ = ["Written", "create_or_update"]

Written = Literal["created", "updated", "unchanged"]


async def create_or_update(
    store: ResourceStore,
    wanted: Object,
    *,
    same: Callable[[Object, Object], bool] | None = None,
    attempts: int = 5,
) -> tuple[Written, Object]:
    """Make the stored object `wanted` (no `resourceVersion` in it: the stored one is used); what was done and the
    object as stored. `same(current, wanted)` says when nothing needs writing (without it, an existing object is
    always written). Raises `Conflict` if the object keeps changing under us for `attempts` rounds."""
    kind = kind_by_name(wanted["kind"])
    metadata = wanted["metadata"]
    name, namespace = metadata["name"], metadata.get("namespace") if kind.namespaced else None
    for _ in range(attempts):
        current = await store.get(kind, name, namespace)
        if current is None:
            try:
                return "created", await store.create(copy.deepcopy(wanted))
            except AlreadyExists:
                continue  # created meanwhile: update it instead
        if same is not None and same(current, wanted):
            return "unchanged", current
        update = copy.deepcopy(wanted)
        update["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            return "updated", await store.update(update)
        except (Conflict, NotFound):
            continue
    raise Conflict(f"{describe(kind, name, namespace)} kept changing while being written; try again")
