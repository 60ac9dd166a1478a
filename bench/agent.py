"""Benchmark of the agent's control plane on a remote cluster, against raw etcd reads measured in the same run.

1. sync: a remote cluster's etcd holds N ipcache entries (plus its nodes, cluster-config, canaries, heartbeat). An
   agent (a `Mesh` with that cluster in its config directory) connects, checks, waits for the canaries, lists,
   validates and fills its merged view; sync_s is the time until the view holds all N. The baseline lists the same
   keys with raw etcd3aio range requests (same page size) and decodes each value with msgspec: raw_s. Both start
   from nothing: the agent's time includes connecting and checking, the raw one connecting and one read.
   sync_ratio = sync_s / raw_s (goal <= 1.25).
   raw_split_s: the same keys listed raw by sub-ranges (the store's linear listing, split at the nodes' pod CIDRs as
   the agent splits it) and decoded; us_per_entry = (sync_s - raw_split_s) / N in µs: the agent's own cost per
   entry beyond reading the keys (goal: at 1M within 1.2x of 100k).
2. memory: traced Python memory held by the agent after the sync (its WatchStores and merged view), per entry:
   bytes_per_endpoint (goal <= 1.5 KiB).
3. propagation: once the agent's view holds the N entries, a writer in another process puts ipcache entries at 200
   changes/s, each carrying its send time (same host clock); the agent notes when each reaches its merged view.
   propagation_p50_ms, propagation_p99_ms (goal p99 <= 50 ms on loopback; issue 14: <= 20 ms with 1M entries).

Usage: python bench/agent.py [--quick] [--count N]. The last line is one JSON object of all figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import tempfile
import time
import tracemalloc

import msgspec
import yaml
from etcd3aio import Etcd3Client
from etcd3aio.kv import prefix_range_end

import certs
from agent.mesh import Mesh
from clustermesh.daemon.tasks import wait_while_running
from clustermesh.model import keys, wire
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.converters import cluster_config
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from kvstore import etcd, users
from kvstore.backend import PutOp
from kvstore.config import EtcdConfig
from kvstore.ranges import cidr_key_prefixes

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ClusterInfo("local", 1)
REMOTE = ClusterInfo("remote", 2)
IDENTITY = (2 << 16) + 300


def entry(i: int, metadata: str = "") -> tuple[str, bytes]:
    ip = f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"
    pair = wire.IPIdentityPair(IP=ip, HostIP=f"192.168.{i // 250 % 250}.{i % 250 + 1}", ID=IDENTITY,
                               Metadata=metadata, K8sNamespace=f"ns-{i % 20}", K8sPodName=f"pod-{i:06d}",
                               K8sServiceAccount="default")  # fmt: skip
    return keys.ip_key(ip), wire.encode(pair)


def nodes(info: ClusterInfo, count: int) -> list[wire.Node]:
    """Nodes whose pod CIDRs hold the endpoints (admission requires it): one /16 per 65,536, and the writer's
    (none for a cluster that publishes no endpoints)."""
    if not count:
        return []
    second_octets = [*range(100, 100 + (count + 65535) // 65536), 200]
    return [
        wire.Node(
            Name=f"node-{octet}",
            Cluster=info.name,
            ClusterID=info.id,
            IPv4AllocCIDR=wire.ip_net(f"10.{octet}.0.0/16"),
            IPAddresses=[wire.Address(Type="InternalIP", IP=f"192.168.250.{octet - 99}")],
        )
        for octet in second_octets
    ]


class Cluster:
    """An etcd with a PKI, as a cluster's; `publish` writes the keys an apiserver would."""

    def __init__(self, base: Path, info: ClusterInfo, ca: certs.Issued) -> None:
        self.info = info
        self.pki = certs.ClusterPKI(base / info.name / "pki")
        certs.write_issued(ca, self.pki.ca)
        certs.write_issued(certs.issue_server(ca, f"etcd-{info.name}", hosts=["127.0.0.1"]), self.pki.server)
        for user in ("root", f"agent-{info.name}", "remote-local"):
            certs.write_issued(certs.issue_client(ca, user), self.pki.user(user))
        spec = EtcdSpec(name=info.name, data_dir=base / info.name / "data", ca_file=self.pki.ca.cert,
                        cert_file=self.pki.server.cert, key_file=self.pki.server.key)  # fmt: skip
        self.process = EtcdProcess(spec)

    def config(self, user: str = "root") -> EtcdConfig:
        paths = self.pki.user(user)
        return EtcdConfig([self.process.spec.client_url], self.pki.ca.cert, paths.cert, paths.key)

    async def publish(self, count: int) -> None:
        backend = await etcd.connect(self.config())
        try:
            await users.ensure_cluster_users(backend, self.info.name)
            await users.ensure_remote_user(backend, self.info.name, "local")
            items = [entry(i) for i in range(count)]
            semaphore = asyncio.Semaphore(8)

            async def write(chunk: list[tuple[str, bytes]]) -> None:
                async with semaphore:
                    await backend.commit([PutOp(k, v) for k, v in chunk])

            await asyncio.gather(*(write(items[i : i + 128]) for i in range(0, len(items), 128)))
            fixed = [
                PutOp(keys.cluster_config_key(self.info.name), wire.encode(cluster_config(self.info))),
                PutOp(keys.HEARTBEAT_KEY, b"2026-01-01T00:00:00Z"),
                *(
                    PutOp(keys.node_key(self.info.name, node.Name), wire.encode(node))
                    for node in nodes(self.info, count)
                ),
            ]
            prefixes = (keys.NODES_PREFIX, keys.IPCACHE_PREFIX, keys.IDENTITIES_PREFIX, keys.SERVICES_PREFIX)
            fixed += [PutOp(keys.synced_key(self.info.name, p), b"2026-01-01T00:00:00Z") for p in prefixes]
            await backend.commit(fixed)
        finally:
            await backend.close()


