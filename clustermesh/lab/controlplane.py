"""Each cluster's control plane in the lab: the PKI, etcd (mTLS, in the cluster's control-plane namespace), its
users, the clustermesh-apiserver, and the clusters joined with `clustermesh connect`. Also what an operator does to
a cluster's control plane: wipe its etcd and bring it back (`wipe_etcd`), and delete a node's objects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path

import yaml

import certs
from certs.files import write_atomic
from clustermesh import connecting
from clustermesh.contexts import Context, ContextFile
from clustermesh.lab import netns
from clustermesh.lab.layout import LabError
from clustermesh.lab.standin import STANDIN_PORT
from clustermesh.lab.state import BIN, LabContext
from clustermesh.model import keys
from clustermesh.model.kinds import kind_by_name
from clustermesh.processes.child import Child
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from clustermesh.resources.opening import open_resource_store
from kvstore import etcd, users
from kvstore.backend import wait_for_key

__all__ = [
    "connect_all", "delete_node_objects", "init_users", "make_pki", "restart_etcd", "start_apiserver", "start_etcd",
    "start_standin", "wipe_etcd",
]  # fmt: skip


def make_pki(ctx: LabContext) -> None:
    ctx.ca = certs.create_ca(f"{ctx.layout.name}-mesh-ca")
    for cluster in ctx.layout.all_clusters():
        certs.create_cluster_pki(ctx.pki(cluster.index).directory, cluster.name,
                                 server_hosts=[cluster.control_plane_ip], ca=ctx.ca)  # fmt: skip
    ctx.progress(f"PKI: one CA for the lab, a folder per cluster in {ctx.state_dir}")


def etcd_spec(ctx: LabContext, index: int) -> EtcdSpec:
    cluster = ctx.layout.cluster(index)
    pki = ctx.pki(index)
    return EtcdSpec(
        name=cluster.name, data_dir=ctx.state_dir / cluster.name / "etcd", ca_file=pki.ca.cert,
        cert_file=pki.server.cert, key_file=pki.server.key, host=cluster.control_plane_ip, client_port=2379,
        peer_port=2380, wrapper=netns.nsenter(cluster.control_plane_netns),
        log_file=ctx.state_dir / "logs" / f"etcd-{cluster.name}.log",
    )  # fmt: skip


def start_etcd(ctx: LabContext, index: int) -> None:
    cluster = ctx.layout.cluster(index)
    process = EtcdProcess(etcd_spec(ctx, index))
    process.start()
    ctx.progress(f"{cluster.name}: etcd on {cluster.etcd_url} in {cluster.control_plane_netns} (pid {process.pid})")


async def wait_for_cluster_config(ctx: LabContext, index: int, timeout: float = 60.0) -> None:
    """Until the cluster's apiserver has (re)written its cluster-config: `connect` reads it first."""
    cluster = ctx.layout.cluster(index)
    backend = await etcd.connect(ctx.config(index, "root"))
    try:
        async with asyncio.timeout(timeout):
            await wait_for_key(backend, keys.cluster_config_key(cluster.name))
    except TimeoutError:
        raise LabError(
            f"{cluster.name}: its apiserver did not write its cluster-config within {timeout:.0f} s"
        ) from None
    finally:
        await backend.close()


def etcd_pid(ctx: LabContext, index: int) -> int | None:
    """The PID of the cluster's etcd, found in its control-plane namespace (the process that started it is gone)."""
    namespace = ctx.layout.cluster(index).control_plane_netns
    found = [pid for pid in netns.processes_in([namespace]) if netns.command_name(pid) == "etcd"]
    return found[0] if found else None


def _end(pid: int, sig: signal.Signals, wait: float) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while netns.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # another process's death: there is nothing to wait on but its /proc entry
    return not netns.alive(pid)


