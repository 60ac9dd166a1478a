"""The `clustermesh` command: thin click commands that validate, call the async core once, and render.

`asyncio.run` appears only here, at the command edge. Errors the user can fix are printed as one clear line
(no traceback) and exit with status 1.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

import certs
from clustermesh import __version__, output
from clustermesh.contexts import Context, ContextError, ContextFile, default_config_path
from clustermesh.kubectl import ManifestError, Outcome, apply_objects, delete_objects, load_manifests
from clustermesh.model.clusters import validate_cluster_name
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Object, resolve_kind
from clustermesh.resources.standalone import StandaloneStore
from clustermesh.resources.store import ResourceError, ResourceStore
from kvstore import errors as kverrors
from kvstore import etcd, users

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
        """Connect to the context's etcd, run `work` with a standalone store over it, close."""
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
                return await work(StandaloneStore(backend))
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


# --- contexts


@cli.group("context")
def context_group() -> None:
    """Named ways to reach a cluster's etcd (endpoints, CA, client certificate and key), like kubeconfig contexts."""


@context_group.command("add")
@click.argument("name")
@click.option("--endpoints", required=True, multiple=True, help="etcd URL, https://HOST:PORT (repeat, or commas).")
@click.option("--ca", required=True, help="CA file that signed etcd's server certificate.")
@click.option("--cert", required=True, help="Client certificate (its CN is the etcd user).")
@click.option("--key", required=True, help="The client certificate's key.")
@pass_controls
def context_add(controls: Controls, name: str, endpoints: tuple[str, ...], ca: str, cert: str, key: str) -> None:
    """Add (or replace) context NAME; the first context added becomes the current one."""
    contexts = controls.contexts()
    urls = [url for value in endpoints for url in value.split(",") if url]
    context = Context(name, urls, ca, cert, key)
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
        ["CURRENT", "NAME", "ENDPOINTS", "CERT"],
        [
            ("*" if n == contexts.current else "", n, ", ".join(c.endpoints), c.cert)
            for n, c in sorted(contexts.contexts.items())
        ],
    )


# --- apply, get, delete


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


# --- certs


@cli.group("certs")
def certs_group() -> None:
    """Make and inspect a cluster's PKI: its CA, etcd's server certificate and client certificates."""


