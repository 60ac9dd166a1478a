"""The small HTTP server of every process: a malformed request gets a 400, and the server goes on serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clustermesh.daemon.http import HttpEndpoint, text_route


async def exchange(path: Path, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(raw)
        if writer.can_write_eof():
            writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nContent-Length: twelve\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nContent-Length: 50\r\n\r\nshort",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
    ],
    ids=["bad-length", "negative-length", "short-body", "line-too-long", "no-request-line"],
)
async def test_a_malformed_request_is_answered_400_and_the_server_goes_on(tmp_path: Path, raw: bytes) -> None:
    server = HttpEndpoint(
        unix_path=tmp_path / "api.sock", routes={"/healthz": text_route(lambda: (200, "text/plain", b"ok\n"))}
    )
    await server.start()
    try:
        answer = await exchange(tmp_path / "api.sock", raw)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        answer = await exchange(tmp_path / "api.sock", b"GET /healthz HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n"), answer
    finally:
        await server.stop()