async def raw_sync(config: EtcdConfig, count: int) -> float:
    """Connect with the raw client (mTLS, one round trip to be sure it answers), list, decode: from nothing, like
    the agent's sync."""
    started = time.perf_counter()
    client = Etcd3Client([config.endpoints[0].removeprefix("https://")], ca_cert=config.ca_file.read_bytes(),
                         cert_key=config.key_file.read_bytes(), cert_chain=config.cert_file.read_bytes(),
                         rpc_max_attempts=1)  # fmt: skip
    await client.connect()
    assert client.kv is not None
    kv = client.kv
    decoder = msgspec.json.Decoder(wire.IPIdentityPair)
    prefix = keys.ipcache_key_prefix()
    try:
        await kv.get(keys.cluster_config_key(REMOTE.name))
        decoded = {}
        start, end, revision = prefix.encode(), prefix_range_end(prefix), 0
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
        await client.close()


async def raw_split_sync(config: EtcdConfig, count: int) -> float:
    """Connect, list the ipcache by sub-ranges split at the remote nodes' pod CIDRs (what the agent does, without
    the agent), decode each value: the floor of the agent's sync."""
    started = time.perf_counter()
    backend = await etcd.connect(config)
    decoder = msgspec.json.Decoder(wire.IPIdentityPair)
    prefix = keys.ipcache_key_prefix()
    splits = cidr_key_prefixes(prefix, [str(node.IPv4AllocCIDR.network()) for node in nodes(REMOTE, count)
                                        if node.IPv4AllocCIDR is not None])  # fmt: skip
    try:
        await backend.get(keys.cluster_config_key(REMOTE.name))
        decoded = {}
        async for page in backend.list_pages(prefix, splits=splits):
            for item in page.entries:
                decoded[item.key] = decoder.decode(item.value)
        elapsed = time.perf_counter() - started
        assert len(decoded) == count
        return elapsed
    finally:
        await backend.close()


def write_config(directory: Path, cluster: Cluster) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    remote = cluster.config("remote-local")
    (directory / cluster.info.name).write_text(yaml.safe_dump({
        "endpoints": remote.endpoints, "trusted-ca-file": str(remote.ca_file), "cert-file": str(remote.cert_file),
        "key-file": str(remote.key_file)}))  # fmt: skip


async def agent_sync(local: Cluster, config_dir: Path, count: int, *, trace: bool) -> tuple[float, float | None]:
    # The bench writes one heartbeat and no more: do not let the watchdog call the clusters stale meanwhile.
    mesh = Mesh(LOCAL, local.config(f"agent-{LOCAL.name}"), config_dir, scan_interval=0.05, heartbeat_max_age=3600)
    done = asyncio.Event()
    subscription = mesh.view.subscribe()

    async def count_changes() -> None:
        while True:
            await subscription.drain()
            if mesh.view.count(REMOTE.name, "ipcache") >= count:
                done.set()

    gc.collect()
    if trace:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if trace else 0
    started = time.perf_counter()
    counter = asyncio.create_task(count_changes())
    task = asyncio.create_task(mesh.run())
    try:
        await wait_while_running(done.wait(), task, timeout=600, what=f"the agent's sync of {count} endpoints")
        elapsed = time.perf_counter() - started
        per_entry = None
        if trace:
            subscription.close()
            subscription.pending.clear()
            gc.collect()
            per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
            tracemalloc.stop()
        return elapsed, per_entry
    finally:
        for t in (task, counter):
            t.cancel()
        await asyncio.gather(task, counter, return_exceptions=True)


WRITER = """
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from kvstore import etcd
from kvstore.config import EtcdConfig
from clustermesh.model import keys, wire

async def main():
    config = EtcdConfig([{url!r}], Path({ca!r}), Path({cert!r}), Path({key!r}))
    backend = await etcd.connect(config)
    rate, total = {rate}, {total}
    start = time.perf_counter()
    for i in range(total):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        ip = f"10.200.{{i // 256 % 256}}.{{i % 256}}"
        pair = wire.IPIdentityPair(IP=ip, HostIP="192.168.9.9", ID={identity}, Metadata=repr(time.time()))
        await backend.put(keys.ip_key(ip), wire.encode(pair))
    await backend.close()

asyncio.run(main())
"""