@certs_group.command("create")
@click.option("--cluster", "cluster", required=True, help="Cluster name (lower-case letters, digits, '-').")
@click.option(
    "--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write."
)
@click.option(
    "--server-host",
    "server_hosts",
    multiple=True,
    help="An IP address or DNS name etcd is reached by (repeat; localhost and 127.0.0.1 are always included).",
)
@click.option("--days", default=certs.authority.DEFAULT_LEAF_DAYS, show_default=True, help="Validity of leaf certs.")
@click.option("--force", is_flag=True, help="Replace an existing CA (every client certificate becomes useless).")
def certs_create(cluster: str, directory: Path, server_hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Create a cluster's PKI in a folder.

    Writes ca.crt/ca.key, server.crt/server.key for etcd, and client certificates for the etcd users root,
    admin-CLUSTER and agent-CLUSTER (the CN of each is the etcd user). Keys are written with mode 0600.
    """
    try:
        validate_cluster_name(cluster)
        pki = certs.create_cluster_pki(directory, cluster, server_hosts=list(server_hosts), days=days, overwrite=force)
    except (ModelError, certs.PKIExists, ValueError) as exc:
        raise _fail(str(exc)) from None
    files = sorted(path.name for path in pki.directory.iterdir() if path.suffix in (".crt", ".key"))
    output.err.print(f"created the PKI of cluster {cluster} in {pki.directory}: {', '.join(files)}")


@certs_group.command("issue")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--user", required=True, help="The etcd user: the certificate's CN.")
@click.option("--days", default=certs.authority.DEFAULT_LEAF_DAYS, show_default=True)
def certs_issue(directory: Path, user: str, days: int) -> None:
    """Issue (or renew) the client certificate of one etcd user with the folder's CA."""
    try:
        pki = certs.open_cluster_pki(directory)
        paths = certs.issue_user(pki, user, days=days)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    output.err.print(f"issued {paths.cert} and {paths.key} for user {user}")


@certs_group.command("show")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@output_option
def certs_show(paths: tuple[Path, ...], output_format: str) -> None:
    """Show the certificates in files or folders: subject, issuer, SANs, validity and status."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.glob("*.crt")) if path.is_dir() else [path])
    now = datetime.datetime.now(datetime.UTC)
    rows = []
    for file in files:
        try:
            found = certs.load_certificates(file)
        except (OSError, ValueError) as exc:
            raise _fail(f"{file}: not a PEM certificate file ({exc})") from None
        for info in (certs.describe(c) for c in found):
            rows.append((file, info))
    if output_format == "json":
        output.print_json(
            [
                {
                    "file": str(file),
                    "subject": info.subject,
                    "commonName": info.common_name,
                    "issuer": info.issuer,
                    "serial": info.serial,
                    "isCA": info.is_ca,
                    "sans": info.sans,
                    "notBefore": info.not_before,
                    "notAfter": info.not_after,
                    "status": info.status(now),
                }
                for file, info in rows
            ]
        )
        return
    output.print_table(
        ["FILE", "SUBJECT", "ISSUER", "SANS", "EXPIRES", "STATUS"],
        [
            (
                file.name,
                info.subject + (" (CA)" if info.is_ca else ""),
                info.issuer,
                ", ".join(info.sans) or "-",
                info.not_after.strftime("%Y-%m-%d %H:%M UTC"),
                info.status(now),
            )
            for file, info in rows
        ],
    )


# --- etcd


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


# --- connect, disconnect, status


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
                await b.backend.close()
        finally:
            await a.backend.close()

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


@cli.command("status")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path),
              default=lambda: os.environ.get("CLUSTERMESH_AGENT_SOCKET", "/run/clustermesh/agent.sock"),
              show_default="$CLUSTERMESH_AGENT_SOCKET or /run/clustermesh/agent.sock",
              help="The agent's unix socket.")  # fmt: skip
@click.option("--wait", is_flag=True, help="Wait until every cluster is ready (exit 1 if not by --timeout).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@output_option
def status(socket_path: Path, wait: bool, timeout: float, output_format: str) -> None:
    """Show, per cluster: connected, synced, counts, reconnections, last error, and whether the mesh is ready.

    Exits 0 when ready, 1 when not (so scripts can wait with --wait), 2 when no agent answers.
    """
    from clustermesh.status import AgentUnreachable, fetch_status, render_status

    try:
        document = asyncio.run(fetch_status(socket_path, wait=timeout if wait else None))
    except AgentUnreachable as exc:
        output.err.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
    if output_format == "json":
        output.print_json(document)
    else:
        render_status(document)
    raise SystemExit(0 if document["ready"] else 1)


# --- lab


@cli.group("lab")
def lab_group() -> None:
    """A multi-cluster mesh on this host, out of network namespaces: no Docker, no Kubernetes (needs root)."""


def _lab_errors(work: Callable[[], T]) -> T:
    from clustermesh.lab.layout import LabError
    from clustermesh.lab.netns import CommandFailed
    from clustermesh.processes.child import ChildFailed

    try:
        return work()
    except (LabError, CommandFailed, ChildFailed) as exc:
        raise click.ClickException(str(exc)) from None


def _lab_name(positional: str | None, option: str | None) -> str:
    """`lab down L` and `lab down --name L` both work (like `lab exec L ...`); two different names are an error."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two lab names given: {positional!r} and --name {option!r}")
    return positional if positional is not None else option if option is not None else "cmlab"


