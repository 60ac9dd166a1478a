"""`clustermesh connect|disconnect`: join two clusters, or part them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from clustermesh import output
from clustermesh.cli.root import Controls, cli, pass_controls
from clustermesh.contexts import ContextError
from clustermesh.resources.store import ResourceError
from kvstore import errors as kverrors


def _sides_and(controls: Controls, destination: str, pki: tuple[Path | None, Path | None], work: Any) -> list[str]:
    from clustermesh import connecting

    contexts = controls.contexts()
    try:
        source_context = contexts.get(controls.context)
        destination_context = contexts.get(destination)
    except ContextError as exc:
        raise click.ClickException(str(exc)) from None

    async def run() -> list[str]:
        a = await connecting.open_side(source_context, controls.config.parent, pki[0])
        try:
            b = await connecting.open_side(destination_context, controls.config.parent, pki[1])
            try:
                result: list[str] = await work(a, b)
                return result
            finally:
                await b.close()
        finally:
            await a.close()

    try:
        return asyncio.run(run())
    except (connecting.ConnectError, kverrors.KVStoreError, ResourceError, ContextError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("connect")
@click.option("--destination-context", "destinations", required=True, multiple=True,
              help="The context of the cluster to connect to (repeat to connect to several).")  # fmt: skip
@click.option("--allow-mismatching-ca", is_flag=True, help="The clusters' CAs differ: hand each a bundle of both.")
@click.option("--pki", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The PKI folder of --context's cluster (default: the folder of its CA file).")  # fmt: skip
@click.option("--destination-pki", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The PKI folder of the destination cluster (default: the folder of its CA file).")  # fmt: skip
@pass_controls
def connect(controls: Controls, destinations: tuple[str, ...], allow_mismatching_ca: bool, pki: Path | None,
            destination_pki: Path | None) -> None:  # fmt: skip
    """Connect the cluster of --context with each destination, both ways, after checking they can be connected.

    Checks first (both reachable, distinct names and IDs, the same maxConnectedClusters, the CAs) and writes nothing
    on either side if one fails. Then creates the read-only user remote-PEER on each side, issues its certificate,
    and stores the other side's access in each cluster's store, where its agents pick it up.
    """
    from clustermesh import connecting

    for destination in destinations:
        lines = _sides_and(
            controls,
            destination,
            (pki, destination_pki),
            lambda a, b: connecting.connect_clusters(a, b, allow_mismatching_ca=allow_mismatching_ca),
        )
        for line in lines:
            output.out.print(line)


@cli.command("disconnect")
@click.option("--destination-context", "destinations", required=True, multiple=True)
@pass_controls
def disconnect(controls: Controls, destinations: tuple[str, ...]) -> None:
    """Part the cluster of --context from each destination: remove both sides' access and remote users."""
    from clustermesh import connecting

    for destination in destinations:
        for line in _sides_and(controls, destination, (None, None), connecting.disconnect_clusters):
            output.out.print(line)
