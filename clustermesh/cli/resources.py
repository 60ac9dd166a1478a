"""`clustermesh apply|delete|get`: kubectl for a cluster's ResourceStore."""

from __future__ import annotations

from typing import Any

import click
import yaml

from clustermesh import output
from clustermesh.cli.root import Controls, cli, pass_controls
from clustermesh.kubectl import ManifestError, Outcome, apply_objects, delete_objects, load_manifests
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Object, resolve_kind
from clustermesh.resources.store import ResourceStore


def _report(outcomes: list[Outcome]) -> None:
    failed = False
    for outcome in outcomes:
        if outcome.action == "failed":
            failed = True
            output.err.print(f"[red]error:[/] {outcome.error}")
        else:
            output.out.print(f"{outcome.ref} {outcome.action}")
    if failed:
        raise SystemExit(1)


def _manifests(files: tuple[str, ...]) -> list[tuple[Any, str]]:
    try:
        return load_manifests(list(files))
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("apply")
@click.option("-f", "--filename", "files", required=True, multiple=True, help="A file, a folder, or - for stdin.")
@pass_controls
def apply(controls: Controls, files: tuple[str, ...]) -> None:
    """Create or update the objects of YAML/JSON manifests (multi-document YAML works) in the standalone store."""
    documents = _manifests(files)
    _report(controls.with_store(lambda store: apply_objects(store, documents)))


@cli.command("delete")
@click.option("-f", "--filename", "files", required=True, multiple=True, help="A file, a folder, or - for stdin.")
@pass_controls
def delete(controls: Controls, files: tuple[str, ...]) -> None:
    """Delete the objects named by manifests."""
    documents = _manifests(files)
    _report(controls.with_store(lambda store: delete_objects(store, documents)))


@cli.command("get")
@click.argument("kind_name", metavar="KIND")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Namespace (default: default) for namespaced kinds.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Objects of every namespace.")
@click.option("-o", "--output", "output_format", type=click.Choice(["table", "wide", "yaml", "json"]), default="table")
@pass_controls
def get(
    controls: Controls, kind_name: str, name: str | None, namespace: str | None, all_namespaces: bool,
    output_format: str,
) -> None:  # fmt: skip
    """Show objects of KIND (ciliumnodes, cep, svc, ...), or the one called NAME."""
    try:
        kind = resolve_kind(kind_name)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    scope = None if (all_namespaces or not kind.namespaced) else (namespace or "default")

    async def fetch(store: ResourceStore) -> list[Object]:
        if name is not None:
            found = await store.get(kind, name, scope if kind.namespaced else None)
            if found is None:
                where = f" in namespace {scope}" if scope else ""
                raise click.ClickException(f"{kind.plural} {name!r} not found{where}")
            return [found]
        items = (await store.list(kind)).items
        return [i for i in items if scope is None or (i.get("metadata") or {}).get("namespace") == scope]

    objects = controls.with_store(fetch)
    if output_format == "json":
        document: Any = objects[0] if name else {"apiVersion": "v1", "kind": "List", "items": objects}
        output.print_json(document)
    elif output_format == "yaml":
        document = objects[0] if name else {"apiVersion": "v1", "kind": "List", "items": objects}
        click.echo(yaml.safe_dump(document, sort_keys=False), nl=False)
    else:
        from clustermesh import tables

        columns, rows = tables.rows(kind, objects, wide=output_format == "wide", namespaces=scope is None)
        if not rows:
            where = f" in namespace {scope}" if scope else ""
            output.err.print(f"no {kind.plural} found{where}")
            return
        output.print_table(columns, rows)
