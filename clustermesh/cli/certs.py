"""`clustermesh certs create|issue|show|rotate`: a cluster's PKI, and rotating it in place."""

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


ROTATION_STEPS = {
    "leaves": "every certificate issued again by the issuing CA",
    "new-ca": "a new CA made; trust files now hold new and old (a bundle); the new CA issues from now on",
    "drop-old-ca": "trust files keep only the new CA",
}
NEXT_STEP = {
    "new-ca": "once every process trusts the bundle, issue every certificate from the new CA: "
    "`clustermesh certs rotate {target}`",
    "leaves": "",
    "drop-old-ca": "",
}
ETCD_NOTE = (
    "etcd reads its trusted CA file only when it starts (3.4, measured): restart each etcd that reads these folders "
    "before the next step (the mesh's processes take the files up by themselves)"
)


@certs_group.command("rotate")
@click.option("--dir", "directories", multiple=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A folder of certificates to rotate (repeat; searched recursively). The CA that issues is the "
                   "ca.crt/ca.key of these folders.")  # fmt: skip
@click.option("--lab", "lab", default=None, help="Rotate every certificate of this lab (needs root).")
@click.option("--new-ca", "new_ca", is_flag=True,
              help="Step 1 of a CA roll: make a new CA and trust both it and the old one (a bundle); certificates "
                   "are not issued yet.")  # fmt: skip
@click.option("--drop-old-ca", "drop_old_ca", is_flag=True,
              help="Last step of a CA roll: trust only the new CA (refused while a certificate still chains to the "
                   "old one).")  # fmt: skip
@click.option("--days", type=click.IntRange(min=1), default=None,
              help="Validity of the new certificates.  [default: as long as each one had]")  # fmt: skip
@output_option
def certs_rotate(directories: tuple[Path, ...], lab: str | None, new_ca: bool, drop_old_ca: bool, days: int | None,
                 output_format: str) -> None:  # fmt: skip
    """Issue new certificates in place, with new keys; the running etcd clients (apiserver, agents), the flow
    services, the relays and IPsec's charon take them up with no restart, their watches kept.

    \b
    Rotate the certificates of a CA (same CA, new keys):
      clustermesh certs rotate --dir pki/
    Roll a new CA, in three steps (no moment where a process distrusts a peer):
      clustermesh certs rotate --dir pki/ --new-ca        # trust new + old
      clustermesh certs rotate --dir pki/                 # issue everything from the new CA
      clustermesh certs rotate --dir pki/ --drop-old-ca   # trust only the new CA
    With --lab, the lab's etcds are restarted after the CA steps (etcd reads its trusted CA at start only).
    """
    from certs import rotation

    if bool(directories) == (lab is not None):
        raise click.UsageError("give the folders to rotate (--dir, repeatable) or --lab NAME, one of them")
    if new_ca and drop_old_ca:
        raise click.UsageError("--new-ca and --drop-old-ca are two steps of a CA roll: run them one at a time")
    step = "new-ca" if new_ca else "drop-old-ca" if drop_old_ca else "leaves"
    target = f"--lab {lab}" if lab is not None else " ".join(f"--dir {d}" for d in directories)
    try:
        if lab is not None:
            from clustermesh.cli.lab import _lab_errors
            from clustermesh.lab.lab import Lab

            report = _lab_errors(lambda: Lab.existing(lab, progress=output.step).rotate_certificates(step, days=days))
        elif step == "new-ca":
            report = rotation.add_ca(list(directories))
        elif step == "drop-old-ca":
            report = rotation.drop_old_cas(list(directories))
        else:
            report = rotation.rotate(list(directories), days=days)
    except (rotation.RotationError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    next_step = NEXT_STEP[step].format(target=target)
    if output_format == "json":
        output.print_json({
            "step": step,
            "reissued": [str(p) for p in report.reissued],
            "trustFiles": [str(p) for p in report.trust_files],
            "authorities": [str(p) for p in report.authorities],
            "skipped": [{"file": str(p), "reason": why} for p, why in report.skipped],
            "next": next_step,
        })  # fmt: skip
        return
    output.err.print(f"{step}: {ROTATION_STEPS[step]}")
    rows = [(str(p), "issued again") for p in report.reissued]
    rows += [(str(p), "CA files (issuing CA and trust bundle)") for p in report.authorities]
    rows += [(str(p), "trust bundle") for p in report.trust_files]
    rows += [(str(p), f"left alone: {why}") for p, why in report.skipped]
    output.print_table(["FILE", "DONE"], rows)
    if step != "leaves" and lab is None:
        output.err.print(ETCD_NOTE)
    if next_step:
        output.err.print(f"next: {next_step}")
