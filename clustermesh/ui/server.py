"""The page's server: the page and its assets (shipped in the package, nothing fetched from the internet), and
`/api/mesh`, what the page shows, gathered at each request from a relay (flows) and one agent per cluster (status).

It listens on the host's loopback: the browser is a person's, on this host. What it reads it reads over unix sockets.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from clustermesh.daemon import client
from clustermesh.daemon.http import HttpEndpoint, Request, Response, json_response
from clustermesh.ui.graph import flow_row, graph

__all__ = ["UiServer"]

STATIC = Path(__file__).parent / "static"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
FLOWS = 500  # the last flows the page is given


async def _ask(socket: Path, path: str) -> tuple[Any, str | None]:
    try:
        answer = await client.request(socket, "GET", path, connect_timeout=2, timeout=5)
        document = answer.json()
    except (client.SocketUnreachable, client.BadAnswer) as exc:
        return None, str(exc)
    if answer.status != 200:
        return None, f"{socket}: {document.get('error') if isinstance(document, dict) else document}"
    return document, None


class UiServer:
    def __init__(self, relay: Path, agents: dict[str, Path], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.relay = relay
        self.agents = agents  # cluster -> one agent's socket
        self.endpoint = HttpEndpoint(host, port, routes={
            "/": self._static("index.html"), "/app.js": self._static("app.js"), "/app.css": self._static("app.css"),
            "/api/mesh": self.mesh,
        })  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://{self.endpoint.host}:{self.endpoint.port}/"

    @staticmethod
    def _static(name: str) -> Any:
        body = (STATIC / name).read_bytes()

        async def route(request: Request) -> Response:
            return 200, TYPES[Path(name).suffix], body

        return route

    async def mesh(self, request: Request) -> Response:
        (flows, relay_error), *statuses = await asyncio.gather(
            _ask(self.relay, f"/v1/flows?since=0&last={FLOWS}"), *(_ask(s, "/v1/status") for s in self.agents.values())
        )
        clusters = []
        for name, (status, error) in zip(self.agents, statuses, strict=True):
            if status is None:
                clusters.append({"name": name, "ready": False, "node": "", "problems": [error], "remotes": []})
                continue
            remotes = [{"name": c["name"], "ready": c["ready"], "not_ready": c.get("not_ready") or []}
                       for c in status.get("clusters") or [] if not c.get("local")]  # fmt: skip
            clusters.append({"name": name, "ready": status.get("ready", False), "node": status.get("node", ""),
                             "problems": [p.get("message", "") for p in status.get("problems") or []],
                             "remotes": remotes})  # fmt: skip
        documents = (flows or {}).get("flows") or []
        unreachable = list((flows or {}).get("unreachable") or [])
        if relay_error:
            unreachable.insert(0, f"relay {self.relay}: {relay_error}")
        return json_response(200, {
            "clusters": clusters, "graph": graph(documents, self.agents), "unreachable": unreachable,
            "flows": [flow_row(d) for d in reversed(documents)],
        })  # fmt: skip

    async def start(self) -> None:
        await self.endpoint.start()

    async def stop(self) -> None:
        await self.endpoint.stop()
