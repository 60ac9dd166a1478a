"""`clustermesh etcd init`: a cluster's etcd users, roles and auth."""

from __future__ import annotations

import asyncio

import click

from clustermesh import output
from clustermesh.cli.root import Controls, cli, pass_controls
from clustermesh.contexts import ContextError
from clustermesh.model.clusters import validate_cluster_name
from clustermesh.model.errors import ModelError
from kvstore import errors as kverrors
from kvstore import etcd, users


@cli.group("etcd")
def etcd_group() -> None:
    """Set up a cluster's etcd for the mesh."""


@etcd_group.command("init")
@click.option("--cluster", "cluster", required=True, help="The cluster this etcd belongs to.")
@pass_controls
def etcd_init(controls: Controls, cluster: str) -> None:
    """Create the users and roles of the security model and enable auth (idempotent).

    Users root and admin-CLUSTER (role root), agent-CLUSTER (reads cilium/ and registry/, writes its own kinds),
    and the read-only role remote for remote-PEER users. Run it as root (the context's certificate CN).
    """
    try:
        validate_cluster_name(cluster)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        context = controls.contexts().get(controls.context)
        config = context.etcd_config(controls.config.parent)
    except (ContextError, kverrors.KVStoreError) as exc:
        raise click.ClickException(str(exc)) from None

    async def init() -> None:
        backend = await etcd.connect(config)
        try:
            await users.ensure_cluster_users(backend, cluster)
        finally:
            await backend.close()

    try:
        asyncio.run(init())
    except kverrors.KVStoreError as exc:
        raise click.ClickException(f"context {context.name}: {exc}") from None
    output.err.print(f"etcd of cluster {cluster}: users root, admin-{cluster}, agent-{cluster}, role remote; auth on")
