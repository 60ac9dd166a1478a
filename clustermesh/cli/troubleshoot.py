"""`clustermesh troubleshoot [CLUSTER]`: which hop from this node to each remote cluster fails, why, and the fix."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import click

from clustermesh import output
from clustermesh.cli.agents import DEFAULT_SOCKET
from clustermesh.cli.root import cli

__all__ = ["troubleshoot"]

MARKS = {"ok": "[green]ok[/]", "failed": "[red]FAILED[/]", "not reached": "[dim]not reached[/]",
         "skipped": "[dim]skipped[/]"}  # fmt: skip


@cli.command("troubleshoot")
@click.argument("cluster", required=False)
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"The agent's unix socket (default: $CLUSTERMESH_AGENT_SOCKET or {DEFAULT_SOCKET}).")  # fmt: skip
@click.option("-o", "--output", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)  # fmt: skip
def troubleshoot(cluster: str | None, socket_path: Path | None, output_format: str) -> None:
    """Per remote cluster (or CLUSTER only), each hop from this node in order: name resolution, TCP, TLS,
    certificate chain, SAN and expiry, etcd user and role, cluster-config, synced canaries, heartbeat, tunnel peer,
    data path; the first that fails is named with the evidence and the fix. Exits 1 if a hop fails."""
    from clustermesh.status import AgentUnreachable, fetch_status
    from clustermesh.troubleshoot import diagnose, diagnose_config_file

    socket = socket_path or Path(os.environ.get("CLUSTERMESH_AGENT_SOCKET", DEFAULT_SOCKET))
    try:
        status = asyncio.run(fetch_status(socket))
    except AgentUnreachable as exc:
        output.err.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
    remotes = [c for c in status.clusters if not c.local and (cluster is None or c.name == cluster)]
    if cluster is not None and not remotes and cluster not in status.config_problems:
        known = ", ".join(c.name for c in status.clusters if not c.local) or "none"
        raise click.BadParameter(f"{cluster!r} is not a remote cluster of this node (known: {known})",
                                 param_hint="CLUSTER")  # fmt: skip
    found = {c.name: diagnose(status, c) for c in remotes}
    for name, reason in sorted(status.config_problems.items()):
        if cluster is None or name == cluster:
            found[f"{name} (config file)"] = diagnose_config_file(name, reason)
    failed = any(h.state == "failed" for hops in found.values() for h in hops)
    if output_format == "json":
        clusters = {name: [dataclasses.asdict(hop) for hop in hops] for name, hops in found.items()}
        output.print_json({"node": status.node, "cluster": status.cluster, "clusters": clusters})
        raise SystemExit(1 if failed else 0)
    output.out.print(f"from node [bold]{status.node}[/] of cluster [bold]{status.cluster}[/]")
    for name, hops in found.items():
        output.out.print(f"\n[bold]{name}[/]")
        for hop in hops:
            detail = f" - {hop.evidence}" if hop.evidence else ""
            output.out.print(f"  {hop.name:<20} {MARKS.get(hop.state, hop.state)}{detail}", highlight=False)
            if hop.fix:
                output.out.print(f"  {'':<20} [yellow]fix:[/] {hop.fix}", highlight=False)
    if not found:
        output.out.print("no remote cluster is configured on this node")
    raise SystemExit(1 if failed else 0)
