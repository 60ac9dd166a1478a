"""The one HTTP client of our APIs: the agent's on a unix socket, or a flow service over mutual TLS (`TlsTarget`): one
request, one answer, JSON both ways.

Used by `clustermesh status`, the lab, the CNI plugin and the relay. It speaks just what `clustermesh.daemon.http`
serves: HTTP/1.1, `Connection: close`, a Content-Length body. Errors are two kinds, so a caller can tell waiting from
giving up: `SocketUnreachable` (nothing listens: the agent is not running, or not yet) and `BadAnswer` (something
answered, but not an HTTP response with a JSON body).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Answer", "BadAnswer", "SocketUnreachable", "TlsTarget", "request"]


class SocketUnreachable(Exception):
    """Nothing answers on the socket (it does not exist, nobody listens, or the connection broke)."""


class BadAnswer(Exception):
    """The other side answered something that is not an HTTP response with a JSON body."""


@dataclass(frozen=True)
class TlsTarget:
    """A TCP API behind TLS: where it is, the client's context, and the name its certificate must carry."""

    host: str
    port: int
    context: ssl.SSLContext
    server_name: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise BadAnswer(f"the answer ({self.status}) is not JSON: {self.body[:200]!r}") from None


async def _open(target: Path | str | TlsTarget) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(target, TlsTarget):
        return await asyncio.open_connection(target.host, target.port, ssl=target.context,
                                             server_hostname=target.server_name)  # fmt: skip
    return await asyncio.open_unix_connection(str(target))


async def request(
    socket: Path | str | TlsTarget,
    method: str,
    path: str,
    body: Any = None,
    *,
    connect_timeout: float = 5.0,
    timeout: float = 30.0,
) -> Answer:
    """One request; `body` (if not None) is sent as JSON."""
    try:
        reader, writer = await asyncio.wait_for(_open(socket), connect_timeout)
    except ssl.SSLCertVerificationError as exc:
        raise SocketUnreachable(f"{socket}: its certificate was refused ({exc.verify_message})") from None
    except (OSError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SocketUnreachable(f"nothing answers at {socket} ({reason})") from None
    payload = json.dumps(body).encode() if body is not None else b""
    request_head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(payload)}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    try:
        writer.write(request_head.encode() + payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        raise SocketUnreachable(f"{socket} did not answer {method} {path} within {timeout:.0f} s") from None
    except OSError as exc:
        raise SocketUnreachable(f"{socket}: the connection broke during {method} {path} ({exc})") from None
    finally:
        writer.close()
    head, _, content = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise BadAnswer(f"{socket} answered {method} {path} with something that is not HTTP: {data[:200]!r}")
    return Answer(int(parts[1]), content)
