"""`clustermesh status`: how the mesh is, as a node's agent sees it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click
import msgspec

from clustermesh import output
from clustermesh.cli.root import cli, output_option


@cli.command("status")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path),
              default=lambda: os.environ.get("CLUSTERMESH_AGENT_SOCKET", "/run/clustermesh/agent.sock"),
              show_default="$CLUSTERMESH_AGENT_SOCKET or /run/clustermesh/agent.sock",
              help="The agent's unix socket.")  # fmt: skip
@click.option("--wait", is_flag=True, help="Wait until every cluster is ready (exit 1 if not by --timeout).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@output_option
def status_command(socket_path: Path, wait: bool, timeout: float, output_format: str) -> None:
    """Show, per cluster: connected, synced, counts, reconnections, last error, and whether the mesh is ready.

    Exits 0 when ready, 1 when not (so scripts can wait with --wait), 2 when no agent answers.
    """
    from clustermesh.status import AgentUnreachable, connectivity, fetch_status, render_status

    try:
        status = asyncio.run(fetch_status(socket_path, wait=timeout if wait else None))
    except AgentUnreachable as exc:
        output.err.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
    if output_format == "json":
        output.print_json({**msgspec.to_builtins(status), "connectivity": connectivity(status)})
    else:
        render_status(status)
    raise SystemExit(0 if status.ready else 1)