def restart_etcd(ctx: LabContext, index: int) -> None:
    """Stop the cluster's etcd (SIGTERM, then SIGKILL) and start it on the same data: etcd 3.4 reads its trusted CA
    file only when it starts, so a new CA reaches it this way."""
    cluster = ctx.layout.cluster(index)
    pid = etcd_pid(ctx, index)
    if pid is not None and not _end(pid, signal.SIGTERM, 10):
        _end(pid, signal.SIGKILL, 10)
    ctx.progress(f"{cluster.name}: etcd stopped (pid {pid}) to read its trusted CA again")
    start_etcd(ctx, index)


def wipe_etcd(ctx: LabContext, index: int) -> None:
    """What losing a cluster's etcd looks like: kill it, remove its data, start it empty. (An operator then runs
    `clustermesh etcd init` and `clustermesh connect` again: `init_users` and `connect_all(only=...)`.)"""
    cluster = ctx.layout.cluster(index)
    pid = etcd_pid(ctx, index)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while netns.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # another process's death: there is nothing to wait on but its /proc entry
    spec = etcd_spec(ctx, index)
    shutil.rmtree(spec.data_dir, ignore_errors=True)
    ctx.progress(f"{cluster.name}: etcd killed (pid {pid}) and its data removed")
    start_etcd(ctx, index)


async def init_users(ctx: LabContext, clusters: list[int] | None = None) -> None:
    path = ctx.state_dir / "contexts.yaml"
    contexts = ContextFile.load(path) if path.exists() else ContextFile(path)
    for cluster in ctx.layout.all_clusters():
        if clusters is not None and cluster.index not in clusters:
            continue
        config = ctx.config(cluster.index, "root")
        backend = await etcd.connect(config)
        try:
            await users.ensure_cluster_users(backend, cluster.name)
        finally:
            await backend.close()
        kubeconfig = _kubeconfig_of(ctx, cluster.index, "admin")
        contexts.add(Context(cluster.name, config.endpoints, str(config.ca_file), str(config.cert_file),
                             str(config.key_file), relay=str(ctx.relay_socket(cluster.index)),
                             source=ctx.layout.source, kubeconfig=kubeconfig))  # fmt: skip
    contexts.save()


#: with `--source kubernetes`, what each service account may write in its cluster's stand-in API server (RBAC's
#: shape: the apiserver only reads; an agent writes its node, its endpoints and their identities; admin: all)
STANDIN_GRANTS: dict[str, list[str] | None] = {
    "apiserver": [],
    "agent": ["CiliumNode", "CiliumEndpoint", "CiliumIdentity"],
    "admin": None,
}


def _kubeconfig(path: Path, server: str, user: str, token: str) -> None:
    document = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
        "users": [{"name": user, "user": {"token": token}}],
    }  # fmt: skip
    write_atomic(path, yaml.safe_dump(document, sort_keys=False).encode(), mode=0o600)


def start_standin(ctx: LabContext, index: int) -> None:
    """The cluster's stand-in Kubernetes API server (`--source kubernetes`): in its control-plane namespace at
    CP_IP:6443 for the cluster's daemons, and on the host's loopback for the lab's commands; a token per service
    account, each allowed what its RBAC role would be."""
    cluster = ctx.layout.cluster(index)
    folder = ctx.state_dir / cluster.name
    tokens = {user: secrets.token_hex(16) for user in STANDIN_GRANTS}
    grants = folder / "standin-grants.json"
    write_atomic(grants, json.dumps({tokens[u]: {"user": f"system:serviceaccount:kube-system:clustermesh-{u}",
                                                 "writes": w} for u, w in STANDIN_GRANTS.items()}).encode(),
                 mode=0o600)  # fmt: skip
    state = folder / "standin.json"
    state.unlink(missing_ok=True)
    address = f"{cluster.control_plane_ip}:{STANDIN_PORT}"
    child = Child(f"standin-{cluster.name}", [str(BIN / "python"), "-m", "clustermesh.lab.standin", "--namespace",
                                              cluster.control_plane_netns, "--address", address, "--grants",
                                              str(grants), "--state", str(state),
                                              "--service-cluster-ip-range", cluster.service_cidr],
                  ctx.state_dir / "logs" / f"standin-{cluster.name}.log")  # fmt: skip
    child.start()
    child.wait_for(r"listening on ")
    host_port = int(json.loads(state.read_text())["host_port"])
    for user, token in tokens.items():
        _kubeconfig(ctx.kubeconfig(index, user), f"http://{address}", user, token)
    _kubeconfig(ctx.kubeconfig(index, "host"), f"http://127.0.0.1:{host_port}", "admin", tokens["admin"])
    ctx.progress(f"{cluster.name}: stand-in Kubernetes API server (pid {child.pid}) on {address}")


