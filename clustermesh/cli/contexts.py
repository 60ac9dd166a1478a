"""`clustermesh context add|use|list`: named ways to reach a cluster."""

from __future__ import annotations

import click

from clustermesh import output
from clustermesh.cli.root import Controls, cli, output_option, pass_controls
from clustermesh.contexts import SOURCES, Context, ContextError
from kvstore import errors as kverrors


@cli.group("context")
def context_group() -> None:
    """Named ways to reach a cluster's etcd (endpoints, CA, client certificate and key), like kubeconfig contexts."""


@context_group.command("add")
@click.argument("name")
@click.option("--endpoints", required=True, multiple=True, help="etcd URL, https://HOST:PORT (repeat, or commas).")
@click.option("--ca", required=True, help="CA file that signed etcd's server certificate.")
@click.option("--cert", required=True, help="Client certificate (its CN is the etcd user).")
@click.option("--key", required=True, help="The client certificate's key.")
@click.option("--source", type=click.Choice(list(SOURCES)), default="standalone", show_default=True,
              help="Where the cluster's resources live (as its apiserver's --source): apply, delete and connect "
                   "write there.")  # fmt: skip
@click.option("--kubeconfig", default=None, help="With --source kubernetes: the kubeconfig (default: the usual one).")
@click.option("--kube-context", default=None, help="With --source kubernetes: the kubeconfig's context.")
@click.option("--relay", default=None, help="The unix socket of the cluster's clustermesh-relay: `observe` reads it.")
@pass_controls
def context_add(controls: Controls, name: str, endpoints: tuple[str, ...], ca: str, cert: str, key: str,
                source: str, kubeconfig: str | None, kube_context: str | None, relay: str | None) -> None:  # fmt: skip
    """Add (or replace) context NAME; the first context added becomes the current one."""
    contexts = controls.contexts()
    urls = [url for value in endpoints for url in value.split(",") if url]
    if source == "standalone" and (kubeconfig or kube_context):
        raise click.UsageError("--kubeconfig and --kube-context go with --source kubernetes")
    context = Context(
        name, urls, ca, cert, key, source=source, kubeconfig=kubeconfig, kube_context=kube_context, relay=relay
    )
    try:
        context.etcd_config(controls.config.parent)  # refuses plaintext and malformed URLs now, not at use
    except kverrors.KVStoreError as exc:
        raise click.ClickException(str(exc)) from None
    contexts.add(context)
    contexts.save()
    output.err.print(f"context {name} saved in {contexts.path}" + (" (current)" if contexts.current == name else ""))


@context_group.command("use")
@click.argument("name")
@pass_controls
def context_use(controls: Controls, name: str) -> None:
    """Make NAME the current context."""
    contexts = controls.contexts()
    try:
        contexts.get(name)
    except ContextError as exc:
        raise click.ClickException(str(exc)) from None
    contexts.current = name
    contexts.save()


@context_group.command("list")
@output_option
@pass_controls
def context_list(controls: Controls, output_format: str) -> None:
    """List the contexts."""
    contexts = controls.contexts()
    if output_format == "json":
        output.print_json(
            {"current": contexts.current, "contexts": {n: c.as_dict() for n, c in contexts.contexts.items()}}
        )
        return
    output.print_table(
        ["CURRENT", "NAME", "ENDPOINTS", "CERT", "SOURCE"],
        [
            ("*" if n == contexts.current else "", n, ", ".join(c.endpoints), c.cert, c.source)
            for n, c in sorted(contexts.contexts.items())
        ],
    )
