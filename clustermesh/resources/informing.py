"""Informer: a local cache of one kind, kept in step with a ResourceStore by list-then-watch.

Like client-go's informers: list, tell the handler about every object, mark `synced`, then watch from the list's
resourceVersion. `Gone` (410: the version is too old) and every other store error (the connection broke, a refusal
while RBAC is set up, a kind whose CRD is not installed yet: kept in `last_error`, retried with backoff) end in a new
list, compared with the cache, so the handler hears exactly the difference: upserts for new or changed objects,
deletes for objects that vanished meanwhile. Nothing is deleted before a list is complete.

Handlers are called synchronously, in order, from the informer's task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from clustermesh.model.kinds import Kind, Object
from clustermesh.resources.store import Gone, ResourceError, ResourceStore

__all__ = ["Handler", "Informer", "object_ref"]

log = logging.getLogger(__name__)

Ref = tuple[str, str]  # (namespace or "", name)


def object_ref(obj: Object) -> Ref:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name", ""))


class Handler(Protocol):
    def on_upsert(self, kind: Kind, obj: Object) -> None: ...

    def on_delete(self, kind: Kind, obj: Object) -> None: ...


class Informer:
    def __init__(self, store: ResourceStore, kind: Kind, handler: Handler, *, max_backoff: float = 5.0) -> None:
        self.store = store
        self.kind = kind
        self.handler = handler
        self.max_backoff = max_backoff
        self.cache: dict[Ref, Object] = {}
        self.synced = asyncio.Event()
        self.last_error: str = ""

    async def run(self) -> None:
        """List and watch forever (until cancelled)."""
        backoff = 0.1
        while True:
            try:
                resource_version = await self._list()
                backoff = 0.1
                async for event in self.store.watch(self.kind, resource_version):
                    if event.type == "DELETED":
                        self._delete(object_ref(event.object))
                    else:
                        self._upsert(event.object)
            except Gone as exc:
                log.info("informer %s: %s; listing again", self.kind.plural, exc)
                continue
            except ResourceError as exc:  # unreachable, refused (RBAC), no CRD yet: said in /readyz, and retried
                self.last_error = str(exc)
                log.warning("informer %s: %s; retrying in %.1f s", self.kind.plural, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _list(self) -> str:
        listing = await self.store.list(self.kind)
        seen: set[Ref] = set()
        for obj in listing.items:
            seen.add(object_ref(obj))
            self._upsert(obj)
        for ref in [ref for ref in self.cache if ref not in seen]:
            self._delete(ref)
        self.last_error = ""
        self.synced.set()
        return listing.resource_version

    def _upsert(self, obj: Object) -> None:
        ref = object_ref(obj)
        old = self.cache.get(ref)
        if old is not None and _version(old) == _version(obj) and old == obj:
            return
        self.cache[ref] = obj
        self.handler.on_upsert(self.kind, obj)

    def _delete(self, ref: Ref) -> None:
        old = self.cache.pop(ref, None)
        if old is not None:
            self.handler.on_delete(self.kind, old)


def _version(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
