"""The kvstore's public test kit: the backend contract as runnable checks, and small helpers for waiting.

`check_backend(backend, prefix)` runs every check of the `Backend` contract (see `kvstore.backend`) against one
backend. The unit tests run it against `MemoryBackend`, the integration tests against a real etcd: this is what keeps
the in-memory double honest (trio's `check_one_way_stream` does the same for streams).

`backend` must also offer `compact(revision)`, as both `MemoryBackend` and `EtcdBackend` do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from kvstore import errors
from kvstore.backend import Backend, Delete, DeleteOp, Event, PutOp, Upsert

__all__ = ["Recorder", "check_backend", "eventually"]

T = TypeVar("T")


class CompactingBackend(Backend, Protocol):
    async def compact(self, revision: int) -> None: ...


class Recorder:
    """An `Observer` that records what it is told, and lets a test wait for a condition on it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.state: dict[str, Any] = {}
        self._changed = asyncio.Event()

    def on_upsert(self, key: str, value: Any) -> None:
        self.events.append(("upsert", key, value))
        self.state[key] = value
        self._changed.set()

    def on_delete(self, key: str, value: Any) -> None:
        self.events.append(("delete", key, value))
        self.state.pop(key, None)
        self._changed.set()

    def deletes(self) -> list[str]:
        return [key for action, key, _ in self.events if action == "delete"]

    def upserts(self) -> list[str]:
        return [key for action, key, _ in self.events if action == "upsert"]

    def clear(self) -> None:
        self.events.clear()

    async def wait_for(self, condition: Callable[[Recorder], bool], timeout: float = 10.0) -> None:
        """Until `condition(self)` holds; checked after every change, never by polling on a timer."""
        async with asyncio.timeout(timeout):
            while not condition(self):
                self._changed.clear()
                await self._changed.wait()


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.05) -> T:
    """Retry `check` until it stops raising AssertionError: for state outside our process (another etcd client)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await check()
            except AssertionError:
                await asyncio.sleep(interval)


async def _next_batch(stream: AsyncIterator[list[Event]], timeout: float = 5.0) -> list[Event]:
    return await asyncio.wait_for(anext(stream), timeout)


async def check_snapshot_then_changes(backend: Backend, prefix: str) -> None:
    await backend.commit([PutOp(f"{prefix}a", b"1"), PutOp(f"{prefix}b", b"2")])
    await backend.commit([PutOp(f"{prefix}outside-not", b"x")])
    listing = await backend.list_prefix(prefix)
    assert [e.key for e in listing.entries] == [f"{prefix}a", f"{prefix}b", f"{prefix}outside-not"]
    assert all(e.mod_revision <= listing.revision for e in listing.entries)
    stream = backend.watch(prefix, start_revision=listing.revision + 1)
    try:
        rev = await backend.commit([PutOp(f"{prefix}a", b"3"), DeleteOp(f"{prefix}b")])
        batch = await _next_batch(stream)
        a = listing.entries[0]
        assert batch == [Upsert(f"{prefix}a", b"3", rev, 0, 2, a.mod_revision), Delete(f"{prefix}b", rev)], batch
        fresh = await backend.get(f"{prefix}b")
        assert fresh is None
        current = await backend.get(f"{prefix}a")
        assert current is not None and current.version == 2 and current.create_revision == a.mod_revision
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def check_delete_unknown_key(backend: Backend, prefix: str) -> None:
    listing = await backend.list_prefix(prefix)
    stream = backend.watch(prefix, start_revision=listing.revision + 1)
    try:
        await backend.commit([DeleteOp(f"{prefix}never-existed")])
        rev = await backend.commit([PutOp(f"{prefix}marker", b"m")])
        batch = await _next_batch(stream)
        assert batch == [Upsert(f"{prefix}marker", b"m", rev, 0, 1, rev)], (
            f"a delete of a missing key was seen: {batch}"
        )
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def check_compacted_watch(backend: CompactingBackend, prefix: str) -> None:
    first = await backend.commit([PutOp(f"{prefix}c", b"1")])
    await backend.commit([PutOp(f"{prefix}c", b"2")])
    last = await backend.commit([PutOp(f"{prefix}c", b"3")])
    await backend.compact(last)
    stream = backend.watch(prefix, start_revision=first)
    try:
        await _next_batch(stream)
    except errors.RevisionCompacted as exc:
        assert exc.revision >= first or exc.revision == 0
    else:
        raise AssertionError("a watch from a compacted revision did not raise RevisionCompacted")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def check_lost_lease_deletes_keys(backend: Backend, prefix: str) -> None:
    lease = await backend.grant_lease(60)
    assert await backend.keep_alive(lease) > 0
    await backend.commit([PutOp(f"{prefix}l1", b"1", lease), PutOp(f"{prefix}l2", b"2", lease)])
    await backend.commit([PutOp(f"{prefix}kept", b"3")])
    await backend.revoke_lease(lease)
    listing = await backend.list_prefix(prefix)
    assert [e.key for e in listing.entries] == [f"{prefix}kept"], listing
    try:
        await backend.keep_alive(lease)
    except errors.LeaseLost:
        pass
    else:
        raise AssertionError("keep_alive of a revoked lease did not raise LeaseLost")
    await backend.revoke_lease(lease)  # revoking twice is not an error


async def check_conditional_writes(backend: Backend, prefix: str) -> None:
    key = f"{prefix}cas"
    created = await backend.create(key, b"1")
    assert created > 0
    assert await backend.create(key, b"2") == 0
    entry = await backend.get(key)
    assert entry is not None and entry.value == b"1" and entry.mod_revision == created
    assert await backend.replace(key, b"x", mod_revision=entry.mod_revision - 1) == 0
    replaced = await backend.replace(key, b"3", mod_revision=entry.mod_revision)
    assert replaced > created
    entry = await backend.get(key)
    assert entry is not None and entry.value == b"3" and entry.mod_revision == replaced and entry.version == 2
    assert not await backend.delete_if(key, mod_revision=entry.mod_revision + 100)
    assert await backend.delete_if(key, mod_revision=entry.mod_revision)
    assert await backend.get(key) is None


async def check_large_listing(backend: Backend, prefix: str, count: int = 2500) -> None:
    """More keys than one page of a paged list: all come back, in order, at one revision."""
    keys = [f"{prefix}big/{i:05d}" for i in range(count)]
    for start in range(0, count, 100):
        await backend.commit([PutOp(key, b"v") for key in keys[start : start + 100]])
    listing = await backend.list_prefix(f"{prefix}big/")
    assert [e.key for e in listing.entries] == keys


CHECKS: list[Callable[..., Awaitable[None]]] = [
    check_snapshot_then_changes,
    check_delete_unknown_key,
    check_compacted_watch,
    check_lost_lease_deletes_keys,
    check_conditional_writes,
    check_large_listing,
]


async def check_backend(backend: CompactingBackend, prefix: str) -> None:
    """Run every check of the Backend contract, each under its own sub-prefix of `prefix`."""
    for check in CHECKS:
        await check(backend, f"{prefix}{check.__name__}/")
