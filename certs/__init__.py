"""PKI for the mesh: CAs, etcd server certificates, client certificates whose CN is the etcd user.

Imports nothing of the project's: every other package may use it.
"""

from certs.authority import Issued, create_ca, issue_client, issue_server
from certs.bundles import ClusterPKI, PKIExists, create_cluster_pki, issue_user, open_cluster_pki
from certs.files import CertPaths, load_certificates, load_issued, write_atomic, write_issued
from certs.inspecting import CertificateInfo, describe, validity_problem

__all__ = [
    "CertPaths",
    "CertificateInfo",
    "ClusterPKI",
    "Issued",
    "PKIExists",
    "create_ca",
    "create_cluster_pki",
    "describe",
    "issue_client",
    "issue_server",
    "issue_user",
    "load_certificates",
    "load_issued",
    "open_cluster_pki",
    "validity_problem",
    "write_atomic",
    "write_issued",
]
