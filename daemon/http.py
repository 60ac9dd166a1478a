"""A tiny HTTP/1.1 server for /healthz, /readyz and /metrics, on asyncio streams (no web framework needed).

Port 0 picks a free port; `Endpoint.address` tells which after `start()`. Each route is a callable returning
(status, content type, body); a route that raises answers 500 with the error, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HttpEndpoint", "Response", "metrics_route", "parse_address"]

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[[], Response]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error", 503: "Unavailable"}


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6); a clear ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def metrics_route(registry: CollectorRegistry) -> Route:
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry))


@dataclass
class HttpEndpoint:
    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)).strip():
                pass  # headers: not needed
            parts = request.decode("latin-1").split()
            status, content_type, body = self._answer(parts)
            reason = _REASONS.get(status, "")
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, parts: list[str]) -> Response:
        if len(parts) < 2:
            return 405, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        route = self.routes.get(path)
        if route is None:
            return 404, "text/plain", f"no route {path}; try {', '.join(sorted(self.routes))}\n".encode()
        try:
            return route()
        except Exception as exc:  # a broken route must not take the server down
            log.exception("route %s failed", path)
            return 500, "text/plain", f"{type(exc).__name__}: {exc}\n".encode()
