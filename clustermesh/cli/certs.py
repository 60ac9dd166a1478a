"""`clustermesh certs create|issue|show`: a cluster's PKI."""

from __future__ import annotations

import datetime
from pathlib import Path

import click

import certs
from clustermesh import output
from clustermesh.cli.root import _fail, cli, output_option
from clustermesh.model.clusters import validate_cluster_name
from clustermesh.model.errors import ModelError


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
