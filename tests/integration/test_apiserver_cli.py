"""The apiserver and the CLI as a user runs them: real processes, the documented command lines, a real etcd."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvstore.testing import Recorder
from kvstore.watching import WatchStore
from tests.integration.conftest import EtcdCluster

BIN = Path(sys.executable).parent
NODE = """apiVersion: cilium.io/v2
kind: CiliumNode
metadata:
  name: node-a
spec:
  addresses: [{ip: 172.18.0.9, type: InternalIP}]
  ipam: {podCIDRs: [10.9.0.0/24]}
"""


async def _http_get(address: str, path: str) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


class Process:
    """A child process whose stderr lines a test can wait for."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"process ended before {pattern!r}:\n" + "\n".join(self.lines[-20:]))
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if match := regex.search(line):
                    return match


@pytest.fixture
async def apiserver(etcd_cluster: EtcdCluster) -> AsyncIterator[Process]:
    backend = await etcd_cluster.connect()
    await backend.delete_prefix("")
    await backend.close()
    user = etcd_cluster.config("admin-c1")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh-apiserver"),
        "--cluster-name", "cluster3",
        "--cluster-id", "3",
        "--source", "standalone",
        "--kvstore-endpoints", etcd_cluster.url,
        "--kvstore-ca", str(user.ca_file),
        "--kvstore-cert", str(user.cert_file),
        "--kvstore-key", str(user.key_file),
        "--health-address", "127.0.0.1:0",
        "--metrics-address", "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    process = Process(proc)
    try:
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _cli(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh"), "--config", str(config), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_documented_command_lines_publish_a_node(
    apiserver: Process, etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    health = (await apiserver.wait_line(r"health endpoint listening on http://(\S+)")).group(1)
    metrics = (await apiserver.wait_line(r"metrics endpoint listening on http://(\S+)/metrics")).group(1)
    assert (await _http_get(health, "/healthz"))[0] == 200
    await apiserver.wait_line(r"every prefix synced")
    status, body = await _http_get(health, "/readyz")
    assert status == 200, body

    config = tmp_path / "config.yaml"
    user = etcd_cluster.config("admin-c1")
    code, _, err = await _cli(
        config, "context", "add", "c3", "--endpoints", etcd_cluster.url,
        "--ca", str(user.ca_file), "--cert", str(user.cert_file), "--key", str(user.key_file),
    )  # fmt: skip
    assert code == 0, err
    manifest = tmp_path / "node.yaml"
    manifest.write_text(NODE)

    backend = await etcd_cluster.connect()
    recorder = Recorder()
    watcher: WatchStore[bytes] = WatchStore(prefix="cilium/state/nodes/", decode=lambda k, v: v, observer=recorder)
    task = asyncio.create_task(watcher.run(backend))
    try:
        code, out, err = await _cli(config, "--context", "c3", "apply", "-f", str(manifest))
        assert (code, out.strip()) == (0, "ciliumnode/node-a created"), err
        await recorder.wait_for(lambda r: "cilium/state/nodes/v1/cluster3/node-a" in r.state)
        assert (
            b'"IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.9"}]'
            in (recorder.state["cilium/state/nodes/v1/cluster3/node-a"])
        )
        code, out, _ = await _cli(config, "--context", "c3", "apply", "-f", "-", stdin=NODE.encode())
        assert out.strip() == "ciliumnode/node-a unchanged"
        code, out, _ = await _cli(config, "get", "ciliumnodes")
        assert re.search(r"node-a\s+172\.18\.0\.9\s+10\.9\.0\.0/24", out), out
        code, out, _ = await _cli(config, "get", "cn", "node-a", "-o", "json")
        assert '"name": "node-a"' in out and '"resourceVersion"' in out

        status, body = await _http_get(metrics, "/metrics")
        assert status == 200
        assert "clustermesh_apiserver_bootstrap_seconds" in body
        assert 'clustermesh_kvstore_initial_sync_completed{store="nodes"} 1.0' in body

        code, out, _ = await _cli(config, "--context", "c3", "delete", "-f", str(manifest))
        assert out.strip() == "ciliumnode/node-a deleted"
        await recorder.wait_for(lambda r: not r.state)
        code, _, err = await _cli(config, "--context", "c3", "delete", "-f", str(manifest))
        assert code == 1 and "ciliumnode/node-a not found" in err
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.close()

    apiserver.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(apiserver.proc.wait(), 10) == 0


async def test_readyz_names_what_is_missing_while_etcd_is_unreachable(etcd_cluster: EtcdCluster) -> None:
    from clustermesh.processes.etcd import free_port

    user = etcd_cluster.config("admin-c1")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh-apiserver"), "--cluster-name", "c9", "--cluster-id", "9",
        "--kvstore-endpoints", f"https://127.0.0.1:{free_port()}",
        "--kvstore-ca", str(user.ca_file), "--kvstore-cert", str(user.cert_file), "--kvstore-key", str(user.key_file),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    process = Process(proc)
    try:
        health = (await process.wait_line(r"health endpoint listening on http://(\S+)")).group(1)
        await process.wait_line(r"cannot connect to etcd")
        status, body = await _http_get(health, "/readyz")
        assert status == 503 and "unreachable" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_bad_flags_are_refused_with_the_rule(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh-apiserver"), "--cluster-name", "Bad_Name", "--cluster-id", "3",
        "--kvstore-endpoints", "https://127.0.0.1:1", "--kvstore-ca", "a", "--kvstore-cert", "b", "--kvstore-key", "c",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"cluster name 'Bad_Name' is invalid" in err
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "clustermesh-apiserver"), "--cluster-name", "c1", "--cluster-id", "300",
        "--kvstore-endpoints", "http://127.0.0.1:1", "--kvstore-ca", "a", "--kvstore-cert", "b", "--kvstore-key", "c",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"cluster ID 300 is out of range" in err