async def mesh_ready(mesh: Mesh) -> None:
    while not (mesh.status().ready and len(mesh.remotes) == 2):
        mesh.changed.clear()
        await mesh.changed.wait()


async def propagation(local: Cluster, remote: Cluster, config_dir: Path, seconds: float) -> list[float]:
    mesh = Mesh(LOCAL, local.config(f"agent-{LOCAL.name}"), config_dir, scan_interval=0.05, heartbeat_max_age=3600)
    delays: list[float] = []
    total = int(200 * seconds)
    task = asyncio.create_task(mesh.run())
    try:
        await wait_while_running(mesh_ready(mesh), task, timeout=600, what="the agent's mesh getting ready")
        # subscribed once the view holds every entry: what is measured is a change reaching a full view, not this
        # probe working through the initial sync's million announcements first
        subscription = mesh.view.subscribe()
        root = remote.config()
        code = WRITER.format(root=str(ROOT), url=root.endpoints[0],
                             ca=str(root.ca_file), cert=str(root.cert_file), key=str(root.key_file), rate=200,
                             total=total, identity=IDENTITY)  # fmt: skip
        writer = await asyncio.create_subprocess_exec(sys.executable, "-c", code)

        async def collect() -> None:
            while len(delays) < total:
                change = await subscription.get()
                if change.kind == "ipcache" and change.op == "upsert" and change.value.Metadata:
                    delays.append(time.time() - float(change.value.Metadata))

        writing = asyncio.create_task(writer.wait(), name="the writer process")
        await wait_while_running(collect(), task, timeout=seconds * 4 + 60, what=f"{total} changes in the view")
        await writing
        return delays
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k entries, one round, 5 s of changes")
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args()
    count = args.count or (20_000 if args.quick else 100_000)
    rounds = 1 if args.quick else 3
    seconds = 5.0 if args.quick else 15.0
    base = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    ca = certs.create_ca("bench-ca")
    local, remote = Cluster(base, LOCAL, ca), Cluster(base, REMOTE, ca)
    print(f"remote cluster with {count} ipcache entries; {rounds} round(s); {seconds:.0f} s of changes at 200/s")
    try:
        local.process.start()
        remote.process.start()
        asyncio.run(local.publish(0))
        asyncio.run(remote.publish(count))
        config_dir = base / "remotes"
        write_config(config_dir, remote)
        asyncio.run(raw_sync(remote.config("remote-local"), count))  # warm etcd's caches once, for both
        raw, split, synced = [], [], []
        for number in range(rounds):  # the order alternates: none always runs on the caches another warmed
            for which in ("raw", "split", "agent") if number % 2 == 0 else ("agent", "split", "raw"):
                if which == "raw":
                    raw.append(asyncio.run(raw_sync(remote.config("remote-local"), count)))
                elif which == "split":
                    split.append(asyncio.run(raw_split_sync(remote.config("remote-local"), count)))
                else:
                    synced.append(asyncio.run(agent_sync(local, config_dir, count, trace=False))[0])
            print(f"  round {number + 1}: raw paged list+decode {raw[-1]:.2f} s, raw split list+decode "
                  f"{split[-1]:.2f} s, agent sync {synced[-1]:.2f} s", file=sys.stderr)  # fmt: skip
        _, per_entry = asyncio.run(agent_sync(local, config_dir, count, trace=True))
        assert per_entry is not None
        delays = asyncio.run(propagation(local, remote, config_dir, seconds))
    finally:
        local.process.stop()
        remote.process.stop()
        shutil.rmtree(base, ignore_errors=True)
    figures = {
        "count": count,
        "raw_s": round(statistics.median(raw), 3),
        "sync_s": round(statistics.median(synced), 3),
        "sync_ratio": round(statistics.median(synced) / statistics.median(raw), 3),
        "raw_split_s": round(statistics.median(split), 3),
        "us_per_entry": round((statistics.median(synced) - statistics.median(split)) / count * 1e6, 2),
        "bytes_per_endpoint": round(per_entry),
        "propagation_changes": len(delays),
        "propagation_p50_ms": round(percentile(delays, 0.50) * 1000, 2),
        "propagation_p99_ms": round(percentile(delays, 0.99) * 1000, 2),
        "propagation_max_ms": round(max(delays) * 1000, 2),
    }
    print(
        f"initial sync of {count} endpoints: agent {figures['sync_s']} s vs raw list+decode {figures['raw_s']} s -> "
        f"sync_ratio {figures['sync_ratio']} (goal <= 1.25); raw split list+decode {figures['raw_split_s']} s, "
        f"the agent's own cost {figures['us_per_entry']} µs per entry; "
        f"memory {figures['bytes_per_endpoint']} B per endpoint "
        f"(goal <= 1536); propagation at 200/s p50 {figures['propagation_p50_ms']} ms, "
        f"p99 {figures['propagation_p99_ms']} ms (goal p99 <= 50 ms)"
    )
    print(json.dumps({"bench": "agent", **figures}))


if __name__ == "__main__":
    main()
