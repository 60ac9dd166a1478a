"""The etcd backend against a real etcd: the Backend contract, and one distinct, clear error per TLS mistake."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import certs
from kvstore import errors, etcd
from kvstore.config import EtcdConfig
from kvstore.testing import check_backend
from tests.integration.conftest import EtcdCluster, start_etcd, stop_etcd


async def test_etcd_backend_honours_the_backend_contract(etcd_cluster: EtcdCluster, prefix: str) -> None:
    backend = await etcd_cluster.connect()
    try:
        await check_backend(backend, prefix)
    finally:
        await backend.close()


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> certs.ClusterPKI:
    return certs.create_cluster_pki(tmp_path_factory.mktemp("other"), "other")


async def test_wrong_ca_is_named(etcd_cluster: EtcdCluster, other_pki: certs.ClusterPKI) -> None:
    with pytest.raises(errors.UnknownAuthority, match="did not sign") as caught:
        await etcd.connect(etcd_cluster.config(ca=other_pki.ca.cert))
    assert str(other_pki.ca.cert) in str(caught.value)


async def test_client_certificate_from_another_ca_is_rejected_by_the_server(
    etcd_cluster: EtcdCluster, other_pki: certs.ClusterPKI
) -> None:
    paths = other_pki.user("root")
    config = EtcdConfig([etcd_cluster.url], etcd_cluster.pki.ca.cert, paths.cert, paths.key)
    with pytest.raises(errors.ClientCertificateRejected, match="rejected the client certificate"):
        await etcd.connect(config)


async def test_expired_client_certificate_is_named_before_dialling(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    ca = certs.load_issued(etcd_cluster.pki.ca)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    expired = certs.issue_client(ca, "root", days=30, not_before=long_ago)
    paths = certs.CertPaths(tmp_path / "expired.crt", tmp_path / "expired.key")
    certs.write_issued(expired, paths)
    config = EtcdConfig([etcd_cluster.url], etcd_cluster.pki.ca.cert, paths.cert, paths.key)
    with pytest.raises(errors.ClientCertificateExpired, match=r"CN=root.*expired on"):
        await etcd.connect(config)


async def test_expired_client_certificate_is_refused_by_etcd_too(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """Skipping our own check, etcd itself refuses the expired certificate: the error names the certificate."""
    ca = certs.load_issued(etcd_cluster.pki.ca)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    paths = certs.CertPaths(tmp_path / "expired.crt", tmp_path / "expired.key")
    certs.write_issued(certs.issue_client(ca, "root", days=30, not_before=long_ago), paths)
    config = EtcdConfig([etcd_cluster.url], etcd_cluster.pki.ca.cert, paths.cert, paths.key)
    from kvstore import probing

    with pytest.raises(errors.ClientCertificateRejected, match=str(paths.cert)):
        await probing.probe_endpoint(config, config.parsed[0])


async def test_unreachable_endpoint_is_named(etcd_cluster: EtcdCluster) -> None:
    from clustermesh.processes.etcd import free_port

    url = f"https://127.0.0.1:{free_port()}"
    with pytest.raises(errors.EndpointUnreachable, match="unreachable"):
        await etcd.connect(etcd_cluster.config(endpoint=url))


async def test_plaintext_is_refused(etcd_cluster: EtcdCluster) -> None:
    with pytest.raises(errors.PlaintextEndpoint, match="use https://"):
        etcd_cluster.config(endpoint="http://127.0.0.1:2379")

    async def answer_in_plaintext(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_in_plaintext, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(errors.PlaintextEndpoint, match="does not speak TLS"):
            await etcd.connect(etcd_cluster.config(endpoint=f"https://127.0.0.1:{port}"))
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def odd_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EtcdCluster]]:
    """Two etcds with spoiled server certificates: one expired, one naming another host."""
    base = tmp_path_factory.mktemp("odd")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    expired = start_etcd(base, "expired", server_not_before=long_ago, server_days=30)
    try:
        misnamed = start_etcd(base, "misnamed", server_hosts=["etcd.elsewhere.example"])
    except BaseException:
        stop_etcd(expired)
        raise
    try:
        yield {"expired": expired, "misnamed": misnamed}
    finally:
        stop_etcd(expired)
        stop_etcd(misnamed)


async def test_expired_server_certificate_is_named(odd_servers: dict[str, EtcdCluster]) -> None:
    with pytest.raises(errors.ServerCertificateExpired, match="certificate has expired"):
        await etcd.connect(odd_servers["expired"].config())


async def test_wrong_server_name_is_named(odd_servers: dict[str, EtcdCluster]) -> None:
    with pytest.raises(errors.ServerNameMismatch, match=r"does not name .127\.0\.0\.1."):
        await etcd.connect(odd_servers["misnamed"].config())


@pytest.fixture
async def root_backend(etcd_cluster: EtcdCluster) -> AsyncIterator[etcd.EtcdBackend]:
    backend = await etcd_cluster.connect()
    yield backend
    await backend.close()


async def test_a_transaction_over_the_ops_limit_is_refused_before_sending(root_backend: etcd.EtcdBackend) -> None:
    from kvstore.backend import PutOp

    with pytest.raises(ValueError, match="at most 128"):
        await root_backend.commit([PutOp(f"x/{i}", b"") for i in range(129)])
