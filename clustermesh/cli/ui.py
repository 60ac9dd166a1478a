"""`clustermesh ui`: the mesh in the browser, served on this host's loopback until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click

from clustermesh.cli.root import cli
from clustermesh.ui.server import UiServer

__all__ = ["ui"]


def _lab_sources(name: str, cluster: str) -> tuple[Path, dict[str, Path]]:
    from clustermesh.lab.lab import Lab
    from clustermesh.lab.layout import LabError

    try:
        lab = Lab.existing(name)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    agents: dict[str, Path] = {}
    for node in lab.state.node_layouts():
        agents.setdefault(f"c{node.cluster}", lab.socket(node))
    index = int(cluster[1:]) if cluster[1:].isdigit() else 0
    if f"c{index}" not in agents:
        raise click.BadParameter(f"lab {name} has clusters {', '.join(sorted(agents))}", param_hint="--cluster")
    return lab.relay_socket(index), agents


@cli.command("ui")
@click.option("--lab", "lab", default=None, help="A lab: its relay and one agent of each cluster.")
@click.option("--cluster", default="c1", show_default=True, help="With --lab: whose relay to read.")
@click.option("--relay", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A clustermesh-relay's socket (without --lab).")  # fmt: skip
@click.option("--agent", "agents", multiple=True, metavar="CLUSTER=SOCKET",
              help="An agent's socket for a cluster's status (repeat; without --lab).")  # fmt: skip
@click.option("--address", default="127.0.0.1", show_default=True, help="Where to listen (this host only).")
@click.option("--port", default=12000, show_default=True, help="0 picks a free port.")
def ui(lab: str | None, cluster: str, relay: Path | None, agents: tuple[str, ...], address: str, port: int) -> None:
    """Serve a live map of the mesh: clusters and their status, workloads and the flows between them (drops in red,
    with the reason), and the flow table with a filter. Prints the address to open, then serves until Ctrl-C."""
    if lab is not None:
        relay_socket, agent_sockets = _lab_sources(lab, cluster)
    elif relay is not None:
        relay_socket = relay
        agent_sockets = {}
        for item in agents:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise click.BadParameter(f"{item!r} is not CLUSTER=SOCKET", param_hint="--agent")
            agent_sockets[name] = Path(path)
    else:
        raise click.UsageError("give --lab NAME, or --relay SOCKET (with --agent CLUSTER=SOCKET for statuses)")

    async def serve() -> None:
        server = UiServer(relay_socket, agent_sockets, host=address, port=port)
        try:
            await server.start()
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
        click.echo(f"clustermesh ui: {server.url} (Ctrl-C to stop)", err=False)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
