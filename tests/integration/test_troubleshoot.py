"""`clustermesh troubleshoot`'s diagnosis on real faults: an agent (in-process, as in test_agent_mesh) reads cluster
c2 through a config file made wrong in one way at a time, against real etcd processes with mTLS and auth; the
diagnosis names the hop where each fault happens, with the evidence and a fix. (The data path's hops are tested in
tests/e2e/test_observability.py, on a lab.)"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import certs
from clustermesh.model import keys
from clustermesh.troubleshoot import HOPS, Hop, diagnose, diagnose_config_file
from kvstore import etcd
from tests.integration.mesh_env import MeshCluster, fresh_mesh, running_clusters, start_agent, wipe_dir

NAMES = ["c1", "c2", "c3"]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MeshCluster]]:
    with running_clusters(tmp_path_factory.mktemp("troubleshoot"), NAMES) as made:
        yield made


@pytest.fixture
async def mesh(clusters: dict[str, MeshCluster]) -> AsyncIterator[dict[str, MeshCluster]]:
    async with fresh_mesh(clusters) as ready:
        yield ready


async def hops_for(
    mesh: dict[str, MeshCluster], config_dir: Path, cluster: str, code: str, **options: Any
) -> list[Hop]:
    """Start c1's agent on `config_dir`, wait until `cluster` shows the problem `code`, and diagnose it."""
    agent = await start_agent(mesh["c1"], config_dir, **options)
    try:
        status = await agent.wait_status(lambda s: any(
            c.name == cluster and code in [p.code for p in c.problems] for c in s.clusters))  # fmt: skip
        return diagnose(status, next(c for c in status.clusters if c.name == cluster))
    finally:
        await agent.stop()


def failed(hops: list[Hop]) -> Hop:
    [hop] = [h for h in hops if h.state == "failed"]
    position = HOPS.index(hop.name)
    assert all(h.state in ("ok", "skipped") for h in hops[:position]), "hops before it passed"
    assert all(h.state == "not reached" for h in hops[position + 1 :]), "hops after it were not reached"
    assert hop.evidence and hop.fix
    return hop


def c2_config(mesh: dict[str, MeshCluster], tmp_path: Path, **overrides: Any) -> Path:
    config_dir = tmp_path / "remotes"
    wipe_dir(config_dir)
    mesh["c2"].write_remote_config(config_dir, "c1", **overrides)
    return config_dir


CONNECTION_FAULTS = {
    # fault: (what the config file gets, the problem code, the hop)
    "unreachable endpoint": ({"endpoints": ["https://127.0.0.1:1"]}, "unreachable", "TCP"),
    "DNS failure": ({"endpoints": ["https://c2-etcd.clustermesh.invalid:2379"]}, "dns", "name resolution"),
    "wrong SAN": ({"tls-server-name": "etcd.elsewhere.example"}, "server-name-mismatch", "SAN and expiry"),
}


@pytest.mark.parametrize("fault", CONNECTION_FAULTS)
async def test_connection_faults_are_named_at_their_hop(
    mesh: dict[str, MeshCluster], tmp_path: Path, fault: str
) -> None:
    overrides, code, hop = CONNECTION_FAULTS[fault]
    found = failed(await hops_for(mesh, c2_config(mesh, tmp_path, **overrides), "c2", code))
    assert found.name == hop, (fault, found)


async def test_bad_ca_and_expired_certificate(mesh: dict[str, MeshCluster], tmp_path: Path) -> None:
    other = certs.create_cluster_pki(tmp_path / "other", "other")
    hop = failed(await hops_for(mesh, c2_config(mesh, tmp_path, **{"trusted-ca-file": str(other.ca.cert)}), "c2",
                                "unknown-authority"))  # fmt: skip
    assert hop.name == "certificate chain" and "CA" in hop.fix
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    expired = certs.CertPaths(tmp_path / "expired.crt", tmp_path / "expired.key")
    certs.write_issued(certs.issue_client(certs.load_issued(mesh["c2"].pki.ca), "remote-c1", days=30,
                                          not_before=long_ago), expired)  # fmt: skip
    config_dir = c2_config(mesh, tmp_path, **{"cert-file": str(expired.cert), "key-file": str(expired.key)})
    hop = failed(await hops_for(mesh, config_dir, "c2", "client-certificate-expired"))
    assert hop.name == "SAN and expiry" and "expired" in hop.fix


