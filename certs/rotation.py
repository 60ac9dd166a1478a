"""Rotating certificates in place: reissue the leaves of a CA, roll a new CA in through a bundle, retire the old one.

A process of the mesh that reads certificate files picks up new contents on its own (etcd clients, the flow
service, the relay, charon), so rotation is only about writing the right files in the right order:

1. ``rotate`` (no CA change): every leaf certificate issued by the folders' CA is issued again with the same subject,
   names and usages, a new key and a fresh validity, and replaces the old one atomically (key first).
2. ``add_ca``: a new CA is made; every trust file holding the current CA gets it as well (new first, then old:
   a bundle), and the CA's own files (``ca.crt``, ``ca.key``) now issue with the new key. Leaves are not touched:
   first every process must trust the new CA, only then may peers present certificates of it.
3. ``rotate`` again issues every leaf from the new CA (a leaf of the old CA is moved to the new one).
4. ``drop_old_cas``: the trust files keep only the issuing CA; refused while a leaf still chains to an old one.

Which files are which is read from their contents, not their names: a file of CA certificates only is a trust file,
a file whose first certificate is a leaf issued by a CA of the bundle (and which has a ``.key`` next to it) is a leaf.
Files of other CAs are left alone. Imports nothing of the project's.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs import authority, files

__all__ = [
    "Authority",
    "RotationError",
    "RotationReport",
    "add_ca",
    "drop_old_cas",
    "find_authorities",
    "rotate",
]

PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


class RotationError(Exception):
    """A rotation that would lock someone out, or files that cannot be rotated."""


@dataclass(frozen=True)
class Authority:
    """The CA files of one folder: `ca.crt` (the issuing CA first, then older ones still trusted) and `ca.key`."""

    paths: files.CertPaths

    def load(self) -> tuple[authority.Issued, list[x509.Certificate]]:
        """(the issuing CA with its key, every CA of the bundle)."""
        bundle = files.load_certificates(self.paths.cert)
        issuer = files.load_issued(self.paths)
        if not _same_key(bundle[0], issuer.key):
            raise RotationError(f"{self.paths.key} is not the key of the first CA in {self.paths.cert}")
        return issuer, bundle


@dataclass
class RotationReport:
    """What a rotation wrote (paths) and what it left alone, with the reason."""

    reissued: list[Path] = field(default_factory=list)
    trust_files: list[Path] = field(default_factory=list)
    authorities: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _same_key(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return certificate.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def _fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    if leaf.issuer != ca.subject:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def find_authorities(folders: Iterable[Path]) -> list[Authority]:
    """The `ca.crt`/`ca.key` pairs in the folders and below them (a `ca.crt` without its key only trusts)."""
    found = []
    for cert in _certificate_files(folders):
        if cert.name == "ca.crt" and cert.with_suffix(".key").is_file():
            found.append(Authority(files.CertPaths(cert, cert.with_suffix(".key"))))
    return found


def _certificate_files(folders: Iterable[Path]) -> list[Path]:
    seen: dict[Path, None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.crt")):
            seen.setdefault(path.resolve(), None)
    return list(seen)


def _read(path: Path) -> list[x509.Certificate] | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if PEM_BEGIN not in data:
        return None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return None


def _issuing(folders: list[Path]) -> tuple[list[Authority], authority.Issued, list[x509.Certificate]]:
    authorities = find_authorities(folders)
    if not authorities:
        raise RotationError(
            "none of " + ", ".join(str(f) for f in folders) + " holds a CA (ca.crt and ca.key): nothing can issue"
        )
    issuer, bundle = authorities[0].load()
    for other in authorities[1:]:
        other_issuer, _ = other.load()
        if _fingerprint(other_issuer.certificate) != _fingerprint(issuer.certificate):
            raise RotationError(
                f"{other.paths.cert} and {authorities[0].paths.cert} issue from different CAs: rotate them apart"
            )
    return authorities, issuer, bundle


def reissue(leaf: x509.Certificate, ca: authority.Issued, *, days: int | None = None) -> authority.Issued:
    """The same certificate (subject, names, usages, validity length) from `ca`, with a new key and serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    length = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    if days is not None:
        length = datetime.timedelta(days=days)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + length)
    )
    for extension in leaf.extensions:
        if isinstance(extension.value, x509.AuthorityKeyIdentifier | x509.SubjectKeyIdentifier):
            continue  # they name keys: made anew below
        builder = builder.add_extension(extension.value, critical=extension.critical)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
    )
    return authority.Issued(builder.sign(ca.key, hashes.SHA256()), key)