@lab_group.command("up")
@click.argument("lab", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name: 1-8 lower-case letters, digits.  [default: cmlab]")
@click.option("--clusters", default=2, show_default=True)
@click.option("--nodes", default=2, show_default=True, help="Nodes per cluster.")
@click.option("--pods", default=2, show_default=True, help="Pods per node.")
@click.option("--routing", type=click.Choice(["wireguard", "ipsec", "vxlan", "native"]), default="wireguard",
              show_default=True)  # fmt: skip
def lab_up(lab: str | None, name: str | None, clusters: int, nodes: int, pods: int, routing: str) -> None:
    """Build the lab: underlay, per cluster etcd and apiserver, per node an agent, pods, all clusters connected."""
    from clustermesh.lab.lab import Lab, LabExists
    from clustermesh.lab.layout import LabLayout

    name = _lab_name(lab, name)

    def up() -> None:
        lab = Lab(LabLayout(name, clusters, nodes, pods, routing), progress=output.step)
        try:
            lab.up()
        except LabExists:
            raise  # not ours to remove
        except BaseException:
            from clustermesh.lab.lab import down

            logs = Path(f"/tmp/clustermesh-lab-{name}-logs")
            output.err.print(f"[red]lab up failed[/]: cleaning up; the processes' logs are kept in {logs}")
            down(name, progress=output.step, keep_logs=logs)
            raise

    _lab_errors(up)


@lab_group.command("down")
@click.argument("lab", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name (also as the argument).  [default: cmlab]")
def lab_down(lab: str | None, name: str | None) -> None:
    """Remove everything the lab made: processes, namespaces, sockets, state (also after a crash)."""
    from clustermesh.lab.lab import down

    name = _lab_name(lab, name)
    _lab_errors(lambda: down(name, progress=output.step))


@lab_group.command("status")
@click.argument("lab_name", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name (also as the argument).  [default: cmlab]")
@output_option
def lab_status(lab_name: str | None, name: str | None, output_format: str) -> None:
    """Each node's agent: ready or not, clusters, datapath peers; each pod's address."""
    from clustermesh.lab.lab import Lab
    from clustermesh.status import AgentUnreachable, fetch_status

    name = _lab_name(lab_name, name)
    lab = _lab_errors(lambda: Lab.existing(name))
    state = lab.state

    async def collect() -> dict[str, Any]:
        nodes = {}
        for node in state.node_layouts():
            try:
                nodes[node.name] = await fetch_status(lab.socket(node))
            except AgentUnreachable as exc:
                nodes[node.name] = {"ready": False, "error": str(exc)}
        return nodes

    nodes = asyncio.run(collect())
    if output_format == "json":
        output.print_json({"lab": name, "routing": state.routing, "nodes": nodes, "pods": state.pods})
        return
    output.print_table(
        ["NODE", "READY", "CLUSTERS", "PEERS", "DATAPATH", "ERROR"],
        [
            (n, "yes" if s.get("ready") else "no", len(s.get("clusters", [])),
             len((s.get("datapath") or {}).get("peers") or []), (s.get("datapath") or {}).get("driver", "-"),
             s.get("error") or (s.get("datapath") or {}).get("last_error") or "-")
            for n, s in nodes.items()
        ],
        title=f"lab {name} ({state.routing})",
    )  # fmt: skip
    output.print_table(["POD", "IP", "NODE"], [(p, d["ip"], d["node"]) for p, d in sorted(state.pods.items())])


@lab_group.group("node")
def lab_node() -> None:
    """Add a node to a running lab, or remove one, as machines come and go."""


@lab_node.command("add")
@click.argument("name")
@click.argument("cluster")
@click.option("--pods", type=int, default=None, help="Pods on the new node (default: as many as the lab's others).")
def lab_node_add(name: str, cluster: str, pods: int | None) -> None:
    """Add a node to CLUSTER (c1, c2, ...) of lab NAME; wait until every agent has it as a peer."""
    from clustermesh.lab.lab import Lab
    from clustermesh.lab.layout import LabError

    def add() -> None:
        if not re.fullmatch(r"c[1-9]", cluster):
            raise LabError(f"cluster {cluster!r}: name it as the lab does, c1, c2, ...")
        lab = Lab.existing(name, progress=output.step)
        node = lab.add_node(int(cluster[1:]), pods=pods)
        output.step(f"{node.name} is up: {node.ip}, pods {node.pod_cidr}")

    _lab_errors(add)


@lab_node.command("remove")
@click.argument("name")
@click.argument("node")
def lab_node_remove(name: str, node: str) -> None:
    """Remove NODE (as `lab status` names it, e.g. c2-node-2) from lab NAME, with its pods."""
    from clustermesh.lab.lab import Lab

    _lab_errors(lambda: Lab.existing(name, progress=output.step).remove_node(node))


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(name: str, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD (cluster/pod, e.g. c1/pod-1-1) of lab NAME: `lab exec NAME c1/pod-1-1 -- ping ...`."""
    from clustermesh.lab import netns
    from clustermesh.lab.lab import load, require_root

    _lab_errors(require_root)
    state = _lab_errors(lambda: load(name))
    if pod not in state.pods:
        known = ", ".join(sorted(state.pods)[:8])
        raise click.ClickException(f"no pod {pod!r} in lab {name}; pods: {known}")
    os.execvp("nsenter", [*netns.nsenter(state.pods[pod]["netns"]), *command])


# --- demo


@cli.command("demo")
@click.option(
    "--control-plane",
    "control_plane",
    is_flag=True,
    help="Only the control plane (three clusters' etcd, apiserver and agent on loopback): no root needed.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --control-plane: where to keep the PKI and etcd data (default: a temporary folder, removed).",
)
def demo(control_plane: bool, workdir: Path | None) -> None:
    """Run the demo: a two-cluster lab, pods talking across clusters over WireGuard, then removed (needs root)."""
    if control_plane:
        from clustermesh import demo_control_plane

        demo_control_plane.main(workdir)
        return
    from clustermesh import demo as lab_demo

    _lab_errors(lab_demo.main)


def main() -> None:
    cli()