async def test_authentication_refused_and_a_remote_user_without_a_role(
    mesh: dict[str, MeshCluster], tmp_path: Path
) -> None:
    # etcd refuses the client certificate itself: the right user's name, from another CA
    other = certs.create_cluster_pki(tmp_path / "other", "other")
    foreign = certs.CertPaths(tmp_path / "foreign.crt", tmp_path / "foreign.key")
    certs.write_issued(certs.issue_client(certs.load_issued(other.ca), "remote-c1"), foreign)
    config_dir = c2_config(mesh, tmp_path, **{"cert-file": str(foreign.cert), "key-file": str(foreign.key)})
    hop = failed(await hops_for(mesh, config_dir, "c2", "client-certificate-rejected"))
    assert hop.name == "TLS" and "trust" in hop.fix
    backend = await etcd.connect(mesh["c2"].config("root"))
    try:
        await backend.add_user("lonely")  # a user, but no role
    finally:
        await backend.close()
    hop = failed(await hops_for(mesh, c2_config(mesh, tmp_path, user="lonely"), "c2", "no-role"))
    assert hop.name == "etcd user and role" and "role" in hop.fix


async def test_cluster_config_clashes(mesh: dict[str, MeshCluster], tmp_path: Path) -> None:
    c3 = mesh["c3"]
    c3.id = 1  # the local cluster's ID
    try:
        await c3.start_apiserver()
        config_dir = tmp_path / "remotes"
        wipe_dir(config_dir)
        c3.write_remote_config(config_dir, "c1")
        hop = failed(await hops_for(mesh, config_dir, "c3", "refused-id-clash"))
        assert hop.name == "cluster-config" and "cluster ID clash" in hop.evidence
        await c3.stop_apiserver()
        c3.id = 3
        await c3.reset(["c1", "c2"])
        await c3.start_apiserver(max_connected=511)
        hop = failed(await hops_for(mesh, config_dir, "c3", "refused-max-connected-mismatch"))
        assert hop.name == "cluster-config" and "511" in hop.evidence
    finally:
        c3.id = 3
        await c3.stop_apiserver()
    # a name clash: the file has the local cluster's name; the agent does not dial it, and says so
    config_dir = c2_config(mesh, tmp_path)
    (config_dir / "c2").rename(config_dir / "c1")
    agent = await start_agent(mesh["c1"], config_dir)
    try:
        status = await agent.wait_status(lambda s: "c1" in s.config_problems)
    finally:
        await agent.stop()
    hops = diagnose_config_file("c1", status.config_problems["c1"])
    assert hops[0].name == "cluster-config" and hops[0].state == "failed" and "name clash" in hops[0].fix


async def test_missing_canaries_and_a_stale_heartbeat(mesh: dict[str, MeshCluster], tmp_path: Path) -> None:
    await mesh["c2"].stop_apiserver()  # nobody writes the canaries back
    backend = await etcd.connect(mesh["c2"].config("root"))
    try:
        await backend.delete_prefix(keys.synced_key_prefix("c2"))
    finally:
        await backend.close()
    hop = failed(await hops_for(mesh, c2_config(mesh, tmp_path), "c2", "waiting-canary"))
    assert hop.name == "synced canaries" and "apiserver" in hop.fix
    await mesh["c2"].start_apiserver()
    agent = await start_agent(mesh["c1"], c2_config(mesh, tmp_path), heartbeat_max_age=2.5)
    try:
        await agent.wait_status(lambda s: s.ready and len(s.clusters) == 2)
        await mesh["c2"].stop_apiserver()  # etcd answers, nobody beats any more
        status = await agent.wait_status(lambda s: any(
            c.name == "c2" and "heartbeat-stale" in [p.code for p in c.problems] for c in s.clusters))  # fmt: skip
    finally:
        await agent.stop()
    hop = failed(diagnose(status, next(c for c in status.clusters if c.name == "c2")))
    assert hop.name == "heartbeat"


async def test_a_healthy_cluster_passes_every_hop(mesh: dict[str, MeshCluster], tmp_path: Path) -> None:
    agent = await start_agent(mesh["c1"], c2_config(mesh, tmp_path))
    try:
        status = await agent.wait_status(lambda s: s.ready and len(s.clusters) == 2)
    finally:
        await agent.stop()
    hops = diagnose(status, next(c for c in status.clusters if c.name == "c2"))
    assert [h.name for h in hops] == list(HOPS)
    assert {h.state for h in hops} == {"ok", "skipped"}, hops  # no datapath in-process: its hops are skipped
