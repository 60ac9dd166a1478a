"""The seam between the stores and a key-value backend: a few operations with etcd's semantics.

`SyncStore`, `WatchStore`, the lease manager and the heartbeat take a `Backend` and never build one: connecting is
the caller's job (`kvstore.etcd.connect`), so tests hand them `kvstore.memory.MemoryBackend` and production hands
them an `EtcdBackend`. Both are checked against one contract, `kvstore.testing.check_backend`.

Contract, for every implementation:

- revisions are etcd's: one counter for the whole store, raised by every write, a transaction being one write;
- `list_prefix` returns a consistent snapshot (every entry at one revision) and that revision;
- `watch(prefix, start_revision)` yields batches of `Upsert`/`Delete` in revision order starting at
  `start_revision`, raises `RevisionCompacted` if that history is gone and `BackendUnavailable` when the
  connection breaks; it never reconnects silently (after a break the caller must list again: the store may have
  been wiped or restored meanwhile); the one move it makes itself is to new TLS credentials
  (`ReloadsCredentials`), on a connection just checked, resuming right after the last revision it delivered;
- `commit` applies its operations in one transaction, or none of them; it is never retried by the backend, because
  a transaction can apply and still report a failure;
- keys written with a lease vanish when the lease is revoked or expires.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from kvstore import errors

__all__ = [
    "Backend",
    "ReloadsCredentials",
    "Delete",
    "DeleteOp",
    "Entry",
    "Event",
    "Listing",
    "PutOp",
    "Upsert",
    "WriteOp",
    "follow_key",
    "wait_for_key",
]


class Entry(msgspec.Struct, frozen=True):
    """One key as stored: its value, the revision of its last change and the lease it is attached to (0: none)."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    #: How many times the key was written since it was created (1: just created).
    version: int = 0
    create_revision: int = 0


class Listing(msgspec.Struct, frozen=True):
    """Entries of a list carry key, value, mod_revision and lease (not version and create_revision: a list of
    100k keys is read often, and every field read from a protobuf message costs; `get` has them all)."""

    entries: list[Entry]
    revision: int


class Upsert(msgspec.Struct, frozen=True, tag=True):
    key: str
    value: bytes
    revision: int
    lease: int = 0
    #: 1 when this write created the key.
    version: int = 0
    create_revision: int = 0


class Delete(msgspec.Struct, frozen=True, tag=True):
    key: str
    revision: int


Event = Upsert | Delete


class PutOp(msgspec.Struct, frozen=True):
    key: str
    value: bytes
    lease: int = 0


class DeleteOp(msgspec.Struct, frozen=True):
    key: str


WriteOp = PutOp | DeleteOp


@runtime_checkable
class ReloadsCredentials(Protocol):
    """A backend that takes up rotated certificate files in place (etcd's; the memory backend has none)."""

    async def reload_credentials(self) -> bool: ...


class Backend(Protocol):
    """What the stores need from etcd. Every method may raise `BackendUnavailable` or `PermissionDenied`."""

    async def get(self, key: str) -> Entry | None:
        """The entry at `key`, or None."""
        ...

    async def list_prefix(self, prefix: str, *, splits: Sequence[str] = ()) -> Listing:
        """Every entry whose key starts with `prefix`, all at one revision (paged as needed)."""
        ...

    def list_pages(self, prefix: str, *, splits: Sequence[str] = ()) -> AsyncIterator[Listing]:
        """The same, page by page in key order (each page's `revision` is the listing's), so a reader can work
        while the next page comes; `splits` are keys where a sub-range may start (kvstore.ranges): they change how
        the prefix is read, never what is read."""
        ...

    async def commit(self, ops: Sequence[WriteOp]) -> int:
        """Apply `ops` in one transaction; return the revision it made. Deleting a missing key is not an error."""
        ...

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `key` only if it does not exist; the revision of the write, or 0 if the key existed."""
        ...

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> int:
        """Write `key` only if its last change is still `mod_revision`; the revision of the write, or 0 if someone
        changed (or deleted) it since."""
        ...

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete `key` only if its last change is still `mod_revision`."""
        ...

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[Event]]:
        """Changes under `prefix` from `start_revision` on, in order, in batches (one per etcd response)."""
        ...

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its ID."""
        ...

    async def keep_alive(self, lease: int) -> int:
        """Refresh `lease` once; return its new TTL. Raises `LeaseLost` if it is gone."""
        ...

    async def revoke_lease(self, lease: int) -> None:
        """Revoke `lease`: its keys are deleted. Revoking a lost lease is not an error."""
        ...

    async def close(self) -> None: ...


async def follow_key(backend: Backend, key: str) -> AsyncGenerator[Entry, None]:
    """`key` as it is (if it exists), then each write of it: read, then watched from the read's revision, so
    nothing is missed and nothing is polled. Ends (raises) when the connection does."""
    listing = await backend.list_prefix(key)
    for entry in listing.entries:
        if entry.key == key:
            yield entry
    async for batch in backend.watch(key, start_revision=listing.revision + 1):
        for event in batch:
            if isinstance(event, Upsert) and event.key == key:
                yield Entry(key, event.value, event.revision, event.lease, event.version, event.create_revision)


async def wait_for_key(backend: Backend, key: str) -> Entry:
    """`key`'s entry, once it exists."""
    async with contextlib.aclosing(follow_key(backend, key)) as entries:  # the watch ends with the wait
        async for entry in entries:
            return entry
    raise errors.BackendUnavailable(f"watch {key}: the stream ended before the key appeared")
