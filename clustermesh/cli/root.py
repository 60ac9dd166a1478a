"""The root of the `clustermesh` command: its group, its global options, and what every command shares.

`asyncio.run` appears only in this package, at the command edge. Errors the user can fix are printed as one clear
line (no traceback) and exit with status 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from clustermesh import __version__
from clustermesh.contexts import ContextError, ContextFile, default_config_path
from clustermesh.resources.store import ResourceError, ResourceStore
from kvstore import errors as kverrors
from kvstore import etcd

__all__ = ["Controls", "cli", "main"]

T = TypeVar("T")


@dataclass
class Controls:
    """What every command may need: the config file and context, and (for tests) a store to use instead."""

    config: Path = field(default_factory=default_config_path)
    context: str | None = None
    store: ResourceStore | None = None

    def contexts(self) -> ContextFile:
        try:
            return ContextFile.load(self.config)
        except ContextError as exc:
            raise click.ClickException(str(exc)) from None

    def with_store(self, work: Callable[[ResourceStore], Coroutine[Any, Any, T]]) -> T:
        """Connect to the context's etcd, run `work` with the cluster's store (its context's source), close."""
        if self.store is not None:
            return asyncio.run(work(self.store))
        try:
            context = self.contexts().get(self.context)
            config = context.etcd_config(self.config.parent)
        except (ContextError, kverrors.KVStoreError) as exc:
            raise click.ClickException(str(exc)) from None

        async def session() -> T:
            backend = await etcd.connect(config)
            try:
                store = context.open_store(backend)
                try:
                    return await work(store)
                finally:
                    await store.close()
            finally:
                await backend.close()

        try:
            return asyncio.run(session())
        except kverrors.KVStoreError as exc:
            raise click.ClickException(f"context {context.name}: {exc}") from None
        except ResourceError as exc:
            raise click.ClickException(str(exc)) from None


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


output_option = click.option(
    "-o",
    "--output",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for programs (stdout then holds one JSON document).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="clustermesh")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The contexts file (default: $CLUSTERMESH_CONFIG, else ~/.config/clustermesh/config.yaml).",
)
@click.option("--context", "context_name", default=None, help="The context to use (default: the current one).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, config_path: Path | None, context_name: str | None) -> None:
    """A multi-cluster network mesh in the spirit of Cilium ClusterMesh.

    Each cluster runs an etcd-backed apiserver that publishes its nodes, endpoints, identities and global
    services in Cilium's wire format; node agents read every cluster and join them into one flat network.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    controls = ctx.ensure_object(Controls)
    if config_path is not None:
        controls.config = config_path
    if context_name is not None:
        controls.context = context_name


pass_controls = click.make_pass_decorator(Controls, ensure=True)


def main() -> None:
    cli()
