"""A mesh on loopback for the agent's tests: clusters with a real etcd (mTLS, auth on, one CA for all, as the lab
does), an in-process apiserver each, and agents (in-process `Mesh`es) with config directories.

Clusters are started once per module; `reset()` gives each test a clean etcd (keys deleted, users kept) and a fresh
apiserver. A `ViewRecorder` records what a mesh's merged view tells its subscribers, and lets a test wait for a
condition on it, on events.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import certs
from agent.mesh import Mesh
from agent.view import Change, MergedView
from apiserver.server import Apiserver, ApiserverConfig
from clustermesh.kubectl import apply_objects, delete_objects
from clustermesh.model import wire
from clustermesh.model.clusters import ClusterInfo
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from clustermesh.resources.standalone import StandaloneStore
from kvstore import etcd, users
from kvstore.config import EtcdConfig

LEASE_TTL = 5  # keep-alive every ~2 s: a wiped etcd is noticed quickly
HEARTBEAT_INTERVAL = 1.0


def node(cluster: str, index: int, ip: str) -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumNode
metadata: {{name: {cluster}-n{index}}}
spec:
  addresses: [{{type: InternalIP, ip: {ip}}}]
  ipam: {{podCIDRs: [10.{cluster.removeprefix("c")}.{index}.0/24]}}
"""


def endpoint(name: str, ip: str, identity: int, node_ip: str = "192.168.0.1") -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumEndpoint
metadata: {{name: {name}, namespace: shop}}
status:
  identity: {{id: {identity}}}
  networking:
    addressing: [{{ipv4: {ip}}}]
    node: {node_ip}
"""


def identity(cluster: str, number: int, app: str) -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumIdentity
metadata: {{name: "{number}"}}
security-labels:
  k8s:app: {app}
  k8s:io.cilium.k8s.policy.cluster: {cluster}
  k8s:io.kubernetes.pod.namespace: shop
"""


def service(backends: list[str], name: str = "echo", affinity: str | None = None) -> str:
    extra = f'\n    service.cilium.io/affinity: "{affinity}"' if affinity else ""
    addresses = ", ".join(backends)
    return f"""
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: shop
  annotations:
    service.cilium.io/global: "true"{extra}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-slice
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints: [{{addresses: [{addresses}]}}]
ports: [{{name: http, port: 8080, protocol: TCP}}]
"""


