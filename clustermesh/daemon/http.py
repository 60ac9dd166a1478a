"""A tiny HTTP/1.1 server on asyncio streams, on TCP (health, metrics; with TLS, the flow service) or a unix socket
(the agent's local API).

No web framework: each route is an async callable taking a `Request` and returning (status, content type, body).
A route that raises answers 500 with the error, and the server keeps serving. Port 0 picks a free port; the
address is known after `start()`. A unix socket is created with mode 0660 (its folder is created if needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

SSLContext = ssl.SSLContext

__all__ = [
    "HttpEndpoint",
    "Request",
    "Response",
    "error_response",
    "json_response",
    "metrics_route",
    "parse_address",
    "text_route",
]

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[["Request"], Awaitable[Response]]
_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 422: "Unprocessable Entity", 500: "Internal Server Error", 503: "Service Unavailable",
    507: "Insufficient Storage",
}  # fmt: skip
MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6); a clear ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def error_response(status: int, reason: str, message: str) -> Response:
    """An error as every API of ours answers it: `{"error": words, "reason": code}` (`clustermesh.model.api`)."""
    return json_response(status, {"error": message, "reason": reason})


def json_response(status: int, document: Any) -> Response:
    return status, "application/json", json.dumps(document, default=str).encode() + b"\n"


def text_route(produce: Callable[[], Response]) -> Route:
    """A route from a plain function of no arguments (health checks)."""

    async def route(request: Request) -> Response:
        return produce()

    return route


def metrics_route(registry: CollectorRegistry) -> Route:
    return text_route(lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)))


@dataclass
class HttpEndpoint:
    """Serve `routes` ({"METHOD /path" or "/path" (GET): route}) on host:port, or on `unix_path`."""

    host: str = "127.0.0.1"
    port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    unix_path: Path | None = None
    #: TCP only: TLS (mutual, when the context requires client certificates); certificates loaded into this same
    #: context later (rotation) are used by the next connection
    tls: SSLContext | None = None
    server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return str(self.unix_path) if self.unix_path is not None else f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self.unix_path is not None:
            self.unix_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()  # a stale socket of a previous run
            self.server = await asyncio.start_unix_server(self._serve, str(self.unix_path))
            os.chmod(self.unix_path, 0o660)
            return
        self.server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.tls)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(self._read(reader), 10)
            status, content_type, body = (
                error_response(400, "bad-request", "not an HTTP/1.1 request with a Content-Length body")
                if request is None
                else await self._answer(request)
            )
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError):  # a client without a valid certificate among them
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Request | None:
        """The request; None for one that is not HTTP as we speak it (answered 400, the server goes on)."""
        try:
            parts = (await reader.readline()).decode("latin-1").split()
            length = 0
            while line := (await reader.readline()).strip():
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(parts) < 2 or not 0 <= length <= MAX_BODY:
                return None
            body = await reader.readexactly(length) if length else b""
        except (ValueError, asyncio.IncompleteReadError):  # a bad length, a line over the limit, a short body
            return None
        url = urlsplit(parts[1])
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        return Request(parts[0].upper(), url.path, query, body)

    async def _answer(self, request: Request) -> Response:
        route = self.routes.get(f"{request.method} {request.path}")
        if route is None and request.method in ("GET", "HEAD"):
            route = self.routes.get(request.path)
        if route is None:
            route = self._prefix_route(request)
        if route is None:
            known = ", ".join(sorted(self.routes))
            return error_response(404, "no-route", f"no route {request.method} {request.path}; known: {known}")
        try:
            return await route(request)
        except Exception as exc:  # a broken route must not take the server down
            log.exception("route %s %s failed", request.method, request.path)
            return error_response(500, "internal", f"{type(exc).__name__}: {exc}")

    def _prefix_route(self, request: Request) -> Route | None:
        """Routes ending with '/*' match every path below them (REST resources by name)."""
        for pattern, route in self.routes.items():
            method, _, path = pattern.rpartition(" ")
            if path.endswith("/*") and request.path.startswith(path[:-1]) and method in ("", request.method):
                return route
        return None
