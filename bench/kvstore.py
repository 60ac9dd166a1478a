"""Benchmark of the kvstore against the raw etcd client, measured in the same run on the same machine.

1. publish: N node-sized values (~700 bytes of Cilium Node JSON) written by a SyncStore (batched transactions,
   leases of 1000 keys, several transactions in flight), against the same bytes written with raw etcd3aio
   transactions of the same size and concurrency, with the same leases. Each run gets a fresh etcd.
   publish_ratio = SyncStore rate / raw rate (goal >= 0.8).
2. sync: a WatchStore's initial sync of the N entries (paged list, decode into wire.Node with validation, observer
   called), against a raw paged list with etcd3aio and a msgspec decode of each value.
   sync_ratio = WatchStore time / raw time (goal <= 1.25).

Usage: python bench/kvstore.py [--quick] [--count N]. The last line of output is one JSON object of all figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the `kvstore` package: run as a script, its own folder must not shadow it.
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
from etcd3aio.kv import KVService, prefix_range_end

import certs
from clustermesh.model import keys, wire
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from kvstore import etcd
from kvstore.config import EtcdConfig
from kvstore.leases import LeaseManager
from kvstore.syncing import SyncStore
from kvstore.watching import WatchStore

PREFIX = keys.nodes_key_prefix("bench")
BATCH = 128
IN_FLIGHT = 8


def node_values(count: int) -> dict[str, bytes]:
    values = {}
    for i in range(count):
        a, b = divmod(i, 250)
        node = wire.Node(
            Name=f"node-{i:06d}",
            Cluster="bench",
            IPAddresses=[
                wire.Address(Type="InternalIP", IP=f"172.18.{a % 250}.{b + 1}"),
                wire.Address(Type="InternalIP", IP=f"fc00:c111::{a:x}:{b:x}"),
                wire.Address(Type="CiliumInternalIP", IP=f"10.{a % 250}.{b}.10"),
            ],
            IPv4AllocCIDR=wire.ip_net(f"10.{a % 250}.{b}.0/24"),
            IPv6AllocCIDR=wire.ip_net(f"fd00:10:{a:x}:{b:x}::/64"),
            IPv4HealthIP=f"10.{a % 250}.{b}.134",
            ClusterID=7,
            Source="custom-resource",
            Labels={"kubernetes.io/hostname": f"node-{i:06d}", "topology.kubernetes.io/zone": "zone-a"},
            Annotations={"network.cilium.io/wg-pub-key": "VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI="},
            WireguardPubKey="VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI=",
            BootID="570d3fd1-93db-4862-ba99-6a3c2c10c38f",
        )
        values[node.key_name().split("/", 1)[1]] = wire.encode(node)
    return values


class Etcd:
    def __init__(self, base: Path, pki: certs.ClusterPKI, name: str) -> None:
        self.spec = EtcdSpec(
            name=name, data_dir=base / name, ca_file=pki.ca.cert, cert_file=pki.server.cert, key_file=pki.server.key
        )
        self.process = EtcdProcess(self.spec)
        self.config = EtcdConfig([self.spec.client_url], pki.ca.cert, pki.user("root").cert, pki.user("root").key)

    def __enter__(self) -> Etcd:
        self.process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()
        shutil.rmtree(self.spec.data_dir, ignore_errors=True)


async def publish_with_syncstore(config: EtcdConfig, values: dict[str, bytes]) -> float:
    backend = await etcd.connect(config)
    try:
        leases = LeaseManager(backend)
        store = SyncStore(backend, prefix=PREFIX, leases=leases, batch_size=BATCH, in_flight=IN_FLIGHT)
        task = asyncio.create_task(store.run())
        started = time.perf_counter()
        for name, value in values.items():
            store.upsert(name, value)
        await store.wait_idle()
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await backend.count_prefix(PREFIX) == len(values)
        return elapsed
    finally:
        await backend.close()


async def publish_raw(config: EtcdConfig, values: dict[str, bytes]) -> float:
    """The baseline: etcd3aio's KV service, prepared requests, the same batches, leases and concurrency."""
    backend = await etcd.connect(config)  # only for its channel; the writes below are the raw client's
    kv = KVService(backend._channel, max_attempts=1)
    try:
        items = [(PREFIX + name, value) for name, value in values.items()]
        started = time.perf_counter()
        leases = [await backend.grant_lease(900) for _ in range(0, len(items), 1000)]
        batches = [
            [
                KVService.txn_op_put(key, value, lease=leases[(start + j) // 1000])
                for j, (key, value) in enumerate(chunk)
            ]
            for start in range(0, len(items), BATCH)
            for chunk in [items[start : start + BATCH]]
        ]
        semaphore = asyncio.Semaphore(IN_FLIGHT)

        async def send(ops: list[object]) -> None:
            async with semaphore:
                await kv.txn([], ops)  # type: ignore[arg-type]

        await asyncio.gather(*(send(batch) for batch in batches))
        elapsed = time.perf_counter() - started
        assert await backend.count_prefix(PREFIX) == len(values)
        return elapsed
    finally:
        await backend.close()


async def fill(config: EtcdConfig, values: dict[str, bytes]) -> None:
    backend = await etcd.connect(config)
    try:
        from kvstore.backend import PutOp

        items = list(values.items())
        semaphore = asyncio.Semaphore(IN_FLIGHT)

        async def send(chunk: list[tuple[str, bytes]]) -> None:
            async with semaphore:
                await backend.commit([PutOp(PREFIX + name, value) for name, value in chunk])

        await asyncio.gather(*(send(items[i : i + BATCH]) for i in range(0, len(items), BATCH)))
    finally:
        await backend.close()


class Counter:
    def __init__(self) -> None:
        self.upserts = 0

    def on_upsert(self, key: str, value: object) -> None:
        self.upserts += 1

    def on_delete(self, key: str, value: object) -> None:
        pass


async def sync_with_watchstore(config: EtcdConfig, count: int) -> float:
    backend = await etcd.connect(config)
    try:
        observer = Counter()
        store = WatchStore(prefix=PREFIX, decode=wire.decoder_for(wire.Node), observer=observer)
        started = time.perf_counter()
        task = asyncio.create_task(store.run(backend))
        await store.synced.wait()
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert observer.upserts == count, observer.upserts
        return elapsed
    finally:
        await backend.close()


async def sync_raw(config: EtcdConfig, count: int) -> float:
    """The baseline: etcd3aio range requests, paged like ours, and a msgspec decode of each value."""
    backend = await etcd.connect(config)
    kv = KVService(backend._channel, max_attempts=1)
    decoder = msgspec.json.Decoder(wire.Node)
    try:
        started = time.perf_counter()
        decoded: dict[str, wire.Node] = {}
        start, end, revision = PREFIX.encode(), prefix_range_end(PREFIX), 0
        while True:
            response = await kv.get(start, end, revision=revision, limit=etcd.LIST_PAGE_SIZE)
            revision = revision or response.header.revision
            for item in response.kvs:
                decoded[item.key.decode()] = decoder.decode(item.value)
            if not response.more or not response.kvs:
                break
            start = response.kvs[-1].key + b"\x00"
        elapsed = time.perf_counter() - started
        assert len(decoded) == count
        return elapsed
    finally:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k values and one round instead of 100k and three")
    parser.add_argument("--count", type=int, default=None, help="number of values (default 100000, quick 20000)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    count = args.count or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)

    values = node_values(count)
    size = statistics.mean(len(v) for v in values.values())
    encode_started = time.perf_counter()
    node = wire.decode(wire.Node, "k", next(iter(values.values())))
    for _ in range(10_000):
        wire.encode(node)
    encode_rate = 10_000 / (time.perf_counter() - encode_started)
    print(f"{count} node values of {size:.0f} bytes on average; {rounds} round(s) each; encode {encode_rate:,.0f}/s")

    base = Path(tempfile.mkdtemp(prefix="bench-kvstore-"))
    figures: dict[str, float] = {}
    try:
        pki = certs.create_cluster_pki(base / "pki", "bench")
        raw_times, store_times, list_raw, list_store = [], [], [], []
        for round_number in range(rounds):
            with Etcd(base, pki, f"raw{round_number}") as server:
                raw_times.append(asyncio.run(publish_raw(server.config, values)))
            with Etcd(base, pki, f"store{round_number}") as server:
                store_times.append(asyncio.run(publish_with_syncstore(server.config, values)))
            print(
                f"  round {round_number + 1}: publish raw {count / raw_times[-1]:,.0f}/s, "
                f"SyncStore {count / store_times[-1]:,.0f}/s",
                file=sys.stderr,
            )
        with Etcd(base, pki, "sync") as server:
            asyncio.run(fill(server.config, values))
            asyncio.run(sync_raw(server.config, count))  # warm etcd's caches once, for both
            for round_number in range(rounds):
                # Alternate which goes first, so neither always meets a warmer server.
                first, second = (
                    (sync_raw, sync_with_watchstore) if round_number % 2 == 0 else (sync_with_watchstore, sync_raw)
                )
                results = {first: asyncio.run(first(server.config, count))}
                results[second] = asyncio.run(second(server.config, count))
                list_raw.append(results[sync_raw])
                list_store.append(results[sync_with_watchstore])
                print(
                    f"  round {round_number + 1}: initial sync raw {list_raw[-1]:.2f} s, "
                    f"WatchStore {list_store[-1]:.2f} s",
                    file=sys.stderr,
                )
        raw_rate = count / statistics.median(raw_times)
        store_rate = count / statistics.median(store_times)
        figures = {
            "count": count,
            "value_bytes": round(size),
            "publish_raw_per_s": round(raw_rate),
            "publish_syncstore_per_s": round(store_rate),
            "publish_ratio": round(store_rate / raw_rate, 3),
            "sync_raw_s": round(statistics.median(list_raw), 3),
            "sync_watchstore_s": round(statistics.median(list_store), 3),
            "sync_ratio": round(statistics.median(list_store) / statistics.median(list_raw), 3),
            "encode_per_s": round(encode_rate),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"publish: SyncStore {figures['publish_syncstore_per_s']:,}/s vs raw txn {figures['publish_raw_per_s']:,}/s"
        f" -> ratio {figures['publish_ratio']} (goal >= 0.8)"
    )
    print(
        f"initial sync: WatchStore {figures['sync_watchstore_s']} s vs raw list+decode {figures['sync_raw_s']} s"
        f" -> ratio {figures['sync_ratio']} (goal <= 1.25)"
    )
    print(json.dumps({"bench": "kvstore", **figures}))


if __name__ == "__main__":
    main()
