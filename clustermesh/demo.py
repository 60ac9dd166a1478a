"""`make demo`: two clusters, each with a real etcd (mTLS) and a real `clustermesh-apiserver` process, publish a
small cluster applied from YAML with `clustermesh apply`; the demo shows the keys in Cilium's format, then reads
cluster 1 the way cluster 2's agents will: as the read-only user `remote-c2`.

Every step prints what it does and the commands a user would type. Everything started is stopped by its PID at the
end, also on Ctrl-C or an error; the work folder is removed unless `--workdir` was given.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import certs
from clustermesh import output
from clustermesh.contexts import Context, ContextFile
from clustermesh.kubectl import apply_objects, load_manifests
from clustermesh.model import keys, wire
from clustermesh.processes import Child
from kvstore import errors, etcd, users
from kvstore.config import EtcdConfig
from kvstore.process import EtcdProcess, EtcdSpec
from kvstore.watching import WatchStore
from resources.standalone import StandaloneStore

__all__ = ["main"]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent


@dataclass
class DemoCluster:
    """One cluster of the demo: its PKI, its etcd and its apiserver."""

    name: str
    id: int
    base: Path
    etcd: EtcdProcess | None = None
    apiserver: Child | None = None
    health: str = ""
    pki: certs.ClusterPKI = field(init=False)

    def __post_init__(self) -> None:
        self.pki = certs.create_cluster_pki(self.base / self.name / "pki", self.name, overwrite=True)

    def config(self, user: str) -> EtcdConfig:
        assert self.etcd is not None
        paths = self.pki.user(user)
        if not paths.cert.exists():
            certs.issue_user(self.pki, user)
        return EtcdConfig([self.etcd.spec.client_url], self.pki.ca.cert, paths.cert, paths.key)

    def start_etcd(self) -> None:
        data = self.base / self.name / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        spec = EtcdSpec(
            name=self.name,
            data_dir=data,
            ca_file=self.pki.ca.cert,
            cert_file=self.pki.server.cert,
            key_file=self.pki.server.key,
        )
        self.etcd = EtcdProcess(spec)
        self.etcd.start()

    def start_apiserver(self) -> list[str]:
        admin = self.config(f"admin-{self.name}")
        command = [
            str(BIN / "clustermesh-apiserver"),
            "--cluster-name", self.name,
            "--cluster-id", str(self.id),
            "--source", "standalone",
            "--kvstore-endpoints", admin.endpoints[0],
            "--kvstore-ca", str(admin.ca_file),
            "--kvstore-cert", str(admin.cert_file),
            "--kvstore-key", str(admin.key_file),
            "--health-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0",
        ]  # fmt: skip
        self.apiserver = Child(f"apiserver {self.name}", command, self.base / self.name / "apiserver.log")
        self.apiserver.start()
        self.health = self.apiserver.wait_for(r"health endpoint listening on http://(\S+)").group(1)
        return command

    def stop(self) -> None:
        if self.apiserver is not None and self.apiserver.pid is not None:
            output.step(f"stopping the apiserver of {self.name} (pid {self.apiserver.pid})")
            self.apiserver.stop()
        if self.etcd is not None and self.etcd.pid is not None:
            output.step(f"stopping the etcd of {self.name} (pid {self.etcd.pid})")
            self.etcd.stop()


async def init_users(cluster: DemoCluster) -> None:
    backend = await etcd.connect(cluster.config("root"))
    try:
        await users.ensure_cluster_users(backend, cluster.name)
    finally:
        await backend.close()


async def apply(config: EtcdConfig, manifest: Path) -> list[str]:
    backend = await etcd.connect(config)
    try:
        outcomes = await apply_objects(StandaloneStore(backend), load_manifests([str(manifest)]))
    finally:
        await backend.close()
    return [f"{o.ref} {o.action}" + (f": {o.error}" if o.error else "") for o in outcomes]


class Changed:
    """An observer that only says that something changed."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def on_upsert(self, key: str, value: object) -> None:
        self.event.set()

    def on_delete(self, key: str, value: object) -> None:
        self.event.set()


async def wait_published(config: EtcdConfig, cluster: str, timeout: float = 30.0) -> dict[str, bytes]:
    """Until all four synced canaries of `cluster` exist, then every key under cilium/."""
    backend = await etcd.connect(config)
    try:
        canaries = [keys.synced_key(cluster, prefix) for prefix in
                    (keys.NODES_PREFIX, keys.IPCACHE_PREFIX, keys.IDENTITIES_PREFIX, keys.SERVICES_PREFIX)]  # fmt: skip
        changed = Changed()
        store: WatchStore[bytes] = WatchStore(prefix="cilium/", decode=lambda k, v: v, observer=changed)
        task = asyncio.create_task(store.run(backend))
        try:
            async with asyncio.timeout(timeout):
                await store.synced.wait()
                while not all(c in store.entries for c in canaries):
                    changed.event.clear()
                    await changed.event.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return dict(store.entries)
    finally:
        await backend.close()


def show_keys(cluster: str, entries: dict[str, bytes]) -> None:
    rows = []
    for key, value in sorted(entries.items()):
        text = value.decode(errors="replace")
        rows.append((key, text if len(text) <= 110 else text[:107] + "..."))
    output.print_table(["KEY", "VALUE"], rows, title=f"cluster {cluster}: what its apiserver wrote in its etcd")


