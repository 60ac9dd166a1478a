"""Keeping `cilium/cluster-config/<cluster>` as this apiserver says it is.

Agents of other clusters read it before anything else: the cluster ID and `maxConnectedClusters` decide whether
they may connect at all. So it is written at start, watched, and written again at once whenever it is changed or
deleted by anyone else (Cilium's enforcer does the same). It lives on one of our leases, like the rest.
"""

from __future__ import annotations

import asyncio
import logging

from clustermesh.model import keys, wire
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.converters import cluster_config
from kvstore import errors
from kvstore.backend import Backend, PutOp, Upsert
from kvstore.leases import LeaseManager

__all__ = ["ClusterConfigEnforcer"]

log = logging.getLogger(__name__)


class ClusterConfigEnforcer:
    def __init__(self, backend: Backend, cluster: ClusterInfo, *, leases: LeaseManager | None = None) -> None:
        self.backend = backend
        self.key = keys.cluster_config_key(cluster.name)
        self.value = wire.encode(cluster_config(cluster))
        self.leases = leases
        self.written = asyncio.Event()
        if leases is not None:
            leases.subscribe(self._on_lease_lost)
        self._lost = asyncio.Event()

    def _on_lease_lost(self, lost: set[str]) -> None:
        if self.key in lost:
            self._lost.set()

    async def _write(self) -> None:
        lease = await self.leases.acquire(self.key) if self.leases is not None else 0
        await self.backend.commit([PutOp(self.key, self.value, lease)])
        self.written.set()

    async def run_once(self) -> None:
        """Write if needed, then watch and restore until the connection breaks (raises)."""
        listing = await self.backend.list_prefix(self.key)  # the value, and the revision to watch from
        entry = next((e for e in listing.entries if e.key == self.key), None)
        if entry is None or entry.value != self.value or not self._on_our_lease(entry.lease):
            await self._write()
        else:
            self.written.set()
        async for batch in self.backend.watch(self.key, start_revision=listing.revision + 1):
            if any(event.key == self.key and not (isinstance(event, Upsert) and event.value == self.value)
                   for event in batch):  # fmt: skip
                log.warning("%s was changed or deleted by someone else: restoring it", self.key)
                await self._write()

    def _on_our_lease(self, lease: int) -> bool:
        return self.leases is None or self.leases.owns(lease)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            self._lost.clear()
            watcher = asyncio.ensure_future(self.run_once())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait([watcher, lost], return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    watcher.result()
                backoff = 0.2
            except errors.KVStoreError as exc:
                log.warning("cluster-config enforcement interrupted: %s", exc)
                if isinstance(exc, errors.LeaseLost) and self.leases is not None:
                    await self.leases.recheck()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                for task in (watcher, lost):
                    task.cancel()
                await asyncio.gather(watcher, lost, return_exceptions=True)
