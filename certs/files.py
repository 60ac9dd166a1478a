"""Writing and reading certificates and keys as PEM files.

Files are replaced atomically (write a temporary file in the same folder, fsync, rename), so a process that reloads
its certificates when they change never reads half a file. Private keys are created with mode 0600 from the start:
there is no moment when a key is readable by others.

Layout of a cluster's PKI folder (what `clustermesh certs create` writes):

    ca.crt  ca.key                       the cluster's CA
    server.crt  server.key               etcd's serving certificate
    <user>.crt  <user>.key               client certificates, one per etcd user (CN = user)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.authority import Issued

__all__ = ["CertPaths", "load_certificates", "load_issued", "write_atomic", "write_issued"]

CERT_MODE = 0o644
KEY_MODE = 0o600


@dataclass(frozen=True)
class CertPaths:
    """Where one certificate and its key live on disk."""

    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str) -> CertPaths:
        return cls(cert=directory / f"{name}.crt", key=directory / f"{name}.key")


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace `path` with `data` in one rename; the file has `mode` from its first byte on. A file that exists
    keeps its owner and mode (a rotation must not lock out the process that reads it, e.g. etcd as user etcd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing: os.stat_result | None = path.stat()
    except FileNotFoundError:
        existing = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if existing is not None:
            os.fchmod(fd, existing.st_mode & 0o7777)
            if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, existing.st_uid, existing.st_gid)
        else:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_issued(issued: Issued, paths: CertPaths) -> None:
    """Write a certificate (0644) and its key (0600). The key goes first, so a reader never sees a new certificate
    next to an old key for longer than one rename."""
    write_atomic(paths.key, key_pem(issued.key), mode=KEY_MODE)
    write_atomic(paths.cert, certificate_pem(issued.certificate), mode=CERT_MODE)


def load_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM file (a CA bundle holds several)."""
    return x509.load_pem_x509_certificates(path.read_bytes())


def load_issued(paths: CertPaths) -> Issued:
    """Load a certificate and its (unencrypted, EC) private key, e.g. a CA to issue more certificates with."""
    certificate = load_certificates(paths.cert)[0]
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths.key}: expected an EC private key, found {type(key).__name__}")
    return Issued(certificate, key)
