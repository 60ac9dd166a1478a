"""A cluster's PKI folder: create it once, add client certificates to it later.

`create_cluster_pki` is what `clustermesh certs create` runs: a CA, etcd's server certificate, and the client
certificates of the users of DESIGN section 5 that belong to this cluster (`root`, `admin-<c>`, `agent-<c>`).
Certificates for `remote-<peer>` users are added by `clustermesh connect` through `issue_user`.
Creating a PKI where one exists is refused unless asked to overwrite: replacing a CA silently would lock every
client out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from certs import authority, files

__all__ = ["ClusterPKI", "PKIExists", "create_cluster_pki", "issue_user", "open_cluster_pki"]

DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1")


class PKIExists(Exception):
    """The folder already holds a CA."""


@dataclass(frozen=True)
class ClusterPKI:
    """The paths of one cluster's PKI folder."""

    directory: Path

    @property
    def ca(self) -> files.CertPaths:
        return files.CertPaths.in_dir(self.directory, "ca")

    @property
    def server(self) -> files.CertPaths:
        return files.CertPaths.in_dir(self.directory, "server")

    def user(self, name: str) -> files.CertPaths:
        return files.CertPaths.in_dir(self.directory, name)


def cluster_users(cluster: str) -> list[str]:
    return ["root", f"admin-{cluster}", f"agent-{cluster}"]


def create_cluster_pki(
    directory: Path,
    cluster: str,
    *,
    server_hosts: list[str] | None = None,
    days: int = authority.DEFAULT_LEAF_DAYS,
    overwrite: bool = False,
    ca: authority.Issued | None = None,
) -> ClusterPKI:
    """A cluster's PKI; with `ca`, one CA shared by several clusters (their agents then trust each other's etcd
    without a CA bundle: `clustermesh connect` needs no --allow-mismatching-ca)."""
    pki = ClusterPKI(directory)
    if pki.ca.cert.exists() and not overwrite:
        raise PKIExists(
            f"{pki.ca.cert} exists: refusing to replace the CA of cluster {cluster} (pass --force to do so)"
        )
    hosts = list(dict.fromkeys([*DEFAULT_SERVER_HOSTS, *(server_hosts or [])]))
    ca = ca or authority.create_ca(f"{cluster}-ca")
    files.write_issued(ca, pki.ca)
    files.write_issued(authority.issue_server(ca, f"etcd-{cluster}", hosts=hosts, days=days), pki.server)
    for user in cluster_users(cluster):
        files.write_issued(authority.issue_client(ca, user, days=days), pki.user(user))
    return pki


def open_cluster_pki(directory: Path) -> ClusterPKI:
    pki = ClusterPKI(directory)
    if not pki.ca.cert.exists() or not pki.ca.key.exists():
        raise FileNotFoundError(
            f"{directory} holds no CA (ca.crt and ca.key): create it with `clustermesh certs create`"
        )
    return pki


def issue_user(pki: ClusterPKI, user: str, *, days: int = authority.DEFAULT_LEAF_DAYS) -> files.CertPaths:
    """Issue (or re-issue) the client certificate of etcd user `user` with the folder's CA."""
    ca = files.load_issued(pki.ca)
    paths = pki.user(user)
    files.write_issued(authority.issue_client(ca, user, days=days), paths)
    return paths
