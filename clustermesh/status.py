"""`clustermesh status`: ask a node's agent over its unix socket how the mesh is, and show it.

The agent's answer is the truth (`agent.mesh.Mesh.status`): overall ready only when every configured cluster is
connected, every prefix synced, its heartbeat fresh and its config accepted. `--wait` asks the agent to answer only
once that is so (or the time is up): the agent waits on its own events, no polling here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from clustermesh import output

__all__ = ["AgentUnreachable", "fetch_status", "render_status"]


class AgentUnreachable(Exception):
    pass


async def request(socket: Path, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One HTTP request over the agent's unix socket; (status, decoded JSON)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket)), 5)
    except (OSError, TimeoutError) as exc:
        raise AgentUnreachable(
            f"no agent answers at {socket} ({getattr(exc, 'strerror', None) or exc}): is clustermesh-agent running "
            "on this node? (--socket, or $CLUSTERMESH_AGENT_SOCKET)"
        ) from None
    payload = json.dumps(body).encode() if body is not None else b""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(payload)}\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, content = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(content or b"null")
    except json.JSONDecodeError:
        return status, content.decode(errors="replace")


async def fetch_status(socket: Path, *, wait: float | None = None) -> dict[str, Any]:
    """The agent's status; with `wait`, first for the agent to answer at all (it may be starting), then for it to
    be ready, within `wait` seconds in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (wait or 0)
    while True:
        remaining = deadline - loop.time()
        path = "/v1/status" + (f"?wait={remaining:.1f}" if wait and remaining > 0 else "")
        try:
            status, document = await request(socket, "GET", path, timeout=max(remaining, 0) + 30)
            break
        except AgentUnreachable:
            if not wait or remaining <= 0:
                raise
            await asyncio.sleep(0.2)  # the agent is not up yet: there is nothing to wait on but time
    if status != 200 or not isinstance(document, dict):
        raise AgentUnreachable(f"the agent at {socket} answered {status}: {document}")
    return document


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def render_status(document: dict[str, Any]) -> None:
    verdict = "[green]ready[/]" if document["ready"] else "[red]NOT ready[/]"
    output.out.print(
        f"cluster [bold]{document['cluster']}[/] (ID {document['cluster_id']}), node {document['node'] or '-'}: "
        f"{verdict}"
    )
    rows = []
    for c in document["clusters"]:
        synced = c.get("synced") or {}
        counts = c.get("counts") or {}
        error = c.get("refused") or c.get("last_error") or "-"
        if c.get("last_error") and not c.get("refused"):
            error = f"{error} ({_age(c.get('last_error_age'))})"
        rows.append(
            (
                c["name"] + (" (local)" if c.get("local") else ""),
                c.get("cluster_id") or "-",
                "yes" if c["connected"] else "no",
                "yes" if c["ready"] else "no",
                f"{sum(synced.values())}/{len(synced) or 4}",
                counts.get("nodes", 0),
                counts.get("endpoints", 0),
                counts.get("identities", 0),
                counts.get("services", 0),
                sum((c.get("rejected") or {}).values()),
                c.get("reconnections", 0),
                f"{c['heartbeat_age']:.0f}s" if c.get("heartbeat_age") is not None else "-",
                error,
            )
        )
    output.print_table(
        ["CLUSTER", "ID", "CONNECTED", "READY", "SYNCED", "NODES", "ENDPOINTS", "IDENTITIES", "SERVICES", "REJECTED",
         "RECONNECTS", "HEARTBEAT", "LAST ERROR"],
        rows,
    )  # fmt: skip
    for reason in document.get("not_ready") or []:
        output.out.print(f"  [yellow]not ready:[/] {reason}")
    for c in document["clusters"]:
        for key, reason in c.get("rejected_keys") or []:
            output.out.print(f"  [yellow]rejected[/] {c['name']}: {key}: {reason}")
    for name, problem in (document.get("config_problems") or {}).items():
        output.out.print(f"  [yellow]config[/] {name}: {problem}")