def _source_args(ctx: LabContext, index: int, user: str) -> list[str]:
    if ctx.layout.source != "kubernetes":
        return ["--source", "standalone"]
    return ["--source", "kubernetes", "--kubeconfig", str(ctx.kubeconfig(index, user))]


def start_apiserver(ctx: LabContext, index: int) -> None:
    cluster = ctx.layout.cluster(index)
    config = ctx.config(index, f"admin-{cluster.name}")
    child = ctx.child(
        f"apiserver-{cluster.name}",
        cluster.control_plane_netns,
        [
            str(BIN / "clustermesh-apiserver"), "--cluster-name", cluster.name, "--cluster-id", str(cluster.id),
            *_source_args(ctx, index, "apiserver"), "--kvstore-endpoints", cluster.etcd_url,
            "--kvstore-ca", str(config.ca_file), "--kvstore-cert", str(config.cert_file),
            "--kvstore-key", str(config.key_file),
            "--health-address", f"{cluster.control_plane_ip}:9880",
            "--metrics-address", f"{cluster.control_plane_ip}:9962",
            # ClusterIPs: the apiserver gives them from the standalone store; Kubernetes' API server does it itself
            *(["--service-cluster-ip-range", cluster.service_cidr] if ctx.layout.source == "standalone" else []),
        ],
        r"every prefix synced",
    )  # fmt: skip
    ctx.progress(f"{cluster.name}: clustermesh-apiserver (pid {child.pid}), cluster ID {cluster.id}")


async def connect_all(ctx: LabContext, *, only: str | None = None) -> None:
    contexts = ContextFile.load(ctx.state_dir / "contexts.yaml")
    names = [c.name for c in ctx.layout.all_clusters()]
    for i, source in enumerate(names):
        for destination in names[i + 1 :]:
            if only is not None and only not in (source, destination):
                continue
            a = await connecting.open_side(contexts.get(source), contexts.path.parent, None)
            try:
                b = await connecting.open_side(contexts.get(destination), contexts.path.parent, None)
                try:
                    await connecting.connect_clusters(a, b, allow_mismatching_ca=False)
                finally:
                    await b.close()
            finally:
                await a.close()
            ctx.progress(f"clustermesh connect --context {source} --destination-context {destination}")


async def delete_node_objects(ctx: LabContext, cluster: int, node_name: str, pods: list[tuple[str, str]]) -> None:
    """What a Kubernetes control plane does when a node goes: its CiliumNode and its pods' endpoints are deleted."""
    backend = await etcd.connect(ctx.config(cluster, f"admin-c{cluster}"))
    store = open_resource_store(ctx.layout.source, backend, _kubeconfig_of(ctx, cluster, "admin"), None)
    try:
        for namespace, pod in pods:
            with contextlib.suppress(Exception):
                await store.delete(kind_by_name("CiliumEndpoint"), pod, namespace)
        with contextlib.suppress(Exception):  # a node that never got as far as publishing itself
            await store.delete(kind_by_name("CiliumNode"), node_name)
    finally:
        await store.close()
        await backend.close()


def _kubeconfig_of(ctx: LabContext, cluster: int, user: str) -> str | None:
    return str(ctx.kubeconfig(cluster, user)) if ctx.layout.source == "kubernetes" else None
