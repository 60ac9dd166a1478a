"""Benchmark of the apiserver's endpoint path, against raw etcd writes measured in the same run.

A running apiserver (in-process, standalone store, fresh etcd) receives N CiliumEndpoints (one IPv4 each):

- `apply`: the endpoints are created through the standalone store, as `clustermesh apply` does, 64 at a time;
  ipcache_s is the time from the first create until all N ipcache keys are in etcd (seen by a watcher);
- `bulk`: the endpoints are written into the store's `registry/` in raw batched transactions (a bulk load);
  bulk_s is the time from the first write until all N ipcache keys are in etcd;
- `start`: the store is bulk-loaded first, then the apiserver starts (issue 14): it lists the N objects (the
  store's linear split listing) and publishes them; start_s is the time from its start until all N ipcache keys
  are in etcd;
- baseline: the same N ipcache keys and values written with raw batched transactions (128 per transaction,
  8 in flight), raw_s.

ipcache_ratio = ipcache_s / raw_s (apply included); ipcache_bulk_ratio = bulk_s / raw_s (the
apiserver's own pipeline: watch, convert, write). Usage: python bench/apiserver.py [--quick] [--count N].
The last line is one JSON object of all figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time

import msgspec

import certs
from apiserver.server import Apiserver, ApiserverConfig
from clustermesh.daemon.tasks import wait_while_running
from clustermesh.model import keys, wire
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.converters import cilium_endpoint_to_ip_pairs
from clustermesh.model.kinds import Object, kind_by_name
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from clustermesh.resources.standalone import StandaloneStore, registry_key
from kvstore import etcd
from kvstore.backend import PutOp
from kvstore.config import EtcdConfig
from kvstore.watching import WatchStore

CLUSTER = ClusterInfo("bench", 5)
ENDPOINT = kind_by_name("CiliumEndpoint")
IN_FLIGHT_APPLY = 64


def endpoints(count: int) -> list[Object]:
    first = (CLUSTER.id << 16) + 256
    return [
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEndpoint",
            "metadata": {"name": f"pod-{i:05d}", "namespace": f"ns-{i % 20}"},
            "status": {
                "id": i,
                "identity": {"id": first + i % 50, "labels": ["k8s:app=bench"]},
                "networking": {
                    "addressing": [{"ipv4": f"10.{50 + i // 65536}.{i // 256 % 256}.{i % 256}"}],
                    "node": f"172.18.{i // 250 % 250}.{i % 250 + 1}",
                },
                "service-account": "default",
                "state": "ready",
            },
        }
        for i in range(count)
    ]


class Counter:
    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = asyncio.Event()

    def on_upsert(self, key: str, value: bytes) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()

    def on_delete(self, key: str, value: bytes) -> None:
        self.count -= 1


async def _watch_ipcache(backend: etcd.EtcdBackend, target: int) -> tuple[Counter, asyncio.Task[None]]:
    counter = Counter(target)
    store: WatchStore[bytes] = WatchStore(prefix=keys.ipcache_key_prefix(), decode=lambda k, v: v, observer=counter)
    task = asyncio.create_task(store.run(backend))
    await store.synced.wait()
    return counter, task


async def _bulk_load(backend: etcd.EtcdBackend, objects: list[Object]) -> None:
    encoder = msgspec.json.Encoder()
    semaphore = asyncio.Semaphore(8)

    async def write(batch: list[Object]) -> None:
        async with semaphore:
            await backend.commit([PutOp(registry_key(ENDPOINT, o["metadata"]["name"], o["metadata"]["namespace"]),
                                        encoder.encode(o)) for o in batch])  # fmt: skip

    await asyncio.gather(*(write(objects[i : i + 128]) for i in range(0, len(objects), 128)))


async def _stop(running: asyncio.Task[None], watching: asyncio.Task[None], *backends: etcd.EtcdBackend) -> None:
    for task in (running, watching):
        task.cancel()
    await asyncio.gather(running, watching, return_exceptions=True)
    for backend in backends:
        await backend.close()


async def _start_from_loaded_store(config: EtcdConfig, objects: list[Object]) -> float:
    """The store holds the N objects before the apiserver starts: from its start until every ipcache key is in."""
    backend = await etcd.connect(config)
    watcher_backend = await etcd.connect(config)
    await _bulk_load(backend, objects)
    counter, watching = await _watch_ipcache(watcher_backend, len(objects))
    started = time.perf_counter()
    apiserver = Apiserver(ApiserverConfig(CLUSTER), backend, StandaloneStore(backend))
    running = asyncio.create_task(apiserver.run())
    try:
        await wait_while_running(counter.done.wait(), running, timeout=1200, what="the ipcache keys in etcd")
        return time.perf_counter() - started
    finally:
        await _stop(running, watching, backend, watcher_backend)


async def _with_apiserver(config: EtcdConfig, objects: list[Object], *, bulk: bool) -> tuple[float, float]:
    backend = await etcd.connect(config)
    watcher_backend = await etcd.connect(config)
    resources = StandaloneStore(backend)
    apiserver = Apiserver(ApiserverConfig(CLUSTER), backend, resources)
    running = asyncio.create_task(apiserver.run())
    counter, watching = await _watch_ipcache(watcher_backend, len(objects))
    try:
        await apiserver.ready.wait()
        started = time.perf_counter()
        if bulk:
            await _bulk_load(backend, objects)
        else:
            semaphore = asyncio.Semaphore(IN_FLIGHT_APPLY)

            async def create(obj: Object) -> None:
                async with semaphore:
                    await resources.create(obj)

            await asyncio.gather(*(create(obj) for obj in objects))
        applied = time.perf_counter() - started
        await wait_while_running(counter.done.wait(), running, timeout=600, what="the ipcache keys in etcd")
        return applied, time.perf_counter() - started
    finally:
        await _stop(running, watching, backend, watcher_backend)


async def _raw(config: EtcdConfig, objects: list[Object]) -> float:
    items = [(keys.ip_key(p.key_name()), wire.encode(p)) for o in objects for p in cilium_endpoint_to_ip_pairs(o)]
    backend = await etcd.connect(config)
    try:
        semaphore = asyncio.Semaphore(8)
        started = time.perf_counter()

        async def write(batch: list[tuple[str, bytes]]) -> None:
            async with semaphore:
                await backend.commit([PutOp(k, v) for k, v in batch])

        await asyncio.gather(*(write(items[i : i + 128]) for i in range(0, len(items), 128)))
        return time.perf_counter() - started
    finally:
        await backend.close()


class Etcd:
    def __init__(self, base: Path, pki: certs.ClusterPKI, name: str) -> None:
        self.spec = EtcdSpec(
            name=name, data_dir=base / name, ca_file=pki.ca.cert, cert_file=pki.server.cert, key_file=pki.server.key
        )
        self.process = EtcdProcess(self.spec)
        root = pki.user("root")
        self.config = EtcdConfig([self.spec.client_url], pki.ca.cert, root.cert, root.key)

    def __enter__(self) -> Etcd:
        self.process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()
        shutil.rmtree(self.spec.data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--start-only",
        action="store_true",
        help="only the start from a bulk-loaded store, and the raw baseline (for large counts)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    objects = endpoints(args.count)
    print(f"{args.count} CiliumEndpoints (one IPv4 each), {rounds} round(s), each on a fresh etcd")
    base = Path(tempfile.mkdtemp(prefix="bench-apiserver-"))
    results: dict[str, list[float]] = {"apply": [], "ipcache": [], "bulk": [], "start": [], "raw": []}
    try:
        pki = certs.create_cluster_pki(base / "pki", "bench")
        for number in range(rounds):
            with Etcd(base, pki, f"raw{number}") as server:
                results["raw"].append(asyncio.run(_raw(server.config, objects)))
            with Etcd(base, pki, f"start{number}") as server:
                results["start"].append(asyncio.run(_start_from_loaded_store(server.config, objects)))
            if args.start_only:
                print(f"  round {number + 1}: raw {results['raw'][-1]:.2f} s, start from a bulk-loaded store -> "
                      f"ipcache {results['start'][-1]:.2f} s", file=sys.stderr)  # fmt: skip
                continue
            with Etcd(base, pki, f"apply{number}") as server:
                applied, total = asyncio.run(_with_apiserver(server.config, objects, bulk=False))
                results["apply"].append(applied)
                results["ipcache"].append(total)
            with Etcd(base, pki, f"bulk{number}") as server:
                results["bulk"].append(asyncio.run(_with_apiserver(server.config, objects, bulk=True))[1])
            print(
                f"  round {number + 1}: raw {results['raw'][-1]:.2f} s, apply {results['apply'][-1]:.2f} s -> "
                f"ipcache {results['ipcache'][-1]:.2f} s, bulk load -> ipcache {results['bulk'][-1]:.2f} s",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in results.items() if values}
    figures: dict[str, float] = {
        "count": args.count,
        "raw_s": round(median["raw"], 3),
        "start_s": round(median["start"], 3),
        "start_ratio": round(median["start"] / median["raw"], 2),
    }
    if args.start_only:
        print(
            f"start from a store of {args.count} endpoints -> all ipcache keys in etcd: {figures['start_s']} s; "
            f"raw batched writes of the keys: {figures['raw_s']} s -> start_ratio {figures['start_ratio']}"
        )
        print(json.dumps({"bench": "apiserver", **figures}))
        return
    figures |= {
        "apply_s": round(median["apply"], 3),
        "apply_per_s": round(args.count / median["apply"]),
        "ipcache_s": round(median["ipcache"], 3),
        "ipcache_ratio": round(median["ipcache"] / median["raw"], 2),
        "bulk_s": round(median["bulk"], 3),
        "ipcache_bulk_ratio": round(median["bulk"] / median["raw"], 2),
    }
    print(
        f"apply {args.count} endpoints -> all ipcache keys in etcd: {figures['ipcache_s']} s "
        f"(apply alone {figures['apply_s']} s); raw batched writes of the keys: {figures['raw_s']} s "
        f"-> ipcache_ratio {figures['ipcache_ratio']}; bulk-loaded store -> keys {figures['bulk_s']} s "
        f"-> ipcache_bulk_ratio {figures['ipcache_bulk_ratio']}; start from a loaded store -> keys "
        f"{figures['start_s']} s -> start_ratio {figures['start_ratio']}"
    )
    print(json.dumps({"bench": "apiserver", **figures}))


if __name__ == "__main__":
    main()