@dataclass
class MeshCluster:
    name: str
    id: int
    base: Path
    pki: certs.ClusterPKI
    max_connected_clusters: int = 255
    process: EtcdProcess = field(init=False)
    apiserver: Apiserver | None = None
    _task: asyncio.Task[None] | None = None
    _backend: etcd.EtcdBackend | None = None

    def __post_init__(self) -> None:
        spec = EtcdSpec(
            name=self.name,
            data_dir=self.base / self.name / "data",
            ca_file=self.pki.ca.cert,
            cert_file=self.pki.server.cert,
            key_file=self.pki.server.key,
        )
        self.process = EtcdProcess(spec)

    @property
    def info(self) -> ClusterInfo:
        return ClusterInfo(self.name, self.id, self.max_connected_clusters)

    @property
    def url(self) -> str:
        return self.process.spec.client_url

    def config(self, user: str) -> EtcdConfig:
        paths = self.pki.user(user)
        if not paths.cert.exists():
            certs.issue_user(self.pki, user)
        return EtcdConfig([self.url], self.pki.ca.cert, paths.cert, paths.key)

    async def init_users(self, peers: list[str]) -> None:
        backend = await etcd.connect(self.config("root"))
        try:
            await users.ensure_cluster_users(backend, self.name)
            for peer in peers:
                await users.ensure_remote_user(backend, self.name, peer)
        finally:
            await backend.close()

    async def reset(self, peers: list[str]) -> None:
        await self.stop_apiserver()
        backend = await etcd.connect(self.config("root"))
        try:
            await backend.delete_prefix("cilium/")
            await backend.delete_prefix("registry/")
        finally:
            await backend.close()
        await self.init_users(peers)

    async def start_apiserver(self, *, max_connected: int | None = None) -> Apiserver:
        self._backend = await etcd.connect(self.config(f"admin-{self.name}"))
        info = ClusterInfo(self.name, self.id, max_connected or self.max_connected_clusters)
        self.apiserver = Apiserver(
            ApiserverConfig(info, lease_ttl=LEASE_TTL, heartbeat_interval=HEARTBEAT_INTERVAL),
            self._backend,
            StandaloneStore(self._backend),
        )
        self._task = asyncio.create_task(self.apiserver.run(), name=f"apiserver-{self.name}")
        ready = asyncio.ensure_future(self.apiserver.ready.wait())
        await asyncio.wait([ready, self._task], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()
        assert ready.done(), self.apiserver.not_ready()
        return self.apiserver

    async def stop_apiserver(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._backend is not None:
            await self._backend.close()
            self._backend = None

    def check_apiserver(self) -> None:
        """A test that writes objects relies on the apiserver publishing them: if it died, say so and why."""
        if self._task is not None and self._task.done():
            self._task.result()
            raise AssertionError(f"the apiserver of {self.name} stopped")

    async def apply(self, text: str) -> None:
        self.check_apiserver()
        backend = await etcd.connect(self.config(f"admin-{self.name}"))
        try:
            outcomes = await apply_objects(
                StandaloneStore(backend), [(d, "test") for d in yaml.safe_load_all(text) if d]
            )
        finally:
            await backend.close()
        assert all(o.action != "failed" for o in outcomes), outcomes

    async def delete(self, text: str) -> None:
        self.check_apiserver()
        backend = await etcd.connect(self.config(f"admin-{self.name}"))
        try:
            outcomes = await delete_objects(
                StandaloneStore(backend), [(d, "test") for d in yaml.safe_load_all(text) if d]
            )
        finally:
            await backend.close()
        assert all(o.action != "failed" for o in outcomes), outcomes

    def write_remote_config(self, directory: Path, peer: str, *, user: str | None = None, **overrides: Any) -> Path:
        """The config file through which `peer`'s agents read this cluster (Cilium's format)."""
        paths = self.pki.user(user or f"remote-{peer}")
        if not paths.cert.exists():
            certs.issue_user(self.pki, user or f"remote-{peer}")
        config: dict[str, Any] = {
            "endpoints": [self.url],
            "trusted-ca-file": str(self.pki.ca.cert),
            "cert-file": str(paths.cert),
            "key-file": str(paths.key),
        }
        config.update(overrides)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.name
        path.write_text(yaml.safe_dump(config))
        return path


def shared_ca_pki(base: Path, names: list[str]) -> dict[str, certs.ClusterPKI]:
    """One CA for every cluster (the lab's set-up): each cluster's folder gets a copy of it and its own certs."""
    ca = certs.create_ca("mesh-ca")
    result = {}
    for name in names:
        pki = certs.ClusterPKI(base / name / "pki")
        certs.write_issued(ca, pki.ca)
        certs.write_issued(certs.issue_server(ca, f"etcd-{name}", hosts=["127.0.0.1", "localhost"]), pki.server)
        for user in ("root", f"admin-{name}", f"agent-{name}"):
            certs.write_issued(certs.issue_client(ca, user), pki.user(user))
        result[name] = pki
    return result


@contextlib.contextmanager
def running_clusters(base: Path, names: list[str]) -> Iterator[dict[str, MeshCluster]]:
    """An etcd process per cluster (one CA for all), stopped at the end: what a test module shares."""
    pkis = shared_ca_pki(base, names)
    made: dict[str, MeshCluster] = {}
    try:
        for index, name in enumerate(names, start=1):
            made[name] = MeshCluster(name, index, base, pkis[name])
            made[name].process.start()
        yield made
    finally:
        for cluster in made.values():
            cluster.process.stop()


@contextlib.asynccontextmanager
async def fresh_mesh(clusters: dict[str, MeshCluster]) -> AsyncIterator[dict[str, MeshCluster]]:
    """Every cluster's etcd running and emptied (users kept for every peer), c1's and c2's apiservers started; the
    apiservers stopped at the end: what each test starts from."""
    for cluster in clusters.values():
        if not cluster.process.running:  # a test that failed half-way may have left it stopped
            cluster.process.start()
        await cluster.reset(peers=[n for n in clusters if n != cluster.name])
    await clusters["c1"].start_apiserver()
    await clusters["c2"].start_apiserver()
    try:
        yield clusters
    finally:
        for cluster in clusters.values():
            await cluster.stop_apiserver()


class ViewRecorder:
    """Every change a merged view announces, and a way to wait for a condition on the view.

    It reads its subscription synchronously: what the view has announced is always in `changes` when asked.
    """

    def __init__(self, view: MergedView) -> None:
        self.view = view
        self._changes: list[Change] = []
        self._subscription = view.subscribe()

    @property
    def changes(self) -> list[Change]:
        self._changes.extend(self._subscription.pending)
        self._subscription.pending.clear()
        return self._changes

    def deletes(self, kind: str | None = None) -> list[str]:
        return [c.key for c in self.changes if c.op == "delete" and (kind is None or c.kind == kind)]

    def clear(self) -> None:
        self.changes.clear()

    async def wait_for(self, condition: Callable[[MergedView], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition(self.view):
                self._changes.extend(await self._subscription.drain())

    async def close(self) -> None:
        self._subscription.close()


@dataclass
class Agent:
    """An in-process agent mesh for cluster `local`, with its config directory."""

    mesh: Mesh
    task: asyncio.Task[None]
    recorder: ViewRecorder

    async def wait_status(self, condition: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                status = self.mesh.status()
                if condition(status):
                    return status
                self.mesh.changed.clear()
                await self.mesh.changed.wait()

    def cluster(self, name: str) -> Any:
        """The status of cluster `name` (None while the agent does not know it yet)."""
        return next((c for c in self.mesh.status().clusters if c.name == name), None)

    async def stop(self) -> None:
        await self.recorder.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def own_node(local: MeshCluster) -> wire.Node:
    """The agent's own node as its settings would describe it (`node(local.name, 1, ...)`)."""
    return wire.Node(
        Name=f"{local.name}-n1",
        Cluster=local.name,
        ClusterID=local.id,
        IPAddresses=[wire.Address(Type="InternalIP", IP=f"192.168.{local.id}.11")],
        IPv4AllocCIDR=wire.ip_net(f"10.{local.id}.1.0/24"),
    )


async def start_agent(
    local: MeshCluster, config_dir: Path, *, cache_ttl: float = 0.0, heartbeat_max_age: float = 120.0
) -> Agent:
    mesh = Mesh(
        local.info,
        local.config(f"agent-{local.name}"),
        config_dir,
        node_name=f"{local.name}-n1",
        cache_ttl=cache_ttl,
        heartbeat_max_age=heartbeat_max_age,
        scan_interval=0.1,
        refused_retry=0.3,
        own_node=own_node(local),
    )
    recorder = ViewRecorder(mesh.view)
    task = asyncio.create_task(mesh.run(), name=f"mesh-{local.name}")
    return Agent(mesh, task, recorder)


def wipe_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