async def read_as_remote(config: EtcdConfig, cluster: str) -> list[tuple[str, str, str]]:
    """What a remote agent sees: each prefix after its canary, decoded and checked."""
    backend = await etcd.connect(config)
    decoders = {
        keys.NODES_PREFIX: (keys.nodes_key_prefix(cluster), wire.decoder_for(wire.Node)),
        keys.IPCACHE_PREFIX: (keys.ipcache_key_prefix(), wire.decoder_for(wire.IPIdentityPair)),
        keys.IDENTITIES_PREFIX: (keys.identities_key_prefix(), lambda key, data: data.decode()),
        keys.SERVICES_PREFIX: (keys.services_key_prefix(cluster), wire.decoder_for(wire.ClusterService)),
    }
    rows: list[tuple[str, str, str]] = []
    try:
        for prefix, (key_prefix, decode) in decoders.items():
            store: WatchStore[object] = WatchStore(
                prefix=key_prefix, decode=decode, synced_canary=keys.synced_key(cluster, prefix)
            )
            task = asyncio.create_task(store.run(backend))
            try:
                await asyncio.wait_for(store.synced.wait(), 30)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for key, value in sorted(store.entries.items()):
                rows.append((prefix.rsplit("/", 2)[-2], key[len(key_prefix) :], _summary(value)))
        try:
            await backend.put(keys.node_key(cluster, "intruder"), b"{}")
            rows.append(("write", "refused?", "NO: the remote user could write"))
        except errors.PermissionDenied as exc:
            rows.append(("write", keys.node_key(cluster, "intruder"), f"refused: {exc}"))
    finally:
        await backend.close()
    return rows


def _summary(value: object) -> str:
    if isinstance(value, wire.Node):
        return f"node {value.Name}: {', '.join(value.addresses_of('InternalIP'))}, pods {value.IPv4AllocCIDR}"
    if isinstance(value, wire.IPIdentityPair):
        return f"identity {value.ID} on {value.HostIP} ({value.namespace}/{value.pod_name})"
    if isinstance(value, wire.ClusterService):
        return f"frontends {', '.join(value.frontends or {})}; backends {', '.join(value.backends or {})}"
    return str(value)


def main(workdir: Path | None = None) -> None:
    started = time.monotonic()
    keep = workdir is not None
    base = workdir or Path(tempfile.mkdtemp(prefix="clustermesh-demo-"))
    clusters = [DemoCluster("c1", 1, base), DemoCluster("c2", 2, base)]
    contexts = ContextFile(base / "config.yaml")
    try:
        for cluster in clusters:
            output.step(f"cluster {cluster.name} (ID {cluster.id}): PKI in {cluster.pki.directory}")
            cluster.start_etcd()
            assert cluster.etcd is not None
            output.step(
                f"etcd of {cluster.name} serving on {cluster.etcd.spec.client_url} (pid {cluster.etcd.pid}), mTLS only"
            )
            asyncio.run(init_users(cluster))
            output.step(
                f"etcd users and roles of {cluster.name}, as `clustermesh etcd init --cluster {cluster.name}` makes "
                f"them: root, admin-{cluster.name}, agent-{cluster.name}, role remote; auth on"
            )
            command = cluster.start_apiserver()
            assert cluster.apiserver is not None
            output.step(f"$ {' '.join(Path(c).name if c.startswith('/') and 'bin' in c else c for c in command)}")
            output.out.print(f"    pid {cluster.apiserver.pid}, health on http://{cluster.health}/readyz")
            admin = cluster.config(f"admin-{cluster.name}")
            contexts.add(Context(cluster.name, admin.endpoints, str(admin.ca_file), str(admin.cert_file),
                                 str(admin.key_file)))  # fmt: skip
        contexts.save()
        for cluster in clusters:
            manifest = EXAMPLES / f"cluster{cluster.id}.yaml"
            output.step(f"$ clustermesh --config {contexts.path} --context {cluster.name} apply -f {manifest}")
            for line in asyncio.run(apply(cluster.config(f"admin-{cluster.name}"), manifest)):
                output.out.print(f"    {line}")
        for cluster in clusters:
            entries = asyncio.run(wait_published(cluster.config("root"), cluster.name))
            show_keys(cluster.name, entries)
        reader, target = clusters[1], clusters[0]
        output.step(
            f"cluster {reader.name}'s agents will read {target.name} as remote-{reader.name} (read-only): "
            "each prefix after its synced canary"
        )
        asyncio.run(_ensure_remote(target, reader.name))
        rows = asyncio.run(read_as_remote(target.config(f"remote-{reader.name}"), target.name))
        output.print_table(["PREFIX", "KEY", "WHAT"], rows, title=f"{target.name} as seen by {reader.name}")
    finally:
        for cluster in reversed(clusters):
            cluster.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    output.step(f"demo done in {time.monotonic() - started:.1f} s")


async def _ensure_remote(cluster: DemoCluster, peer: str) -> None:
    backend = await etcd.connect(cluster.config("root"))
    try:
        await users.ensure_remote_user(backend, cluster.name, peer)
    finally:
        await backend.close()
