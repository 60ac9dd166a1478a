"""`make demo`: a cluster's state published into a real etcd over mTLS and read back by a read-only remote user.

Every step prints what it does. Everything started is stopped by its PID at the end, also on Ctrl-C or an error,
and the temporary folder is removed unless `--workdir` was given.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import certs
from clustermesh import output
from clustermesh.model import keys, wire
from clustermesh.model.identities import identity_range
from clustermesh.model.labels import Label, format_label_string
from kvstore import errors, etcd, users
from kvstore.config import EtcdConfig
from kvstore.heartbeat import HeartbeatWriter
from kvstore.leases import LeaseManager
from kvstore.process import EtcdProcess, EtcdSpec
from kvstore.syncing import SyncStore
from kvstore.watching import WatchStore

__all__ = ["main"]

CLUSTER = "demo1"
CLUSTER_ID = 1
PEER = "demo2"


def _identity_labels(app: str, namespace: str) -> str:
    return format_label_string(
        [
            Label("k8s", "app", app),
            Label("k8s", "io.cilium.k8s.policy.cluster", CLUSTER),
            Label("k8s", "io.kubernetes.pod.namespace", namespace),
        ]
    )


def sample_cluster() -> dict[str, dict[str, bytes]]:
    """A small cluster in Cilium's wire format: prefix -> {key name: value}."""
    first = identity_range(CLUSTER_ID).allocatable_first
    identities = {first: ("web", "default"), first + 1: ("db", "default")}
    nodes = {}
    for index in (1, 2):
        node = wire.Node(
            Name=f"node-{index}",
            Cluster=CLUSTER,
            IPAddresses=[
                wire.Address(Type="InternalIP", IP=f"192.168.1.{10 + index}"),
                wire.Address(Type="CiliumInternalIP", IP=f"10.1.{index}.1"),
            ],
            IPv4AllocCIDR=wire.ip_net(f"10.1.{index}.0/24"),
            IPv4HealthIP=f"10.1.{index}.2",
            ClusterID=CLUSTER_ID,
            Source="custom-resource",
            Labels={"kubernetes.io/hostname": f"node-{index}"},
            BootID=f"00000000-0000-0000-0000-00000000000{index}",
        )
        nodes[node.key_name()] = wire.encode(node)
    ipcache = {}
    pods = [("web-1", 1, first), ("web-2", 2, first), ("db-1", 1, first + 1), ("db-2", 2, first + 1)]
    for number, (pod, node_index, identity) in enumerate(pods, start=10):
        pair = wire.make_ip_pair(
            ip=f"10.1.{node_index}.{number}",
            host_ip=f"192.168.1.{10 + node_index}",
            identity=identity,
            namespace="default",
            pod_name=pod,
            service_account="default",
        )
        ipcache[pair.key_name()] = wire.encode(pair)
    service = wire.ClusterService(
        cluster=CLUSTER,
        namespace="default",
        name="web",
        frontends={"10.96.0.10": {"http": wire.L4Addr(Protocol="TCP", Port=80)}},
        backends={ip: {"http": wire.L4Addr(Protocol="TCP", Port=8080)} for ip in ("10.1.1.10", "10.1.2.11")},
        selector={"app": "web"},
        includeExternal=True,
        shared=True,
        clusterID=CLUSTER_ID,
    )
    return {
        keys.NODES_PREFIX: nodes,
        keys.IPCACHE_PREFIX: ipcache,
        keys.IDENTITIES_PREFIX: {str(i): _identity_labels(*labels).encode() for i, labels in identities.items()},
        keys.SERVICES_PREFIX: {service.key_name(): wire.encode(service)},
    }


def _store_prefix(prefix: str) -> str:
    """Where a state prefix's keys live: Cilium puts ipcache and identities one level deeper."""
    if prefix == keys.IPCACHE_PREFIX:
        return keys.ipcache_key_prefix()
    if prefix == keys.IDENTITIES_PREFIX:
        return keys.identities_key_prefix()
    return prefix + "/"


async def publish(config: EtcdConfig) -> list[str]:
    """Publish the sample cluster as its apiserver would; return the keys written."""
    backend = await etcd.connect(config)
    try:
        leases = LeaseManager(backend)
        config_value = wire.ClusterConfig(
            id=CLUSTER_ID,
            capabilities=wire.ClusterConfigCapabilities(
                syncedCanaries=True, maxConnectedClusters=255, serviceExportsEnabled=False
            ),
        )
        await backend.put(
            keys.cluster_config_key(CLUSTER),
            wire.encode(config_value),
            lease=await leases.acquire(keys.cluster_config_key(CLUSTER)),
        )
        await HeartbeatWriter(backend, leases=leases).beat()
        stores = []
        for prefix, values in sample_cluster().items():
            store = SyncStore(
                backend,
                prefix=_store_prefix(prefix),
                synced_key=keys.synced_key(CLUSTER, prefix),
                leases=leases,
                name=prefix,
            )
            for name, value in values.items():
                store.upsert(name, value)
            store.mark_synced()
            stores.append(store)
        tasks = [asyncio.create_task(store.run()) for store in stores]
        try:
            await asyncio.wait_for(asyncio.gather(*(store.synced.wait() for store in stores)), 30)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        listing = await backend.list_prefix("cilium/")
        return [entry.key for entry in listing.entries]
    finally:
        await backend.close()


