"""The kvstore's errors, translated once at the edge (`kvstore.etcd`), so nothing above parses gRPC messages.

    KVStoreError
    ├── BackendUnavailable          retryable: etcd is down, restarting or unreachable
    │   └── EndpointUnreachable     nothing answers at the endpoint (refused, timed out, no route)
    │       └── NameNotResolved     the endpoint's host name does not resolve (DNS)
    ├── TLSSetupError               not retryable until files or certificates change; the message says what to fix
    │   ├── BadTLSFiles             a CA, certificate or key file is missing or unreadable
    │   ├── PlaintextEndpoint       the endpoint is not https, or does not speak TLS
    │   ├── UnknownAuthority        the server's certificate is not signed by our CA (wrong CA file)
    │   ├── ServerCertificateExpired
    │   ├── ServerNameMismatch      the server's certificate does not name the address we dialled
    │   ├── ClientCertificateExpired
    │   └── ClientCertificateRejected   the server does not trust our client certificate
    ├── PermissionDenied            etcd refused the user (no permission on the key)
    │   └── UnknownUser             etcd knows no user of the client certificate's name
    ├── RevisionCompacted(revision) a watch asked for history that etcd compacted: list again
    ├── LeaseLost(lease)            the lease expired or was revoked; its keys are gone
    └── StoreClosed                 our own code closed the store; never retried

Like trio's Closed/Broken split: StoreClosed is the caller's doing, BackendUnavailable is the world's.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BadTLSFiles",
    "ClientCertificateExpired",
    "ClientCertificateRejected",
    "EndpointUnreachable",
    "KVStoreError",
    "LeaseLost",
    "NameNotResolved",
    "UnknownUser",
    "PermissionDenied",
    "PlaintextEndpoint",
    "RevisionCompacted",
    "ServerCertificateExpired",
    "ServerNameMismatch",
    "StoreClosed",
    "TLSSetupError",
    "UnknownAuthority",
]


class KVStoreError(Exception):
    """Base of every kvstore error."""

    #: A short, stable name for metrics labels and status output.
    reason: str = "error"


class BackendUnavailable(KVStoreError):
    reason = "unavailable"


class EndpointUnreachable(BackendUnavailable):
    reason = "unreachable"


class NameNotResolved(EndpointUnreachable):
    reason = "dns"


class TLSSetupError(KVStoreError):
    reason = "tls"


class BadTLSFiles(TLSSetupError):
    reason = "bad-tls-files"


class PlaintextEndpoint(TLSSetupError):
    reason = "plaintext"


class UnknownAuthority(TLSSetupError):
    reason = "unknown-authority"


class ServerCertificateExpired(TLSSetupError):
    reason = "server-certificate-expired"


class ServerNameMismatch(TLSSetupError):
    reason = "server-name-mismatch"


class ClientCertificateExpired(TLSSetupError):
    reason = "client-certificate-expired"


class ClientCertificateRejected(TLSSetupError):
    reason = "client-certificate-rejected"


class PermissionDenied(KVStoreError):
    reason = "permission-denied"


class UnknownUser(PermissionDenied):
    reason = "unknown-user"


class RevisionCompacted(KVStoreError):
    reason = "compacted"

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted: history before {revision} is gone")
        self.revision = revision


class LeaseLost(KVStoreError):
    reason = "lease-lost"

    def __init__(self, lease: int) -> None:
        super().__init__(f"lease {lease:x} expired or was revoked")
        self.lease = lease


class StoreClosed(KVStoreError):
    reason = "closed"
