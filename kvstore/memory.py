"""An in-memory `Backend` with etcd's semantics, for unit tests (never for integration tests: those use real etcd).

A dict, a revision counter, the history of changes and an `asyncio.Condition`. It honours the same contract as
`EtcdBackend` (checked by `kvstore.testing.check_backend` against both) and adds test-only controls that a real
etcd gives only with effort: `compact`, `expire_lease`, `break_connections`, `wipe`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from kvstore import errors
from kvstore.backend import Delete, DeleteOp, Entry, Event, Listing, PutOp, Upsert, WriteOp
from kvstore.ranges import sub_ranges

__all__ = ["MemoryBackend"]


class MemoryBackend:
    def __init__(self) -> None:
        self._data: dict[str, Entry] = {}
        self._revision = 1
        self._history: list[tuple[int, list[Event]]] = []
        self._compacted = 0
        self._leases: dict[int, set[str]] = {}
        self._next_lease = 0x1000
        self._condition: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # raised by break_connections(): watches of an older generation fail
        self.available = True
        self.commits = 0

    @property
    def _changed(self) -> asyncio.Condition:
        """A condition of the running loop (a CLI test runs each command in a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._condition is None or self._loop is not loop:
            self._condition, self._loop = asyncio.Condition(), loop
        return self._condition

    # --- test controls

    async def compact(self, revision: int) -> None:
        self._compacted = max(self._compacted, revision)
        self._history = [(rev, batch) for rev, batch in self._history if rev > revision]

    async def expire_lease(self, lease: int) -> None:
        """What etcd does when a lease's TTL runs out: its keys are deleted in one revision."""
        keys = self._leases.pop(lease, set())
        ops: list[WriteOp] = [DeleteOp(key) for key in sorted(keys) if key in self._data]
        if ops:
            await self._apply(ops)

    async def break_connections(self) -> None:
        """Every open watch ends with BackendUnavailable, as when etcd restarts."""
        self._generation += 1
        async with self._changed:
            self._changed.notify_all()

    async def wipe(self) -> None:
        """An empty etcd with a fresh revision counter, as after removing its data folder."""
        self._data.clear()
        self._history.clear()
        self._leases.clear()
        self._revision = 1
        self._compacted = 0
        await self.break_connections()

    def keys(self) -> list[str]:
        return sorted(self._data)

    # --- Backend

    def _check(self) -> None:
        if not self.available:
            raise errors.BackendUnavailable("memory backend marked unavailable")

    async def get(self, key: str) -> Entry | None:
        self._check()
        return self._data.get(key)

    async def list_prefix(self, prefix: str, *, splits: Sequence[str] = ()) -> Listing:
        self._check()
        entries = [self._data[key] for key in sorted(self._data) if key.startswith(prefix)]
        return Listing([Entry(e.key, e.value, e.mod_revision, e.lease) for e in entries], self._revision)

    async def list_pages(self, prefix: str, *, splits: Sequence[str] = ()) -> AsyncIterator[Listing]:
        """A page per sub-range (`kvstore.ranges.sub_ranges`), all at one revision, as etcd's split listing."""
        self._check()
        revision = self._revision
        keys = sorted(key for key in self._data if key.startswith(prefix))
        for start, end in sub_ranges(prefix, splits):
            inside = [self._data[k] for k in keys if start <= k.encode() and (end == b"\x00" or k.encode() < end)]
            yield Listing([Entry(e.key, e.value, e.mod_revision, e.lease) for e in inside], revision)

    async def _apply(self, ops: Sequence[WriteOp]) -> int:
        for op in ops:
            if isinstance(op, PutOp) and op.lease and op.lease not in self._leases:
                raise errors.LeaseLost(op.lease)
        self._revision += 1
        revision = self._revision
        batch: list[Event] = []
        for op in ops:
            if isinstance(op, PutOp):
                old = self._data.get(op.key)
                if old is not None and old.lease and old.lease != op.lease:
                    self._leases.get(old.lease, set()).discard(op.key)
                version = old.version + 1 if old is not None else 1
                created = old.create_revision if old is not None else revision
                self._data[op.key] = Entry(op.key, op.value, revision, op.lease, version, created)
                if op.lease:
                    self._leases[op.lease].add(op.key)
                batch.append(Upsert(op.key, op.value, revision, op.lease, version, created))
            elif op.key in self._data:
                old = self._data.pop(op.key)
                if old.lease:
                    self._leases.get(old.lease, set()).discard(op.key)
                batch.append(Delete(op.key, revision))
        if not batch:
            self._revision -= 1
            return self._revision
        self._history.append((revision, batch))
        self.commits += 1
        async with self._changed:
            self._changed.notify_all()
        return revision

    async def commit(self, ops: Sequence[WriteOp]) -> int:
        self._check()
        if not ops:
            raise ValueError("commit needs at least one operation")
        return await self._apply(ops)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.commit([PutOp(key, value, lease)])

    async def delete(self, key: str) -> int:
        return await self.commit([DeleteOp(key)])

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        if key in self._data:
            return 0
        return await self._apply([PutOp(key, value, lease)])

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> int:
        self._check()
        current = self._data.get(key)
        if (current.mod_revision if current else 0) != mod_revision:
            return 0
        return await self._apply([PutOp(key, value, lease)])

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        self._check()
        current = self._data.get(key)
        if current is None or current.mod_revision != mod_revision:
            return False
        await self._apply([DeleteOp(key)])
        return True

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[Event]]:
        self._check()
        generation = self._generation
        if start_revision <= self._compacted:
            raise errors.RevisionCompacted(self._compacted)
        next_revision = start_revision
        while True:
            if generation != self._generation or not self.available:
                raise errors.BackendUnavailable("memory backend: connection broken")
            if next_revision <= self._compacted:
                raise errors.RevisionCompacted(self._compacted)
            pending = [(rev, batch) for rev, batch in self._history if rev >= next_revision]
            if not pending:
                async with self._changed:
                    await self._changed.wait()
                continue
            for rev, batch in pending:
                mine = [event for event in batch if event.key.startswith(prefix)]
                next_revision = rev + 1
                if mine:
                    yield mine

    async def grant_lease(self, ttl: int) -> int:
        self._check()
        self._next_lease += 1
        self._leases[self._next_lease] = set()
        return self._next_lease

    async def keep_alive(self, lease: int) -> int:
        self._check()
        if lease not in self._leases:
            raise errors.LeaseLost(lease)
        return 60

    async def revoke_lease(self, lease: int) -> None:
        self._check()
        await self.expire_lease(lease)

    async def close(self) -> None:
        return None
