"""WatchStore: the reader of one key prefix, mirroring its valid entries into memory and telling an observer.

One `run(backend)` is one session with one connection:

1. (optionally) wait until the writer's synced canary exists, so a half-written prefix is never taken for the truth;
2. list the prefix at one revision and compare with what the store holds: upserts for new or changed entries,
   deletes for entries that did not come back. Until that list is complete, nothing is deleted: every entry held
   from an earlier session is "stale" and only a complete list can condemn it. This is what makes a reconnect, an
   etcd restart, a wipe-and-refill or a compaction produce exactly the difference and nothing else;
3. set `synced`, then watch from the list's revision + 1; a compaction of that history ends in a new list (step 2,
   same connection); a broken connection ends `run` with `BackendUnavailable`, and the caller's loop reconnects and
   calls `run` again.

A value that does not decode (or that the decoder rejects: wrong cluster, identity out of range, ...) is an error for
its key alone: counted by reason, logged, and otherwise ignored. As in Cilium, an entry that was valid before keeps
its last valid value. Unchanged values (an etcd restart re-lists everything) are not passed on.

A decoded value then passes `admit` (ownership of addresses, which depends on other entries): a value it refuses
with `NotOwned` is held, named in `rejected`, and admitted by `recheck()` once it fits; `recheck(entries=True)` also
takes back admitted entries that no longer fit, and `evict` takes back one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from clustermesh.model.errors import InvalidValue, NotOwned
from kvstore import errors
from kvstore.backend import Backend, Delete, Entry, Event, wait_for_key
from kvstore.gcpause import collector_paused
from kvstore.metrics import KVStoreMetrics

__all__ = ["Observer", "WatchStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

Decode = Callable[[str, bytes], T]
Admit = Callable[[str, T], None]


class Observer(Protocol[T_contra]):
    """Receives a WatchStore's changes, in order, synchronously (queue them if there is slow work to do).

    An observer may also offer `on_upserts(items: list[tuple[str, T]])`: a list then hands it each page's upserts in
    one call (a sync of 100k entries is 100k calls otherwise)."""

    def on_upsert(self, key: str, value: T_contra) -> None: ...

    def on_delete(self, key: str, value: T_contra) -> None: ...


class WatchStore(Generic[T]):
    """Mirror of the valid entries under `prefix`. `entries` maps full keys to decoded values."""

    def __init__(
        self,
        *,
        prefix: str,
        decode: Decode[T],
        observer: Observer[T] | None = None,
        name: str = "",
        synced_canary: str | None = None,
        metrics: KVStoreMetrics | None = None,
        on_batch: Callable[[float], None] | None = None,
        on_rejected: Callable[[str, str], None] | None = None,
        admit: Admit[T] | None = None,
        splits: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.prefix = prefix
        #: where the list may split this prefix (kvstore.ranges), asked at each list: e.g. the pod CIDRs of a
        #: remote cluster's nodes for its ipcache
        self.splits = splits
        self.decode = decode
        #: Raises `NotOwned` (held) or `InvalidValue` (rejected) for a decoded value that may not be used now.
        self.admit = admit
        self.observer = observer
        self.name = name or prefix
        self.synced_canary = synced_canary
        self.metrics = metrics
        #: Called with the seconds each watched batch took to apply (observers included).
        self.on_batch = on_batch
        #: Called with the key and the reason of each rejected value (a status change its owner may announce).
        self.on_rejected = on_rejected
        self.entries: dict[str, T] = {}
        #: key -> reason, for keys whose current value was rejected (shown in status)
        self.rejected: dict[str, str] = {}
        #: key -> decoded value, for values `admit` refused with NotOwned: `recheck` tries them again
        self.held: dict[str, T] = {}
        self._recheck_after_list = False
        self.rejected_total = 0
        self.revision = 0
        self.relists = 0
        self._upserts = self._deletes = 0  # not yet in the metrics
        #: Set after the first complete list; stays set across reconnects (the view is complete, if stale).
        self.synced = asyncio.Event()
        #: Set while a session is past its list and watching: the view is live.
        self.live = asyncio.Event()
        #: Where the current session is: `idle` (none, or it ended), `waiting-canary`, `listing`, `watching`.
        self.phase = "idle"

    # --- one session

    async def run(self, backend: Backend) -> None:
        """List and watch until the connection breaks (raises BackendUnavailable) or the task is cancelled."""
        self.live.clear()
        try:
            if self.synced_canary is not None:
                self.phase = "waiting-canary"
                await self._wait_for_canary(backend, self.synced_canary)
            cause = "start"
            while True:
                self.phase = "listing"
                revision = await self._list(backend, cause)
                self.phase = "watching"
                try:
                    await self._watch(backend, revision)
                except errors.RevisionCompacted as exc:
                    log.info("watch store %s: %s; listing again", self.name, exc)
                    cause = "compacted"
        finally:
            self.phase = "idle"
            self.live.clear()

    async def _wait_for_canary(self, backend: Backend, key: str) -> None:
        if await backend.get(key) is None:
            log.info("watch store %s: waiting for the writer's synced canary %s", self.name, key)
            await wait_for_key(backend, key)

    async def _list(self, backend: Backend, cause: str) -> int:
        if self.synced.is_set():
            self.relists += 1
            if self.metrics is not None:
                self.metrics.relists.labels(self.name, cause).inc()
        seen: set[str] = set()
        first = not self.entries and not self.rejected  # nothing held: nothing can be stale, no need to track
        splits = self.splits() if self.splits is not None else ()
        with collector_paused():  # kvstore.gcpause: measured, the collector made the cost per entry grow
            revision = await self._read_list(backend, splits, seen, first)
        if not first:
            for key in [key for key in self.entries if key not in seen]:
                self._delete(key)
            for key in [key for key in self.rejected if key not in seen]:
                del self.rejected[key]
                self.held.pop(key, None)
        self.revision = revision
        if self._recheck_after_list:
            self._recheck_after_list = False
            self.recheck(entries=True)
        if not self.synced.is_set() and self.metrics is not None:
            self.metrics.initial_sync_completed(self.name, "read")
        self.synced.set()
        self.live.set()
        self._flush_metrics()
        return revision

    async def _read_list(self, backend: Backend, splits: Sequence[str], seen: set[str], first: bool) -> int:
        """The pages of one list, passed on as they come; returns the list's revision."""
        # Hazard: upserts are passed on page by page, but nothing is deleted before the last page: only a complete
        # list can tell which entries did not come back.
        bulk = getattr(self.observer, "on_upserts", None)
        revision = 0
        async for listing in backend.list_pages(self.prefix, splits=splits):
            revision = listing.revision
            if bulk is None:
                for entry in listing.entries:
                    seen.add(entry.key)
                    self._upsert(entry.key, entry.value)
                continue
            changed = self._accept_new(listing.entries) if first else self._accept_page(listing.entries, seen)
            if changed:
                bulk(changed)
        return revision

    async def _watch(self, backend: Backend, revision: int) -> None:
        async for batch in backend.watch(self.prefix, start_revision=revision + 1):
            started = time.perf_counter()
            self.apply(batch)
            if self.on_batch is not None:
                self.on_batch(time.perf_counter() - started)

    # --- applying changes

    def apply(self, batch: list[Event]) -> None:
        for event in batch:
            if isinstance(event, Delete):
                self._delete(event.key)
                if self.rejected:
                    self.rejected.pop(event.key, None)
                    self.held.pop(event.key, None)
            else:
                self._upsert(event.key, event.value)
            self.revision = max(self.revision, event.revision)
        self._flush_metrics()

    def _accept_page(self, page: list[Entry], seen: set[str]) -> list[tuple[str, T]]:
        """A page of a list over entries held before: the new and changed values (noted as `seen`)."""
        changed = []
        accept = self._accept
        for entry in page:
            key = entry.key
            seen.add(key)
            value = accept(key, entry.value)
            if value is not None:
                changed.append((key, value))
        return changed

    def _accept_new(self, page: list[Entry]) -> list[tuple[str, T]]:
        """A page of the first list (nothing held, nothing rejected: every value is new): `_accept` inlined, as a
        sync of a million entries pays for every call per entry."""
        changed: list[tuple[str, T]] = []
        decode, admit, entries, append = self.decode, self.admit, self.entries, changed.append
        for entry in page:
            key = entry.key
            try:
                value = decode(key, entry.value)
                if admit is not None:
                    admit(key, value)
            except NotOwned as exc:
                self.held[key] = exc.value  # type: ignore[assignment]
                self._reject(key, exc.reason)
                continue
            except InvalidValue as exc:
                self._reject(key, exc.reason)
                continue
            entries[key] = value
            append((key, value))
        self._upserts += len(changed)
        return changed

    def _accept(self, key: str, data: bytes) -> T | None:
        """Decode and store one value; the value if it is new or changed, None if rejected or unchanged."""
        try:
            value = self.decode(key, data)
        except InvalidValue as exc:
            self._reject(key, exc.reason)
            return None
        if self.rejected:
            self.rejected.pop(key, None)
            self.held.pop(key, None)
        entries = self.entries
        if key in entries and entries[key] == value:
            return None
        if self.admit is not None:
            try:
                self.admit(key, value)
            except NotOwned as exc:
                self.held[key] = value
                self._reject(key, exc.reason)
                return None
            except InvalidValue as exc:
                self._reject(key, exc.reason)
                return None
        entries[key] = value
        self._upserts += 1
        return value

    def _upsert(self, key: str, data: bytes) -> None:
        value = self._accept(key, data)
        if value is not None and self.observer is not None:
            self.observer.on_upsert(key, value)

    def _delete(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is None:
            return
        self._deletes += 1
        if self.observer is not None:
            self.observer.on_delete(key, old)

    # --- ownership changed

    def recheck(self, *, entries: bool = False) -> None:
        """Admit the held values that fit now; with `entries`, first take back admitted entries that no longer do."""
        admit = self.admit
        if admit is None:
            return
        if entries:
            for key, value in list(self.entries.items()):
                try:
                    admit(key, value)
                except InvalidValue as exc:
                    self._take_back(key, exc.reason)
        for key, value in list(self.held.items()):
            try:
                admit(key, value)
            except InvalidValue as exc:
                if self.rejected.get(key) != exc.reason:
                    self._reject(key, exc.reason)
                continue
            del self.held[key]
            self.rejected.pop(key, None)
            log.info("watch store %s: admitted %s", self.name, key)
            self.entries[key] = value
            self._upserts += 1
            if self.observer is not None:
                self.observer.on_upsert(key, value)
        self._flush_metrics()

    def recheck_after_list(self) -> None:
        """`recheck(entries=True)` once the list that is coming is complete: the list admits every value it
        brings, and what it does not bring is checked after it (taking a stale value back now would flap it)."""
        self._recheck_after_list = True

    def evict(self, key: str, reason: str) -> None:
        """Take back an admitted entry (another claim won its addresses); it is held for a later `recheck`."""
        self._take_back(key, reason)
        self._flush_metrics()

    def _take_back(self, key: str, reason: str) -> None:
        value = self.entries.get(key)
        if value is None:
            return
        self._delete(key)
        self.held[key] = value
        self._reject(key, reason)

    def _reject(self, key: str, reason: str) -> None:
        self.rejected[key] = reason
        self.rejected_total += 1
        log.warning("watch store %s: rejected %s: %s", self.name, key, reason)
        if self.metrics is not None:
            self.metrics.rejected.labels(self.name, _reason_label(reason)).inc()
        if self.on_rejected is not None:
            self.on_rejected(key, reason)

    def _flush_metrics(self) -> None:
        """Metrics are updated once per list or batch, not per entry: a labelled update costs microseconds."""
        if self.metrics is not None:
            self.metrics.entries.labels(self.name).set(len(self.entries))
            if self._upserts:
                self.metrics.events.labels(self.name, "upsert").inc(self._upserts)
            if self._deletes:
                self.metrics.events.labels(self.name, "delete").inc(self._deletes)
        self._upserts = self._deletes = 0

    def drain(self) -> None:
        """Delete every entry (the cluster was removed, or its cache expired): observers see each go."""
        for key in list(self.entries):
            self._delete(key)
        self.rejected.clear()
        self.held.clear()
        self.synced.clear()
        self._flush_metrics()


def _reason_label(reason: str) -> str:
    """A short metric label from a rejection reason: its first words, before any value."""
    head = reason.split(":", 1)[0]
    return head[:60]