def rotate(folders: list[Path], *, days: int | None = None) -> RotationReport:
    """Issue every leaf of the folders' CA bundle again, from the issuing CA (step 1, or step 3 of a CA roll)."""
    _, issuer, bundle = _issuing(folders)
    report = RotationReport()
    for path in _certificate_files(folders):
        found = _read(path)
        if not found or _is_ca(found[0]):
            continue
        leaf = found[0]
        if not any(_issued_by(leaf, ca) for ca in bundle):
            report.skipped.append((path, f"issued by {leaf.issuer.rfc4514_string()}, not by this CA"))
            continue
        key_path = path.with_suffix(".key")
        if not key_path.is_file():
            report.skipped.append((path, f"no key next to it ({key_path.name})"))
            continue
        files.write_issued(reissue(leaf, issuer, days=days), files.CertPaths(path, key_path))
        report.reissued.append(path)
    return report


def _bundle_pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(files.certificate_pem(c) for c in certificates)


def _trust_files(folders: list[Path], known: set[bytes]) -> list[tuple[Path, list[x509.Certificate]]]:
    """Files of CA certificates only, holding at least one CA of `known`."""
    found = []
    for path in _certificate_files(folders):
        certificates = _read(path)
        if not certificates or not all(_is_ca(c) for c in certificates):
            continue
        if any(_fingerprint(c) in known for c in certificates):
            found.append((path, certificates))
    return found


def add_ca(
    folders: list[Path], *, common_name: str | None = None, days: int = authority.DEFAULT_CA_DAYS
) -> RotationReport:
    """Make a new CA that issues from now on; every trust file of the current CA trusts both (step 2)."""
    authorities, issuer, bundle = _issuing(folders)
    name = common_name or _next_name(issuer.certificate)
    new = authority.create_ca(name, days=days)
    report = RotationReport()
    known = {_fingerprint(c) for c in bundle}
    authority_files = {a.paths.cert.resolve() for a in authorities}
    for path, certificates in _trust_files(folders, known):
        if path in authority_files:
            continue
        files.write_atomic(path, _bundle_pem([new.certificate, *certificates]), mode=files.CERT_MODE)
        report.trust_files.append(path)
    for found in authorities:
        # the key first, then the bundle: between the two renames a reader may see the new key beside the old
        # certificate (readers check that a key is its certificate's: `certs rotate` refuses, etcd clients wait)
        files.write_atomic(found.paths.key, files.key_pem(new.key), mode=files.KEY_MODE)
        files.write_atomic(found.paths.cert, _bundle_pem([new.certificate, *bundle]), mode=files.CERT_MODE)
        report.authorities.append(found.paths.cert)
    return report


def _next_name(ca: x509.Certificate) -> str:
    names = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    base = str(names[0].value) if names else "clustermesh-ca"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    head, _, tail = base.rpartition("-r")
    if head and tail.isdigit() and len(tail) == len(stamp):
        base = head
    return f"{base}-r{stamp}"


def drop_old_cas(folders: list[Path]) -> RotationReport:
    """Trust files keep only the issuing CA (step 4); refused while a leaf in the folders chains to an old one."""
    authorities, issuer, bundle = _issuing(folders)
    old = [c for c in bundle if _fingerprint(c) != _fingerprint(issuer.certificate)]
    if not old:
        raise RotationError("the bundle holds one CA only: there is no old CA to drop")
    still_old = []
    for path in _certificate_files(folders):
        found = _read(path)
        if found and not _is_ca(found[0]) and any(_issued_by(found[0], ca) for ca in old):
            still_old.append(path)
    if still_old:
        raise RotationError(
            f"{len(still_old)} certificate(s) still chain to the old CA ({', '.join(str(p) for p in still_old[:3])}"
            + (", ..." if len(still_old) > 3 else "")
            + "): issue them from the new CA first (clustermesh certs rotate without --new-ca)"
        )
    report = RotationReport()
    old_prints = {_fingerprint(c) for c in old}
    for path, certificates in _trust_files(folders, old_prints | {_fingerprint(issuer.certificate)}):
        kept = [c for c in certificates if _fingerprint(c) not in old_prints]
        if len(kept) == len(certificates):
            continue
        if not kept:
            report.skipped.append((path, "holds only old CAs: left as it is (delete it if nothing reads it)"))
            continue
        files.write_atomic(path, _bundle_pem(kept), mode=files.CERT_MODE)
        (report.authorities if any(path == a.paths.cert.resolve() for a in authorities) else report.trust_files).append(
            path
        )
    return report
