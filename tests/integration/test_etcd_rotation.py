"""Certificates rotated under a running etcd client (`EtcdBackend.reload_credentials`), against a real etcd: the
new files are used at once, an open watch moves to them with no event lost or repeated, and files that do not work
leave the connection going on with the ones it has.

Each test gives its client files of its own (a copy of the cluster's CA, a certificate issued for it), so rotating
them touches no other test's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import certs
from certs import rotation
from kvstore import errors, etcd
from kvstore.backend import Event
from kvstore.config import EtcdConfig
from kvstore.testing import eventually
from tests.integration.conftest import EtcdCluster


def own_files(cluster: EtcdCluster, folder: Path, user: str = "root") -> EtcdConfig:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cluster.pki.ca.cert, folder / "ca.crt")
    paths = certs.CertPaths.in_dir(folder, user)
    certs.write_issued(certs.issue_client(certs.load_issued(cluster.pki.ca), user, days=2), paths)
    return EtcdConfig([cluster.url], folder / "ca.crt", paths.cert, paths.key)


@pytest.fixture
async def own(etcd_cluster: EtcdCluster, tmp_path: Path) -> AsyncIterator[tuple[EtcdConfig, etcd.EtcdBackend]]:
    """A connection of the test's own, on files of its own (`own_files`), closed at the end."""
    config = own_files(etcd_cluster, tmp_path / "client")
    backend = await etcd.connect(config)
    try:
        yield config, backend
    finally:
        await backend.close()


def reissue(cluster: EtcdCluster, config: EtcdConfig, user: str = "root") -> None:
    ca = certs.load_issued(cluster.pki.ca)
    certs.write_issued(certs.issue_client(ca, user, days=3), certs.CertPaths(config.cert_file, config.key_file))


@contextlib.asynccontextmanager
async def collecting(backend: etcd.EtcdBackend, prefix: str) -> AsyncIterator[list[Event]]:
    """Every event under `prefix` from now on, gathered by a task of its own; its error, if any, is raised at
    the end (a watch that broke fails the test)."""
    listing = await backend.list_prefix(prefix)
    seen: list[Event] = []

    async def watch() -> None:
        async for batch in backend.watch(prefix, start_revision=listing.revision + 1):
            seen.extend(batch)

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def check() -> None:
        assert condition()

    await eventually(check, timeout=timeout, interval=0.02)


async def test_a_rotated_certificate_is_used_and_an_open_watch_loses_nothing(
    own: tuple[EtcdConfig, etcd.EtcdBackend], etcd_cluster: EtcdCluster, prefix: str
) -> None:
    config, backend = own
    assert not await backend.reload_credentials(), "unchanged files: nothing to do"
    async with collecting(backend, prefix) as seen:
        stop = asyncio.Event()
        written: list[str] = []

        async def writer() -> None:
            index = 0
            while not stop.is_set():
                key = f"{prefix}k{index:05d}"
                await backend.put(key, b"v")
                written.append(key)
                index += 1
                await asyncio.sleep(0.002)

        writing = asyncio.create_task(writer())
        await wait_for(lambda: len(seen) > 20)
        old_serial = certs.load_certificates(config.cert_file)[0].serial_number
        reissue(etcd_cluster, config)
        assert await backend.reload_credentials(), "new files: a new channel"
        assert certs.load_certificates(config.cert_file)[0].serial_number != old_serial
        await wait_for(lambda: len(written) > len(seen) + 50 or len(written) > 300)
        stop.set()
        await writing
        await wait_for(lambda: len(seen) >= len(written))
    keys = [event.key for event in seen]
    assert keys == written, "every write seen once, in order, across the move to the new channel"
    revisions = [event.revision for event in seen]
    assert revisions == sorted(set(revisions))
    assert await backend.get(written[-1]) is not None
    assert not await backend.reload_credentials()


async def test_half_written_files_are_refused_and_the_connection_goes_on(
    own: tuple[EtcdConfig, etcd.EtcdBackend], etcd_cluster: EtcdCluster, prefix: str
) -> None:
    config, backend = own
    async with collecting(backend, prefix) as seen:
        new = certs.issue_client(certs.load_issued(etcd_cluster.pki.ca), "root")
        certs.write_atomic(config.key_file, certs.files.key_pem(new.key), mode=0o600)  # the key, not yet the cert
        with pytest.raises(errors.BadTLSFiles, match="is not the key of"):
            await backend.reload_credentials()
        config.cert_file.write_text("garbage")
        with pytest.raises(errors.BadTLSFiles, match="holds no PEM certificate"):
            await backend.reload_credentials()
        await backend.put(f"{prefix}after-bad-files", b"1")
        await wait_for(lambda: any(e.key.endswith("after-bad-files") for e in seen))
        certs.write_issued(new, certs.CertPaths(config.cert_file, config.key_file))  # the rotation completes
        assert await backend.reload_credentials()
        await backend.put(f"{prefix}after-good-files", b"1")
        await wait_for(lambda: any(e.key.endswith("after-good-files") for e in seen))


async def test_a_certificate_etcd_refuses_is_not_taken_up(
    own: tuple[EtcdConfig, etcd.EtcdBackend], prefix: str
) -> None:
    config, backend = own
    async with collecting(backend, prefix) as seen:
        stranger = certs.create_ca("not-this-cluster")
        certs.write_issued(certs.issue_client(stranger, "root"), certs.CertPaths(config.cert_file, config.key_file))
        with pytest.raises(errors.KVStoreError):
            await backend.reload_credentials()
        await backend.put(f"{prefix}still-here", b"1")
        await wait_for(lambda: any(e.key.endswith("still-here") for e in seen))


async def test_a_ca_bundle_of_old_and_new_is_taken_up(
    own: tuple[EtcdConfig, etcd.EtcdBackend], etcd_cluster: EtcdCluster, prefix: str, tmp_path: Path
) -> None:
    """Step 1 of a CA roll on the client's side: its CA file becomes a bundle; the server's old-CA certificate still
    verifies, and the connection moves to the bundle."""
    config, backend = own
    rolled = tmp_path / "rolled"
    shutil.copytree(etcd_cluster.pki.directory, rolled)
    rotation.add_ca([rolled])
    shutil.copyfile(rolled / "ca.crt", config.ca_file)
    assert len(certs.load_certificates(config.ca_file)) == 2
    assert await backend.reload_credentials()
    await backend.put(f"{prefix}with-bundle", b"1")
    assert await backend.get(f"{prefix}with-bundle") is not None
