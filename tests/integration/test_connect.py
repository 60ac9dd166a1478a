"""`clustermesh connect / disconnect / status` and a real `clustermesh-agent` process, as a user runs them.

Three clusters with their own CAs (c3 with the same cluster ID as c2), real etcds, in-process apiservers; the CLI and
the agent run as processes. Checks must refuse before writing anything; a successful connect must end, without any
hand-written file, in a ready agent that reads the peer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

import certs
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.standalone import StandaloneStore
from kvstore import etcd
from kvstore.backend import wait_for_key
from tests.integration.mesh_env import MeshCluster, node

BIN = Path(sys.executable).parent
REMOTE = kind_by_name("ClusterMeshRemote")


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MeshCluster]]:
    base = tmp_path_factory.mktemp("connect")
    made: dict[str, MeshCluster] = {}
    try:
        for name, cid in (("c1", 1), ("c2", 2), ("c3", 2)):
            pki = certs.create_cluster_pki(base / name / "pki", name)
            made[name] = MeshCluster(name, cid, base, pki)
            made[name].process.start()
        yield made
    finally:
        for cluster in made.values():
            cluster.process.stop()


@pytest.fixture
async def running(clusters: dict[str, MeshCluster], tmp_path: Path) -> AsyncIterator[Path]:
    """The clusters with apiservers, and a contexts file with a root context per cluster; yields its path."""
    contexts = tmp_path / "contexts.yaml"
    document: dict[str, dict[str, dict[str, object]]] = {"contexts": {}}
    for cluster in clusters.values():
        await cluster.reset(peers=[])
        await cluster.start_apiserver()
        config = cluster.config("root")
        document["contexts"][cluster.name] = {
            "endpoints": config.endpoints, "ca": str(config.ca_file), "cert": str(config.cert_file),
            "key": str(config.key_file),
        }  # fmt: skip
    contexts.write_text(yaml.safe_dump(document))
    try:
        yield contexts
    finally:
        for cluster in clusters.values():
            await cluster.stop_apiserver()


async def cli(config: Path, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh"), "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def written(cluster: MeshCluster) -> tuple[list[str], list[str]]:
    """What connect may have written on a cluster: its remote users and its ClusterMeshRemote objects."""
    backend = await etcd.connect(cluster.config("root"))
    try:
        remote_users = sorted(u for u in await backend.users() if u.startswith("remote-"))
        remotes = sorted(o["metadata"]["name"] for o in (await StandaloneStore(backend).list(REMOTE)).items)
        return remote_users, remotes
    finally:
        await backend.close()


async def test_checks_refuse_before_writing_anything(clusters: dict[str, MeshCluster], running: Path) -> None:
    code, _, err = await cli(running, "--context", "c1", "connect", "--destination-context", "c2")
    assert code == 1
    assert "the CAs of c1 and c2 differ" in err and "--allow-mismatching-ca" in err
    code, _, err = await cli(running, "--context", "c2", "connect", "--destination-context", "c3",
                             "--allow-mismatching-ca")  # fmt: skip
    assert code == 1 and "cluster ID clash: c2 and c3 both have ID 2" in err
    code, _, err = await cli(running, "--context", "c1", "connect", "--destination-context", "nope")
    assert code == 1 and "no context 'nope'" in err
    for cluster in clusters.values():
        assert await written(cluster) == ([], []), f"a failed check wrote something on {cluster.name}"


async def _agent(cluster: MeshCluster, work: Path, socket_dir: Path) -> asyncio.subprocess.Process:
    agent_user = cluster.config(f"agent-{cluster.name}")
    return await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh-agent"),
        "--cluster-name", cluster.name, "--cluster-id", str(cluster.id), "--node-name", f"{cluster.name}-n1",
        "--node-ip", "192.168.1.11", "--pod-cidr", "10.1.1.0/24", "--health-ip", "10.1.1.2",
        "--kvstore-endpoints", cluster.url, "--kvstore-ca", str(agent_user.ca_file),
        "--kvstore-cert", str(agent_user.cert_file), "--kvstore-key", str(agent_user.key_file),
        "--clustermesh-config", str(work / "remotes"), "--state-dir", str(work / "state"),
        "--api-socket", str(socket_dir / "agent.sock"), "--log-level", "info",
        stderr=(work / "agent.log").open("wb"),
    )  # fmt: skip


async def test_connect_then_a_real_agent_reads_the_peer(
    clusters: dict[str, MeshCluster], running: Path, tmp_path: Path
) -> None:
    c1, c2 = clusters["c1"], clusters["c2"]
    await c1.init_users([])
    await c2.init_users([])
    await c2.apply(node("c2", 1, "192.168.2.11"))
    code, out, err = await cli(running, "--context", "c1", "connect", "--destination-context", "c2",
                               "--allow-mismatching-ca")  # fmt: skip
    assert code == 0, err
    assert "c1 (ID 1) can read c2 as remote-c1" in out and "c2 (ID 2) can read c1 as remote-c2" in out
    assert await written(c1) == (["remote-c2"], ["c2"])
    assert await written(c2) == (["remote-c1"], ["c1"])

    socket_dir = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))  # unix socket paths are short
    agent = await _agent(c1, tmp_path, socket_dir)
    sock = str(socket_dir / "agent.sock")
    try:
        for _ in range(100):
            code, out, err = await cli(running, "status", "--socket", sock, "--wait", "--timeout", "40", "-o", "json")
            assert out, err
            status = json.loads(out)
            if len(status["clusters"]) == 2 and status["ready"]:
                break
            await asyncio.sleep(0.1)  # the agent renders c2's config from the store, then picks the file up
        assert code == 0 and status["ready"], status
        by_name = {c["name"]: c for c in status["clusters"]}
        assert by_name["c2"]["connected"] and by_name["c2"]["counts"]["nodes"] == 1
        assert by_name["c1"]["local"] and by_name["c1"]["counts"]["nodes"] == 1  # the agent published its node
        assert (tmp_path / "remotes" / "c2").exists(), "the agent rendered its config directory from the store"
        code, out, _ = await cli(running, "status", "--socket", sock)
        assert code == 0 and "c2" in out and "ready" in out

        # The endpoints API of the CNI plugin: an identity in c1's range, and the ipcache key published.
        from clustermesh.daemon.client import request

        answer = await request(
            sock, "POST", "/v1/endpoints",
            {"namespace": "shop", "name": "web-1", "labels": {"app": "web"}, "ipv4": "10.1.1.10"},
        )  # fmt: skip
        created = answer.json()
        assert answer.status == 201, created
        identity = created["status"]["identity"]["id"]
        assert 65536 + 256 <= identity < 2 * 65536
        answer = await request(sock, "POST", "/v1/endpoints", {"name": "x", "ipv4": "10.1"})
        assert answer.status == 400 and "ipv4" in answer.json()["error"] and answer.json()["reason"] == "invalid"
        # an address outside this node's pod CIDR (10.1.1.0/24) is refused: it could be another node's pod
        answer = await request(sock, "POST", "/v1/endpoints", {"name": "thief", "ipv4": "10.1.2.10"})
        assert answer.status == 400 and "not in this node's pod CIDRs" in answer.json()["error"], answer.json()
        backend = await etcd.connect(c1.config("root"))
        try:
            async with asyncio.timeout(20):  # c1's apiserver, another process, publishes it
                entry = await wait_for_key(backend, "cilium/state/ip/v1/default/10.1.1.10")
            assert f'"ID":{identity}'.encode() in entry.value
        finally:
            await backend.close()

        code, out, err = await cli(running, "--context", "c1", "disconnect", "--destination-context", "c2")
        assert code == 0, err
        assert await written(c1) == ([], []) and await written(c2) == ([], [])
        code, out, _ = await cli(running, "status", "--socket", sock, "-o", "json")
        for _ in range(100):
            if [c["name"] for c in json.loads(out)["clusters"]] == ["c1"]:
                break
            await asyncio.sleep(0.1)  # the agent notices the object is gone, then the file: poll its status
            code, out, _ = await cli(running, "status", "--socket", sock, "-o", "json")
        assert [c["name"] for c in json.loads(out)["clusters"]] == ["c1"]
        assert not (tmp_path / "remotes" / "c2").exists()
    finally:
        agent.terminate()
        assert await asyncio.wait_for(agent.wait(), 15) == 0
        shutil.rmtree(socket_dir, ignore_errors=True)


async def test_status_without_an_agent_says_so(running: Path, tmp_path: Path) -> None:
    code, _, err = await cli(running, "status", "--socket", str(tmp_path / "none.sock"))
    assert code == 2 and "is clustermesh-agent running" in err


def in_kubernetes_source(contexts: Path, name: str, kubeconfig: Path, server: str) -> None:
    """Context `name` of the contexts file, now with its resources in the Kubernetes API server at `server`."""
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": "t"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": "admin"}}],
    }))  # fmt: skip
    document = yaml.safe_load(contexts.read_text())
    document["contexts"][name].update({"source": "kubernetes", "kubeconfig": str(kubeconfig)})
    contexts.write_text(yaml.safe_dump(document))


async def test_connect_writes_through_the_clusters_store_whatever_its_source(
    clusters: dict[str, MeshCluster], running: Path, tmp_path: Path
) -> None:
    """c1's resources live in Kubernetes (the stand-in API server: no real one runs here): its agents, started with
    --source kubernetes, read ClusterMeshRemote objects from there, so that is where connect must write c1's side.
    c2 stays standalone. Disconnect removes both again."""
    from clustermesh.lab.standin import StandinAPIServer

    server = StandinAPIServer().start()
    try:
        in_kubernetes_source(running, "c1", tmp_path / "kubeconfig", server.url)
        code, out, err = await cli(running, "--context", "c1", "connect", "--destination-context", "c2",
                                   "--allow-mismatching-ca")  # fmt: skip
        assert code == 0, err
        in_kubernetes = server.objects(REMOTE)
        assert [obj["metadata"]["name"] for obj in in_kubernetes] == ["c2"], "c1's side: in its Kubernetes"
        assert in_kubernetes[0]["spec"]["endpoints"] == clusters["c2"].config("root").endpoints
        assert await written(clusters["c1"]) == (["remote-c2"], []), "nothing in c1's etcd registry"
        assert await written(clusters["c2"]) == (["remote-c1"], ["c1"]), "c2's side: in its standalone store"
        code, out, _ = await cli(running, "context", "list")
        assert "kubernetes" in out
        code, _, err = await cli(running, "--context", "c1", "disconnect", "--destination-context", "c2")
        assert code == 0, err
        assert server.objects(REMOTE) == [] and await written(clusters["c2"]) == ([], [])
    finally:
        server.stop()
