"""`clustermesh status`: ask a node's agent over its unix socket how the mesh is, and show it.

The agent's answer is the truth (`agent.mesh.Mesh.status`, typed as `clustermesh.model.api.AgentStatus`): overall
ready only when every configured cluster is connected, every prefix synced in the current session, its heartbeat
fresh and its config accepted. `--wait` asks the agent to answer only once that is so (or the time is up): the
agent waits on its own events, no polling here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec

from clustermesh import output
from clustermesh.daemon import client
from clustermesh.model.api import AgentStatus, ApiError, decode_status

__all__ = ["AgentUnreachable", "connectivity", "fetch_status", "render_status"]


class AgentUnreachable(Exception):
    pass


def api_error(answer: client.Answer) -> ApiError:
    """The agent's error document (or the raw answer, if it is not one)."""
    try:
        return msgspec.json.decode(answer.body, type=ApiError)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ApiError(answer.body[:200].decode(errors="replace") or f"HTTP {answer.status}", "internal")


async def fetch_status(socket: Path, *, wait: float | None = None) -> AgentStatus:
    """The agent's status; with `wait`, first for the agent to answer at all (it may be starting), then for it to
    be ready, within `wait` seconds in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (wait or 0)
    while True:
        remaining = deadline - loop.time()
        path = "/v1/status" + (f"?wait={remaining:.1f}" if wait and remaining > 0 else "")
        try:
            answer = await client.request(socket, "GET", path, timeout=max(remaining, 0) + 30)
            break
        except client.SocketUnreachable as exc:
            if not wait or remaining <= 0:
                raise AgentUnreachable(
                    f"{exc}: is clustermesh-agent running on this node? (--socket, or $CLUSTERMESH_AGENT_SOCKET)"
                ) from None
            await asyncio.sleep(0.2)  # the agent is not up yet: there is nothing to wait on but time
        except client.BadAnswer as exc:
            raise AgentUnreachable(str(exc)) from None
    if answer.status != 200:
        raise AgentUnreachable(f"the agent at {socket} answered {answer.status}: {api_error(answer).error}")
    try:
        return decode_status(answer.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AgentUnreachable(f"the agent at {socket} answered something that is not a status: {exc}") from None


def connectivity(status: AgentStatus) -> dict[str, Any]:
    """cilium-cli's `clustermesh status -o json` shape for this node's agent (`total` agents: this one), plus the
    data path: per remote cluster its nodes reached by this node's probes and their latency."""
    remotes = [c for c in status.clusters if not c.local]
    ready = sum(c.ready for c in remotes)
    errors = {c.name: [c.refused or c.last_error or "; ".join(c.not_ready) or "not ready"]
              for c in remotes if not c.ready}  # fmt: skip
    services = sum(c.counts.get("services", 0) for c in remotes)
    return {
        "connected": {"min": ready, "avg": float(ready), "max": ready},
        "global_services": {"min": services, "avg": float(services), "max": services},
        "clusters": {c.name: {"total": 1, "ready": int(c.ready)} for c in remotes},
        "total": 1,
        "not_ready": 0 if status.ready else 1,
        "errors": {status.node: errors} if errors else {},
        "datapath": {c.name: c.health for c in status.clusters if c.health is not None},
    }


def _datapath(health: dict[str, Any] | None) -> str:
    if health is None:
        return "-"
    text = f"{health['reachable']}/{health['total']}"
    latency = health.get("latency_ms")
    return f"{text} {latency['avg']:.1f}ms" if latency else text


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def render_status(status: AgentStatus) -> None:
    verdict = "[green]ready[/]" if status.ready else "[red]NOT ready[/]"
    output.out.print(
        f"cluster [bold]{status.cluster}[/] (ID {status.cluster_id}), node {status.node or '-'}: {verdict}"
    )
    rows = []
    for c in status.clusters:
        error = c.refused or c.last_error or "-"
        if c.last_error and not c.refused:
            error = f"{error} ({_age(c.last_error_age)})"
        rows.append(
            (
                c.name + (" (local)" if c.local else ""),
                c.cluster_id or "-",
                "yes" if c.connected else "no",
                "yes" if c.ready else "no",
                f"{sum(c.synced.values())}/{len(c.synced) or 4}",
                c.counts.get("nodes", 0),
                c.counts.get("endpoints", 0),
                c.counts.get("identities", 0),
                c.counts.get("services", 0),
                sum(c.rejected.values()),
                c.reconnections,
                f"{c.heartbeat_age:.0f}s" if c.heartbeat_age is not None else "-",
                _datapath(c.health),
                error,
            )
        )
    output.print_table(
        ["CLUSTER", "ID", "CONNECTED", "READY", "SYNCED", "NODES", "ENDPOINTS", "IDENTITIES", "SERVICES", "REJECTED",
         "RECONNECTS", "HEARTBEAT", "DATAPATH", "LAST ERROR"],
        rows,
    )  # fmt: skip
    for problem in status.problems:
        output.out.print(f"  [yellow]not ready:[/] {problem.message} [dim]({problem.code})[/]")
    for c in status.clusters:
        if c.credentials_error:
            output.out.print(f"  [yellow]certificates[/] {c.name}: rotated files not taken up, the session goes on "
                             f"with its own: {c.credentials_error}")  # fmt: skip
        for key, reason in c.rejected_keys:
            output.out.print(f"  [yellow]rejected[/] {c.name}: {key}: {reason}")
