"""The heartbeat: proof that a cluster's writer is alive, and the reader that judges its age.

The writer (the cluster's apiserver) puts the current time (RFC 3339) at `cilium/.heartbeat` every minute, on a
lease. A reader (an agent watching a remote cluster) notes when it last saw the key change, by its own clock (the
value is not trusted: clocks differ between clusters), and calls the cluster stale when that is more than two
minutes ago. A stale cluster is not ready, whatever its watchers say. A beat is a write: reading the same write again
(a reconnect's first read, after a session ended because nothing beat) proves nothing, and does not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from clustermesh.model.keys import HEARTBEAT_KEY
from kvstore import errors
from kvstore.backend import Backend, Entry, PutOp, follow_key
from kvstore.leases import LeaseManager
from kvstore.syncing import rfc3339_now

__all__ = ["HEARTBEAT_INTERVAL", "HEARTBEAT_MAX_AGE", "HeartbeatReader", "HeartbeatWriter"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 60.0
HEARTBEAT_MAX_AGE = 2 * HEARTBEAT_INTERVAL


class HeartbeatWriter:
    def __init__(self, backend: Backend, *, leases: LeaseManager | None = None, interval: float = HEARTBEAT_INTERVAL):
        self.backend = backend
        self.leases = leases
        self.interval = interval
        self.beats = 0

    async def beat(self) -> None:
        lease = await self.leases.acquire(HEARTBEAT_KEY) if self.leases is not None else 0
        await self.backend.commit([PutOp(HEARTBEAT_KEY, rfc3339_now().encode(), lease)])
        self.beats += 1

    async def run(self) -> None:
        """Beat now and every `interval` seconds; a failed beat is retried sooner."""
        while True:
            try:
                await self.beat()
                delay = self.interval
            except errors.KVStoreError as exc:  # retried, whatever it is: readers call a silent cluster stale
                log.warning("heartbeat not written: %s", exc)
                if isinstance(exc, errors.LeaseLost) and self.leases is not None:
                    await self.leases.recheck()
                delay = min(self.interval, 2.0)
            await asyncio.sleep(delay)


class HeartbeatReader:
    """Follows `cilium/.heartbeat` of one cluster; `age()` is the time since the last change was seen."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_age: float = HEARTBEAT_MAX_AGE) -> None:
        self.clock = clock
        self.max_age = max_age
        self.last_seen: float | None = None
        self.last_value: str = ""
        #: How many writes were seen.
        self.beats = 0
        self._last_beat: tuple[int, bytes] | None = None
        self._started: float | None = None
        #: Set each time a beat is seen; a waiter clears it first.
        self.changed = asyncio.Event()

    def age(self) -> float | None:
        """Seconds since the heartbeat last changed (or since we started looking, if it never did)."""
        reference = self.last_seen if self.last_seen is not None else self._started
        return None if reference is None else self.clock() - reference

    def stale(self) -> bool:
        age = self.age()
        return age is not None and age > self.max_age

    def _seen(self, entry: Entry) -> None:
        beat = (entry.mod_revision, entry.value)
        if self.last_seen is not None and beat == self._last_beat:
            return  # the same write read again (a reconnect's first read): the writer has not written since
        self._last_beat = beat
        self.last_seen = self.clock()
        self.last_value = entry.value.decode(errors="replace")
        self.beats += 1
        self.changed.set()

    async def run(self, backend: Backend) -> None:
        """Read, then watch the heartbeat key until the connection breaks."""
        if self._started is None:
            self._started = self.clock()
        async with contextlib.aclosing(follow_key(backend, HEARTBEAT_KEY)) as beats:
            async for entry in beats:
                self._seen(entry)
