"""A test bench for the apiserver: a real etcd, a ResourceStore (standalone, or the Kubernetes stand-in), the
apiserver running in-process, and a watcher of `cilium/` that tests wait on.

Objects go in with the same code as `clustermesh apply/delete`; keys come out of etcd as bytes, compared with the
project's own vectors. Waiting is on the watcher's events, never on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from apiserver.server import Apiserver, ApiserverConfig
from clustermesh.kubectl import apply_objects, delete_objects
from clustermesh.model.clusters import ClusterInfo
from clustermesh.resources.store import ResourceStore
from kvstore import etcd
from kvstore.testing import Recorder
from kvstore.watching import WatchStore
from tests.integration.conftest import EtcdCluster

FENCE_KEY = "cilium/test-fence"  # watched by the bench's reader, written by nobody but `Bench.fence`


@dataclass
class Bench:
    cluster: ClusterInfo
    backend: etcd.EtcdBackend
    store: ResourceStore
    recorder: Recorder = field(default_factory=Recorder)
    apiserver: Apiserver | None = None
    standin: Any = None  # the stand-in Kubernetes API server, when the store is the Kubernetes one
    _task: asyncio.Task[None] | None = None
    _watch: asyncio.Task[None] | None = None
    _fences: int = 0

    async def start_watching(self) -> None:
        watcher: WatchStore[bytes] = WatchStore(prefix="cilium/", decode=lambda k, v: v, observer=self.recorder)
        self._watch = asyncio.create_task(watcher.run(self.backend), name="bench-watch")
        await asyncio.wait_for(watcher.synced.wait(), 10)

    async def start_apiserver(self, *, wait_ready: bool = True) -> Apiserver:
        self.apiserver = Apiserver(ApiserverConfig(self.cluster), self.backend, self.store)
        self._task = asyncio.create_task(self.apiserver.run(), name="apiserver")
        if wait_ready:
            ready = asyncio.ensure_future(self.apiserver.ready.wait())
            await asyncio.wait([ready, self._task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
            if self._task.done():
                self._task.result()
            assert ready.done(), f"the apiserver did not get ready: {self.apiserver.not_ready()}"
        return self.apiserver

    async def stop_apiserver(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def stop(self) -> None:
        await self.stop_apiserver()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def apply(self, text: str) -> None:
        outcomes = await apply_objects(self.store, [(doc, "test") for doc in yaml.safe_load_all(text) if doc])
        failed = [o for o in outcomes if o.action == "failed"]
        assert not failed, failed

    async def delete(self, text: str) -> None:
        outcomes = await delete_objects(self.store, [(doc, "test") for doc in yaml.safe_load_all(text) if doc])
        failed = [o for o in outcomes if o.action == "failed"]
        assert not failed, failed

    def keys(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.recorder.state.items() if k.startswith(prefix)}

    async def wait_keys(self, prefix: str, expected: dict[str, bytes], timeout: float = 10.0) -> None:
        """Until the keys under `prefix` are exactly `expected` (as seen by the watcher of etcd)."""
        try:
            await self.recorder.wait_for(lambda r: self.keys(prefix) == expected, timeout)
        except TimeoutError:
            assert self.keys(prefix) == expected  # show the difference
            raise

    async def wait_for(self, condition: Callable[[dict[str, bytes]], bool], timeout: float = 10.0) -> None:
        await self.recorder.wait_for(lambda r: condition(r.state), timeout)

    async def fence(self) -> None:
        """Until the watcher has seen everything written so far: a write of our own, then waiting for it to come
        round (what was written before it reached the watcher before it)."""
        self._fences += 1
        value = str(self._fences).encode()
        await self.backend.put(FENCE_KEY, value)
        await self.recorder.wait_for(lambda r: r.state.get(FENCE_KEY) == value)


async def wipe(backend: etcd.EtcdBackend) -> None:
    await backend.delete_prefix("")


@contextlib.asynccontextmanager
async def bench(
    cluster: EtcdCluster, make_store: Callable[[etcd.EtcdBackend], Any], *, name: str = "cluster3", cid: int = 3
) -> AsyncIterator[Bench]:
    backend = await cluster.connect()
    await wipe(backend)
    store = make_store(backend)
    running = Bench(ClusterInfo(name, cid), backend, store)
    try:
        await running.start_watching()
        yield running
    finally:
        await running.stop()
        await store.close()
        await backend.close()
