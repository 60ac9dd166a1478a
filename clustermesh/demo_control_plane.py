"""`clustermesh demo --control-plane` (no root needed): three clusters, each with a real etcd (mTLS), a real
`clustermesh-apiserver` and a real `clustermesh-agent` process, publish small clusters applied from YAML with
`clustermesh apply`; the demo shows the
keys in Cilium's format, joins the three with `clustermesh connect` (mesh: every pair), shows `clustermesh status`
with every cluster ready, then stops one cluster's etcd and shows the status naming it.

Every step prints what it does and the commands a user would type. Everything started is stopped by its PID at the
end, also on Ctrl-C or an error; the work folder is removed unless `--workdir` was given.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import certs
from clustermesh import connecting, output
from clustermesh.contexts import Context, ContextFile
from clustermesh.kubectl import apply_objects, load_manifests
from clustermesh.model import keys, wire
from clustermesh.model.api import AgentStatus
from clustermesh.processes.child import Child
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from clustermesh.resources.standalone import StandaloneStore
from clustermesh.status import fetch_status, render_status
from kvstore import errors, etcd, users
from kvstore.config import EtcdConfig
from kvstore.watching import WatchStore

__all__ = ["main"]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent


@dataclass
class DemoCluster:
    """One cluster of the demo: its PKI (from the mesh's CA), its etcd, apiserver and one node's agent."""

    name: str
    id: int
    base: Path
    ca: certs.Issued
    etcd: EtcdProcess | None = None
    apiserver: Child | None = None
    agent: Child | None = None
    health: str = ""
    pki: certs.ClusterPKI = field(init=False)

    def __post_init__(self) -> None:
        self.pki = certs.create_cluster_pki(self.base / self.name / "pki", self.name, overwrite=True, ca=self.ca)

    @property
    def socket(self) -> Path:
        return self.base / self.name / "agent.sock"

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

    def _tls_flags(self, user: str) -> list[str]:
        config = self.config(user)
        return [
            "--kvstore-endpoints", config.endpoints[0], "--kvstore-ca", str(config.ca_file),
            "--kvstore-cert", str(config.cert_file), "--kvstore-key", str(config.key_file),
        ]  # fmt: skip

    def start_apiserver(self) -> list[str]:
        command = [
            str(BIN / "clustermesh-apiserver"), "--cluster-name", self.name, "--cluster-id", str(self.id),
            "--source", "standalone", *self._tls_flags(f"admin-{self.name}"),
            "--health-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
        ]  # fmt: skip
        self.apiserver = Child(f"apiserver {self.name}", command, self.base / self.name / "apiserver.log")
        self.apiserver.start()
        self.health = self.apiserver.wait_for(r"health endpoint listening on http://(\S+)").group(1)
        return command

    def start_agent(self) -> list[str]:
        command = [
            str(BIN / "clustermesh-agent"), "--cluster-name", self.name, "--cluster-id", str(self.id),
            "--node-name", f"{self.name}-node-1", "--node-ip", f"192.168.{self.id}.11",
            "--pod-cidr", f"10.{self.id}.1.0/24", *self._tls_flags(f"agent-{self.name}"),
            "--clustermesh-config", str(self.base / self.name / "remotes"),
            "--state-dir", str(self.base / self.name / "state"), "--api-socket", str(self.socket),
        ]  # fmt: skip
        self.agent = Child(f"agent {self.name}", command, self.base / self.name / "agent.log")
        self.agent.start()
        self.agent.wait_for(r"listening on ")
        return command

    def stop(self) -> None:
        for what, child in (("agent", self.agent), ("apiserver", self.apiserver)):
            if child is not None and child.pid is not None:
                output.step(f"stopping the {what} of {self.name} (pid {child.pid})")
                child.stop()
        if self.etcd is not None and self.etcd.pid is not None:
            output.step(f"stopping the etcd of {self.name} (pid {self.etcd.pid})")
            self.etcd.stop()


def _shown(command: list[str]) -> str:
    """A command as a user would type it: programs by name, long paths of this run shortened."""
    return " ".join(Path(part).name if part.startswith("/") and "/bin/" in part else part for part in command)


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
        store: WatchStore[bytes] = WatchStore(prefix=keys.CILIUM_PREFIX, decode=lambda k, v: v, observer=changed)
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
        keys.NODES_PREFIX: ("nodes", keys.nodes_key_prefix(cluster), wire.decoder_for(wire.Node)),
        keys.IPCACHE_PREFIX: ("ip", keys.ipcache_key_prefix(), wire.decoder_for(wire.IPIdentityPair)),
        keys.IDENTITIES_PREFIX: ("identities", keys.identities_key_prefix(), lambda key, data: data.decode()),
        keys.SERVICES_PREFIX: ("services", keys.services_key_prefix(cluster), wire.decoder_for(wire.ClusterService)),
    }
    rows: list[tuple[str, str, str]] = []
    try:
        for prefix, (what, key_prefix, decode) in decoders.items():
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
                rows.append((what, key.removeprefix(key_prefix), _summary(value)))
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
    base = workdir or Path(tempfile.mkdtemp(prefix="cm-demo-", dir="/tmp"))  # short: agent sockets live here
    ca = certs.create_ca("mesh-ca")
    clusters = [DemoCluster(f"c{i}", i, base, ca) for i in (1, 2, 3)]
    contexts = ContextFile(base / "config.yaml")
    try:
        output.step(f"three clusters, one CA for the mesh ({base}), each with etcd, apiserver and one node's agent")
        for cluster in clusters:
            cluster.start_etcd()
            assert cluster.etcd is not None
            asyncio.run(init_users(cluster))
            output.step(
                f"{cluster.name} (ID {cluster.id}): etcd on {cluster.etcd.spec.client_url} (pid {cluster.etcd.pid}), "
                f"mTLS only; users and roles as `clustermesh etcd init --cluster {cluster.name}` makes them"
            )
            command = cluster.start_apiserver()
            assert cluster.apiserver is not None
            output.step(f"$ {_shown(command)}")
            output.out.print(f"    pid {cluster.apiserver.pid}, /readyz on http://{cluster.health}")
            root = cluster.config("root")
            contexts.add(Context(cluster.name, root.endpoints, str(root.ca_file), str(root.cert_file),
                                 str(root.key_file)))  # fmt: skip
        contexts.save()
        for cluster in clusters:
            manifest = EXAMPLES / f"cluster{cluster.id}.yaml"
            output.step(f"$ clustermesh --context {cluster.name} apply -f examples/{manifest.name}")
            for line in asyncio.run(apply(cluster.config(f"admin-{cluster.name}"), manifest)):
                output.out.print(f"    {line}")
        entries = asyncio.run(wait_published(clusters[0].config("root"), clusters[0].name))
        show_keys(clusters[0].name, entries)
        for cluster in clusters:
            command = cluster.start_agent()
            assert cluster.agent is not None
            output.step(f"$ {_shown(command)}")
            output.out.print(f"    pid {cluster.agent.pid}, status on {cluster.socket}")
        for source, destinations in (("c1", ["c2", "c3"]), ("c2", ["c3"])):
            flags = " ".join(f"--destination-context {d}" for d in destinations)
            output.step(f"$ clustermesh --config {contexts.path.name} --context {source} connect {flags}")
            for destination in destinations:
                for line in asyncio.run(_connect(contexts, source, destination)):
                    output.out.print(f"    {line}")
        output.step(f"$ clustermesh status --socket {clusters[0].socket} --wait")
        status = asyncio.run(_status_when(clusters[0].socket, lambda s: s.ready and len(s.clusters) == 3))
        render_status(status)
        victim = clusters[2]
        assert victim.etcd is not None
        output.step(f"stopping the etcd of {victim.name} (pid {victim.etcd.pid}), as if its control plane died")
        victim.etcd.kill()
        output.step(f"$ clustermesh status --socket {clusters[0].socket}")
        status = asyncio.run(_status_when(clusters[0].socket, lambda s: not s.ready and any(
            c.name == victim.name and not c.connected for c in s.clusters)))  # fmt: skip
        render_status(status)
        output.out.print(
            f"    {victim.name}'s nodes and endpoints stay in the view (traffic to it keeps flowing); status says "
            "the mesh is not ready, and why"
        )
    finally:
        for cluster in reversed(clusters):
            cluster.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    output.step(f"demo done in {time.monotonic() - started:.1f} s")


async def _connect(contexts: ContextFile, source: str, destination: str) -> list[str]:
    a = await connecting.open_side(contexts.get(source), contexts.path.parent, None)
    try:
        b = await connecting.open_side(contexts.get(destination), contexts.path.parent, None)
        try:
            return await connecting.connect_clusters(a, b, allow_mismatching_ca=False)
        finally:
            await b.close()
    finally:
        await a.close()


async def _status_when(socket: Path, condition: Callable[[AgentStatus], bool], timeout: float = 60.0) -> AgentStatus:
    """The agent's status once `condition` holds on it (the agent's own --wait covers readiness only)."""
    async with asyncio.timeout(timeout):
        while True:
            status = await fetch_status(socket, wait=5.0)
            if condition(status):
                return status
            await asyncio.sleep(0.2)  # another process's state: nothing to wait on but its answers


async def _ensure_remote(cluster: DemoCluster, peer: str) -> None:
    backend = await etcd.connect(cluster.config("root"))
    try:
        await users.ensure_remote_user(backend, cluster.name, peer)
    finally:
        await backend.close()
