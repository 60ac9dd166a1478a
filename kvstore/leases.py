"""Leases for the keys a process publishes: shared by at most 1000 keys, kept alive, re-created when lost.

Every key a writer publishes is attached to a lease, so that a writer that dies takes its keys with it after the
TTL instead of leaving them forever. One lease per key would flood etcd with keep-alives; one lease for everything
makes a lease loss a mass deletion. Cilium's middle way, kept here: a lease serves up to `max_keys` keys (1000), and
a new one is granted when the current one is full.

When etcd says a lease is gone (it expired during an outage, was revoked, or etcd was wiped), the manager forgets
it and tells its subscribers which keys were on it; a `SyncStore` then writes those keys again, on a new lease.
This is how published state comes back by itself after an etcd wipe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kvstore import errors
from kvstore.backend import Backend

__all__ = ["LeaseManager"]

log = logging.getLogger(__name__)

DEFAULT_TTL = 900  # Cilium's default: keys outlive a writer's restart by 15 minutes
MAX_KEYS_PER_LEASE = 1000

LostCallback = Callable[[set[str]], None]


class LeaseManager:
    """Hands out lease IDs with room for one more key and keeps all of them alive."""

    def __init__(self, backend: Backend, *, ttl: int = DEFAULT_TTL, max_keys: int = MAX_KEYS_PER_LEASE) -> None:
        if max_keys < 1:
            raise ValueError("a lease must hold at least one key")
        self.backend = backend
        self.ttl = ttl
        self.max_keys = max_keys
        self._keys: dict[int, set[str]] = {}  # lease -> keys attached
        self._lease_of: dict[str, int] = {}
        self._current: int | None = None
        self._lock = asyncio.Lock()
        self._subscribers: list[LostCallback] = []
        self.lost_count = 0

    def subscribe(self, callback: LostCallback) -> None:
        """`callback(keys)` runs (synchronously) when a lease is lost, with the keys that were on it."""
        self._subscribers.append(callback)

    def owns(self, lease: int) -> bool:
        return lease in self._keys

    @property
    def leases(self) -> dict[int, int]:
        """Lease ID -> number of keys on it."""
        return {lease: len(keys) for lease, keys in self._keys.items()}

    def current(self, key: str) -> int | None:
        """The lease `key` is on already, if any (no I/O: the fast path of `acquire`)."""
        return self._lease_of.get(key)

    async def acquire(self, key: str) -> int:
        """The lease to write `key` with: its current one, or a slot on a lease with room."""
        lease = self._lease_of.get(key)
        if lease is not None:
            return lease
        async with self._lock:
            lease = self._lease_of.get(key)  # another task may have placed it while we waited
            if lease is not None:
                return lease
            if self._current is None or len(self._keys.get(self._current, ())) >= self.max_keys:
                self._current = await self.backend.grant_lease(self.ttl)
                self._keys[self._current] = set()
            self._keys[self._current].add(key)
            self._lease_of[key] = self._current
            return self._current

    def release(self, key: str) -> None:
        """`key` was deleted: its slot is free. The lease itself lives on (and is reused) until revoked."""
        lease = self._lease_of.pop(key, None)
        if lease is not None:
            self._keys.get(lease, set()).discard(key)

    def _forget(self, lease: int) -> set[str]:
        keys = self._keys.pop(lease, set())
        for key in keys:
            self._lease_of.pop(key, None)
        if self._current == lease:
            self._current = None
        return keys

    def lease_lost(self, lease: int) -> None:
        """Forget `lease` and tell the subscribers which keys went with it."""
        keys = self._forget(lease)
        self.lost_count += 1
        log.warning("lease %x lost with %d keys: they will be written again on a new lease", lease, len(keys))
        for callback in self._subscribers:
            callback(keys)

    async def keep_alive_once(self) -> None:
        """Refresh every lease once; a lease etcd no longer knows is declared lost."""
        for lease in list(self._keys):
            try:
                await self.backend.keep_alive(lease)
            except errors.LeaseLost:
                self.lease_lost(lease)

    async def recheck(self) -> None:
        """A write was refused for a lease etcd no longer knows, and etcd does not say which: ask about each now, so
        the lost ones are replaced at once, not at the next keep-alive round (minutes away). Never raises: a writer
        calls it on its way to a retry."""
        try:
            await self.keep_alive_once()
        except errors.KVStoreError as exc:
            log.info("cannot check the leases yet: %s", exc)

    async def run(self) -> None:
        """Keep all leases alive every ttl/3 seconds until cancelled; outages are retried sooner."""
        interval = max(1.0, self.ttl / 3)
        while True:
            try:
                await self.keep_alive_once()
                delay = interval
            except errors.BackendUnavailable as exc:
                log.info("lease keep-alive failed, retrying: %s", exc)
                delay = min(interval, 1.0)
            await asyncio.sleep(delay)

    async def revoke_all(self) -> None:
        """Revoke every lease (a clean shutdown that should remove what we published)."""
        for lease in list(self._keys):
            await self.backend.revoke_lease(lease)
            self._forget(lease)
