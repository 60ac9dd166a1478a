"""`clustermesh service list`: each frontend a node load-balances, and its backends by cluster: their state and
which new connections go to under the Service's affinity."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from clustermesh import output
from clustermesh.cli.agents import get_json, lab_option, socket_option, sockets
from clustermesh.cli.root import cli

__all__ = ["service_group"]


@cli.group("service")
def service_group() -> None:
    """Services as the nodes' load balancers see them."""


@service_group.command("list")
@socket_option
@lab_option
@click.option("--cluster", default=None, help="With --lab: only this cluster (c1, c2, ...).")
@click.option("-o", "--output", "output_format", type=click.Choice(["table", "json"]), default="table")
def service_list(socket: Path | None, lab: str | None, cluster: str | None, output_format: str) -> None:
    """Per frontend (ClusterIP:port/protocol): its Service, whether it is global and its affinity, and each backend
    with its cluster and state; `*` marks those new connections go to. With --lab, one node of each cluster (every
    node of a cluster balances alike)."""
    found = sockets(socket, lab, first_of_each_cluster=True)
    if cluster is not None:
        found = {node: path for node, path in found.items() if node.split("/")[0] == cluster}
        if not found:
            raise click.ClickException(f"no cluster {cluster!r} in lab {lab}")

    async def collect() -> dict[str, Any]:
        return {node: await get_json(path, "/v1/services") for node, path in found.items()}

    documents = asyncio.run(collect())
    if output_format == "json":
        output.print_json(documents if lab else next(iter(documents.values())))
        return
    rows = []
    for node, document in documents.items():
        for frontend in document["frontends"]:
            backends = " ".join(f"{'*' if b['in_use'] else ''}{b['cluster']}/{b['address']}"
                                + ("" if b["state"] == "active" else f"({b['state']})")
                                for b in frontend["backends"]) or "-"  # fmt: skip
            kind = f"global, affinity {frontend['affinity']}" if frontend["global"] else "local"
            rows.append((node.split("/")[0], frontend["service"], frontend["frontend"], kind, backends))
    output.print_table(["CLUSTER", "SERVICE", "FRONTEND", "KIND", "BACKENDS (* in use)"], rows)
