"""Asking agents over their unix sockets, for the commands that show what nodes do (`policy get`, `observe`,
`service list`): one node (`--socket`), or the nodes of a lab (`--lab NAME`, whose state names their sockets)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from clustermesh.daemon import client

__all__ = ["DEFAULT_SOCKET", "get_json", "lab_option", "socket_option", "sockets"]

DEFAULT_SOCKET = "/run/clustermesh/agent.sock"


def sockets(socket: Path | None, lab: str | None, *, first_of_each_cluster: bool = False) -> dict[str, Path]:
    """node -> its agent's socket; with `first_of_each_cluster`, one node a cluster (what every node of a cluster
    computes alike)."""
    if lab is not None:
        from clustermesh.lab.lab import Lab
        from clustermesh.lab.layout import LabError

        try:
            found = Lab.existing(lab)
        except LabError as exc:
            raise click.ClickException(str(exc)) from None
        nodes = found.state.node_layouts()
        if first_of_each_cluster:
            nodes = [n for n in nodes if n == min((m for m in nodes if m.cluster == n.cluster), key=lambda m: m.index)]
        return {f"c{node.cluster}/{node.name}": found.socket(node) for node in nodes}
    chosen = socket or Path(os.environ.get("CLUSTERMESH_AGENT_SOCKET", DEFAULT_SOCKET))
    return {str(chosen): chosen}


async def get_json(socket: Path, path: str, timeout: float = 30.0) -> Any:
    try:
        answer = await client.request(socket, "GET", path, timeout=timeout)
    except (client.SocketUnreachable, client.BadAnswer) as exc:
        raise click.ClickException(f"{exc}: is clustermesh-agent running there?") from None
    document = answer.json()
    if answer.status != 200:
        raise click.ClickException(f"{socket}: {document.get('error') if isinstance(document, dict) else document}")
    return document


socket_option = click.option("--socket", "socket", type=click.Path(dir_okay=False, path_type=Path), default=None,
                             help="The agent's unix socket (default: $CLUSTERMESH_AGENT_SOCKET or "
                                  f"{DEFAULT_SOCKET}).")  # fmt: skip
lab_option = click.option("--lab", "lab", default=None, help="Every node of this lab instead of one socket.")
