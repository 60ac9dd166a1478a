"""Real etcd processes for the integration tests: mTLS with client certificates, loopback, free ports.

`etcd_cluster` starts one etcd per test module (about a second) from a fresh PKI; `start_etcd` is the factory for
tests that need more (another cluster, a server with an odd certificate). Everything is stopped by PID and its data
removed at the end.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import certs
from clustermesh.processes.etcd import EtcdProcess, EtcdSpec
from kvstore import etcd
from kvstore.config import EtcdConfig


@dataclass
class EtcdCluster:
    """One running etcd and the PKI it trusts."""

    name: str
    pki: certs.ClusterPKI
    process: EtcdProcess
    extra_users: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.process.spec.client_url

    def config(self, user: str = "root", *, ca: Path | None = None, endpoint: str | None = None) -> EtcdConfig:
        paths = self.pki.user(user)
        if not paths.cert.exists():
            certs.issue_user(self.pki, user)
        return EtcdConfig(
            endpoints=[endpoint or self.url], ca_file=ca or self.pki.ca.cert, cert_file=paths.cert, key_file=paths.key
        )

    async def connect(self, user: str = "root") -> etcd.EtcdBackend:
        return await etcd.connect(self.config(user))


def start_etcd(
    base: Path,
    name: str,
    *,
    server_hosts: list[str] | None = None,
    server_not_before: datetime.datetime | None = None,
    server_days: int = 30,
) -> EtcdCluster:
    """A PKI in `base/name/pki` and an etcd serving with its server certificate (which the caller may spoil)."""
    pki = certs.create_cluster_pki(base / name / "pki", name)
    if server_hosts is not None or server_not_before is not None:
        ca = certs.load_issued(pki.ca)
        server = certs.issue_server(
            ca, f"etcd-{name}", hosts=server_hosts or ["127.0.0.1"], days=server_days, not_before=server_not_before
        )
        certs.write_issued(server, pki.server)
    spec = EtcdSpec(
        name=name,
        data_dir=base / name / "data",
        ca_file=pki.ca.cert,
        cert_file=pki.server.cert,
        key_file=pki.server.key,
    )
    process = EtcdProcess(spec)
    process.start()
    return EtcdCluster(name, pki, process)


def stop_etcd(cluster: EtcdCluster) -> None:
    cluster.process.stop()
    shutil.rmtree(cluster.process.spec.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Name: etcd_cluster. Scope: module. A running etcd (no auth) and its PKI; users connect by certificate CN."""
    cluster = start_etcd(tmp_path_factory.mktemp("etcd"), "c1")
    try:
        yield cluster
    finally:
        stop_etcd(cluster)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own, so tests sharing one etcd never see each other's keys."""
    return f"test/{request.node.name}/"