async def read_back(config: EtcdConfig) -> dict[str, dict[str, object]]:
    """Read every state prefix as a remote cluster's agent would: wait for each canary, list, decode, validate."""
    backend = await etcd.connect(config)
    decoders = {
        keys.NODES_PREFIX: wire.decoder_for(wire.Node),
        keys.IPCACHE_PREFIX: wire.decoder_for(wire.IPIdentityPair),
        keys.IDENTITIES_PREFIX: lambda key, data: data.decode(),
        keys.SERVICES_PREFIX: wire.decoder_for(wire.ClusterService),
    }
    views: dict[str, dict[str, object]] = {}
    try:
        for prefix, decode in decoders.items():
            store: WatchStore[object] = WatchStore(
                prefix=_store_prefix(prefix), decode=decode, synced_canary=keys.synced_key(CLUSTER, prefix)
            )
            task = asyncio.create_task(store.run(backend))
            try:
                await asyncio.wait_for(store.synced.wait(), 30)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            views[prefix] = dict(store.entries)
        try:
            await backend.put(keys.node_key(CLUSTER, "intruder"), b"{}")
        except errors.PermissionDenied as exc:
            views["refused"] = {"write": str(exc)}
    finally:
        await backend.close()
    return views


def show(views: dict[str, dict[str, object]]) -> None:
    nodes = [v for v in views[keys.NODES_PREFIX].values() if isinstance(v, wire.Node)]
    output.print_table(
        ["NODE", "CLUSTER", "ID", "INTERNAL IP", "POD CIDR"],
        [(n.Name, n.Cluster, n.ClusterID, ", ".join(n.addresses_of("InternalIP")), n.IPv4AllocCIDR) for n in nodes],
        title="nodes",
    )
    pairs = [v for v in views[keys.IPCACHE_PREFIX].values() if isinstance(v, wire.IPIdentityPair)]
    output.print_table(
        ["IP", "IDENTITY", "NODE", "POD"],
        [(p.IP, p.ID, p.HostIP, f"{p.namespace}/{p.pod_name}") for p in pairs],
        title="ipcache",
    )
    output.print_table(
        ["IDENTITY", "LABELS"],
        [(key.rsplit("/", 1)[-1], value) for key, value in views[keys.IDENTITIES_PREFIX].items()],
        title="identities",
    )
    services = [v for v in views[keys.SERVICES_PREFIX].values() if isinstance(v, wire.ClusterService)]
    output.print_table(
        ["SERVICE", "FRONTENDS", "BACKENDS", "SHARED"],
        [
            (f"{s.cluster}/{s.namespace}/{s.name}", ", ".join(s.frontends or {}), ", ".join(s.backends or {}), s.shared)
            for s in services
        ],
        title="global services",
    )


def main(workdir: Path | None = None) -> None:
    started = time.monotonic()
    keep = workdir is not None
    base = workdir or Path(tempfile.mkdtemp(prefix="clustermesh-demo-"))
    process: EtcdProcess | None = None
    try:
        output.step(f"creating the PKI of cluster {CLUSTER} in {base / 'pki'}")
        pki = certs.create_cluster_pki(base / "pki", CLUSTER, overwrite=True)
        certs.issue_user(pki, f"remote-{PEER}")
        spec = EtcdSpec(
            name=CLUSTER,
            data_dir=base / "etcd",
            ca_file=pki.ca.cert,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
        )
        shutil.rmtree(spec.data_dir, ignore_errors=True)
        process = EtcdProcess(spec)
        process.start()
        output.step(
            f"etcd is serving on {spec.client_url} (pid {process.pid}), mTLS only, client certificates required"
        )

        def config(user: str) -> EtcdConfig:
            paths = pki.user(user)
            return EtcdConfig([spec.client_url], pki.ca.cert, paths.cert, paths.key)

        async def set_up_users() -> None:
            backend = await etcd.connect(config("root"))
            try:
                await users.ensure_cluster_users(backend, CLUSTER)
                await users.ensure_remote_user(backend, CLUSTER, PEER)
            finally:
                await backend.close()

        asyncio.run(set_up_users())
        output.step(f"etcd users root, admin-{CLUSTER}, agent-{CLUSTER}, remote-{PEER} (read-only) created; auth on")
        written = asyncio.run(publish(config(f"admin-{CLUSTER}")))
        output.step(f"published cluster {CLUSTER} as admin-{CLUSTER}: {len(written)} keys")
        for key in written:
            output.out.print(f"    {key}")
        output.step(f"reading it back as remote-{PEER}, as a remote agent does (waiting for each synced canary)")
        views = asyncio.run(read_back(config(f"remote-{PEER}")))
        show(views)
        refused = views.get("refused", {}).get("write")
        output.step(f"remote-{PEER} tried to write a node key and was refused: {refused}")
    finally:
        if process is not None and process.pid is not None:
            output.step(f"stopping etcd (pid {process.pid})")
            process.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    output.step(f"demo done in {time.monotonic() - started:.1f} s")
