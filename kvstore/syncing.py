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
        self._found_at_start: set[str] | None = None
        self._owner_synced = False
        self._canary_written = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
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
        if self._desired.pop(key, None) is None and key not in self._written:
            return
        self._mark(key)

    def mark_synced(self) -> None:
        """The owner has upserted everything it holds: stale keys may go and the canary may be written."""
        self._owner_synced = True
        self._wake.set()
        self._idle.clear()

    def held(self) -> dict[str, bytes]:
        return dict(self._desired)

    async def wait_idle(self) -> None:
        """Until every wish so far is in etcd."""
        while not self._idle.is_set():
            await self._idle.wait()

    def _mark(self, key: str) -> None:
        self._dirty[key] = None
        self._idle.clear()
        self._wake.set()
        if self.metrics is not None:
            self.metrics.sync_queue.labels(self.name).set(len(self._dirty))

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
            try:
                await self._drain()
                backoff = 0.1
            except (errors.BackendUnavailable, errors.PermissionDenied, errors.LeaseLost) as exc:
                log.warning("sync store %s: write failed, retrying in %.1f s: %s", self.name, backoff, exc)
                if self.metrics is not None:
                    self.metrics.errors.labels(self.name, exc.reason).inc()
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
        while self._dirty:
            keys = list(self._dirty)[: self.batch_size * self.in_flight]
            for key in keys:
                del self._dirty[key]
            try:
                await self._write(keys)
            except BaseException:
                for key in keys:  # not written: keep them for the next attempt, ahead of newer wishes
                    self._dirty[key] = None
                raise
            if self.metrics is not None:
                self.metrics.sync_queue.labels(self.name).set(len(self._dirty))
        if self._owner_synced and self._found_at_start:
            stale = [key for key in self._found_at_start if key not in self._desired and key in self._written]
            self._found_at_start = set()
            if stale:
                log.info("sync store %s: deleting %d keys no longer held", self.name, len(stale))
                for key in stale:
                    self._dirty[key] = None
                await self._drain()
                return
        if self._owner_synced and not self._dirty and not self._canary_written:
            await self._write_canary()
        if not self._dirty:
            self._idle.set()

    async def _write(self, keys: Sequence[str]) -> None:
        ops: list[WriteOp] = []
        for key in keys:
            if self._up_to_date(key):
                continue
            desired = self._desired.get(key)
            if desired is None:
                ops.append(DeleteOp(key))
            else:
                lease = await self.leases.acquire(key) if self.leases is not None else 0
                ops.append(PutOp(key, desired, lease))
        if not ops:
            return
        batches = [ops[i : i + self.batch_size] for i in range(0, len(ops), self.batch_size)]
        results = await asyncio.gather(*(self.backend.commit(batch) for batch in batches), return_exceptions=True)
        failure: BaseException | None = None
        for batch, result in zip(batches, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            self._record(batch)
        if failure is not None:
            raise failure

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
            self.metrics.initial_sync_done.labels(self.name).set(1)
