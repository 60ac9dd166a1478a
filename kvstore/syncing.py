"""SyncStore: the single writer of one key prefix.

The owner says what the prefix should hold (`upsert`, `delete`, by key name relative to the prefix); the store makes
etcd hold exactly that, and only writes what differs:

- writes are batched into transactions of at most `batch_size` operations, several in flight at once;
- a key whose value is already in etcd, on one of our leases, is not written again;
- on start it lists the prefix; once the owner calls `mark_synced()` and everything queued is written, it deletes
  the keys it found that the owner did not upsert (state left by a previous run, removed while we were down), and
  then writes the synced canary `cilium/synced/<cluster>/<prefix>` that readers wait for;
- it deletes nothing outside its prefix: the prefix ends with "/" so that `.../c1/` never matches `.../c10/...`;
- a failed transaction is retried with backoff (puts and deletes are idempotent); a lost lease makes its keys be
  written again on a new lease.

Like Cilium's SyncStore, `upsert` and `delete` never fail and never block: they record the wish and wake the writer.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence

from kvstore import errors
from kvstore.backend import Backend, DeleteOp, PutOp, WriteOp
from kvstore.leases import LeaseManager
from kvstore.metrics import KVStoreMetrics

__all__ = ["SyncStore", "rfc3339_now"]

log = logging.getLogger(__name__)

DEFAULT_BATCH = 128  # etcd's default --max-txn-ops
DEFAULT_IN_FLIGHT = 8


def rfc3339_now() -> str:
    """Go's time.RFC3339 format, as Cilium writes canaries and heartbeats."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SyncStore:
    """Keeps `prefix` in etcd equal to what the owner upserted. Run `run()` in a task."""

    def __init__(
        self,
        backend: Backend,
        *,
        prefix: str,
        synced_key: str | None = None,
        leases: LeaseManager | None = None,
        name: str = "",
        batch_size: int = DEFAULT_BATCH,
        in_flight: int = DEFAULT_IN_FLIGHT,
        metrics: KVStoreMetrics | None = None,
    ) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"a SyncStore prefix must end with '/', got {prefix!r}")
        self.backend = backend
        self.prefix = prefix
        self.synced_key = synced_key
        self.leases = leases
        self.name = name or prefix
        self.batch_size = batch_size
        self.in_flight = in_flight
        self.metrics = metrics
        self._desired: dict[str, bytes] = {}
        self._written: dict[str, tuple[bytes, int]] = {}  # what etcd holds for us: value and lease
        self._dirty: dict[str, None] = {}  # keys to reconcile, in arrival order
        self._in_flight: set[str] = set()  # keys in a transaction not yet answered
        self._more = asyncio.Event()  # set by every new wish
        self._found_at_start: set[str] | None = None
        self._owner_synced = False
        self._canary_written = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Set once the prefix was listed at start (what a previous run left is known).
        self.listed = asyncio.Event()
        #: Set once the initial sync is complete and the canary is written.
        self.synced = asyncio.Event()
        self.writes = 0
        if leases is not None:
            leases.subscribe(self._on_lease_lost)

    # --- the owner's side

    def key(self, name: str) -> str:
        return self.prefix + name

    def upsert(self, name: str, value: bytes) -> None:
        key = self.prefix + name
        if self._desired.get(key) == value:
            return
        self._desired[key] = value
        self._mark(key)

    def delete(self, name: str) -> None:
        key = self.prefix + name
        # A key never upserted by this run: before the owner's initial sync is complete, a key a previous run left
        # is not ours to delete yet: the owner may still upsert it (its sources list in any order), and the
        # clean-up after mark_synced() deletes it if not. Deleting it now would flap it for readers.
        never_upserted = self._desired.pop(key, None) is None
        if never_upserted and (not self._owner_synced or key not in self._written):
            return
        self._mark(key)

    def mark_synced(self) -> None:
        """The owner has upserted everything it holds: stale keys may go and the canary may be written."""
        self._owner_synced = True
        self._wake.set()
        self._idle.clear()

    def held(self) -> dict[str, bytes]:
        return dict(self._desired)

    def pending(self) -> dict[str, int]:
        """How many keys wait to be written and how many are in a transaction (for status and failure reports)."""
        return {"dirty": len(self._dirty), "in_flight": len(self._in_flight)}

    async def wait_idle(self) -> None:
        """Until every wish so far is in etcd."""
        while not self._idle.is_set():
            await self._idle.wait()

    def _mark(self, key: str) -> None:
        self._dirty[key] = None
        self._more.set()
        self._idle.clear()
        self._wake.set()

    def _on_lease_lost(self, keys: set[str]) -> None:
        ours = [key for key in keys if key.startswith(self.prefix) or key == self.synced_key]
        for key in ours:
            self._written.pop(key, None)
            if key == self.synced_key:
                self._canary_written = False
            elif key in self._desired:
                self._mark(key)
        if ours:
            self._wake.set()
            self._idle.clear()

    # --- the writer's side

    async def run(self) -> None:
        """List the prefix, then write wishes as they come, until cancelled."""
        await self._initial_list()
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.metrics is not None:
                self.metrics.queue_size(self.name, len(self._dirty))
            try:
                await self._drain()
                backoff = 0.1
            except errors.KVStoreError as exc:  # any answer but success is retried: the writer of a prefix never quits
                log.warning("sync store %s: write failed, retrying in %.1f s: %s", self.name, backoff, exc)
                if self.metrics is not None:
                    self.metrics.errors.labels(self.name, exc.reason).inc()
                if isinstance(exc, errors.LeaseLost) and self.leases is not None:
                    await self.leases.recheck()
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _initial_list(self) -> None:
        backoff = 0.1
        while True:
            try:
                listing = await self.backend.list_prefix(self.prefix)
                break
            except errors.BackendUnavailable as exc:
                log.warning("sync store %s: cannot list %s yet: %s", self.name, self.prefix, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self._found_at_start = {entry.key for entry in listing.entries}
        for entry in listing.entries:
            self._written[entry.key] = (entry.value, entry.lease)
        self.listed.set()
        self._wake.set()

    def _up_to_date(self, key: str) -> bool:
        written = self._written.get(key)
        desired = self._desired.get(key)
        if desired is None:
            return written is None
        if written is None or written[0] != desired:
            return False
        return self.leases is None or self.leases.owns(written[1])

    async def _drain(self) -> None:
        await self._flush()
        if self._owner_synced and self._found_at_start:
            stale = [key for key in self._found_at_start if key not in self._desired and key in self._written]
            self._found_at_start = set()
            if stale:
                log.info("sync store %s: deleting %d keys no longer held", self.name, len(stale))
                for key in stale:
                    self._dirty[key] = None
                await self._flush()
        if self._owner_synced and not self._dirty and not self._canary_written:
            await self._write_canary()
        if not self._dirty:
            self._idle.set()

    async def _flush(self) -> None:
        """Write every dirty key, `in_flight` transactions at a time, never one key in two transactions at once
        (two in-flight writes of one key could land in either order)."""
        running: dict[asyncio.Task[None], list[str]] = {}
        failure: BaseException | None = None
        try:
            while True:
                while failure is None and len(running) < self.in_flight:
                    keys = self._take_batch()
                    if not keys:
                        break
                    try:
                        ops = await self._ops(keys)
                    except BaseException:  # no lease (etcd away, or cancelled): these keys stay to be written
                        self._in_flight.difference_update(keys)
                        self._requeue(keys)
                        raise
                    if ops:
                        running[asyncio.create_task(self._commit(ops))] = keys
                    else:
                        self._in_flight.difference_update(keys)
                if not running:
                    break
                # Wake when a transaction is answered, or when new wishes arrive that could fill a free slot.
                self._more.clear()
                more = asyncio.ensure_future(self._more.wait())
                try:
                    done, _ = await asyncio.wait([*running, more], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    more.cancel()
                for task in [task for task in running if task in done]:
                    keys = running.pop(task)
                    self._in_flight.difference_update(keys)
                    if task.exception() is not None:
                        failure = failure or task.exception()
                        self._requeue(keys)
                if self.metrics is not None:
                    self.metrics.queue_size(self.name, len(self._dirty))
        finally:
            for task, keys in running.items():  # cancelled: what is not known to be written stays dirty
                task.cancel()
                self._in_flight.difference_update(keys)
                self._requeue(keys)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if failure is not None:
            raise failure

    def _take_batch(self) -> list[str]:
        keys: list[str] = []
        for key in self._dirty:
            if key not in self._in_flight:
                keys.append(key)
                if len(keys) == self.batch_size:
                    break
        for key in keys:
            del self._dirty[key]
        self._in_flight.update(keys)
        return keys

    def _requeue(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._dirty[key] = None

    async def _ops(self, keys: Sequence[str]) -> list[WriteOp]:
        ops: list[WriteOp] = []
        for key in keys:
            if self._up_to_date(key):
                continue
            desired = self._desired.get(key)
            if desired is None:
                ops.append(DeleteOp(key))
                continue
            lease = 0
            if self.leases is not None:
                lease = self.leases.current(key) or await self.leases.acquire(key)
            ops.append(PutOp(key, desired, lease))
        return ops

    async def _commit(self, ops: list[WriteOp]) -> None:
        await self.backend.commit(ops)
        self._record(ops)

    def _record(self, batch: Sequence[WriteOp]) -> None:
        for op in batch:
            if isinstance(op, PutOp):
                self._written[op.key] = (op.value, op.lease)
            else:
                self._written.pop(op.key, None)
                if self.leases is not None:
                    self.leases.release(op.key)
        self.writes += len(batch)

    async def _write_canary(self) -> None:
        if self.synced_key is not None:
            lease = await self.leases.acquire(self.synced_key) if self.leases is not None else 0
            await self.backend.commit([PutOp(self.synced_key, rfc3339_now().encode(), lease)])
            log.info("sync store %s: initial sync done, wrote %s", self.name, self.synced_key)
        self._canary_written = True
        self.synced.set()
        if self.metrics is not None:
            self.metrics.initial_sync_completed(self.name, "write")
