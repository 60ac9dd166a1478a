"""Issuing certificates: a cluster's CA, etcd server certificates and client certificates.

Everything in the mesh speaks mTLS to etcd, and etcd maps a client certificate's common name (CN) to the etcd user
that the request runs as. So the CN of a client certificate *is* its identity: `root`, `admin-<cluster>`,
`agent-<cluster>`, `remote-<peer>` (see DESIGN section 5). This module only makes certificates in memory; writing
them to disk is `certs.files`, reading them back for display is `certs.inspecting`.

Keys are ECDSA P-256: fast to generate (a whole lab's PKI in milliseconds) and accepted by etcd and strongSwan.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "create_ca", "issue_client", "issue_server"]

DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key."""

    certificate: x509.Certificate
    key: PrivateKey

    @property
    def common_name(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _validity(
    builder: x509.CertificateBuilder, days: int, not_before: datetime.datetime | None
) -> x509.CertificateBuilder:
    # Backdate by a minute so that a certificate is valid at once on a host whose clock is slightly behind.
    start = not_before if not_before is not None else _now() - datetime.timedelta(minutes=1)
    return builder.not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))


def create_ca(common_name: str, *, days: int = DEFAULT_CA_DAYS, not_before: datetime.datetime | None = None) -> Issued:
    """Create a self-signed CA for one cluster (`common_name` is usually `<cluster>-ca`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    builder = _validity(builder, days, not_before)
    return Issued(builder.sign(key, hashes.SHA256()), key)


def _leaf(
    ca: Issued,
    common_name: str,
    *,
    usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
    days: int,
    not_before: datetime.datetime | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    builder = _validity(builder, days, not_before)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def issue_server(
    ca: Issued,
    common_name: str,
    *,
    hosts: list[str],
    days: int = DEFAULT_LEAF_DAYS,
    not_before: datetime.datetime | None = None,
) -> Issued:
    """Issue a certificate for a TLS server reachable under `hosts` (IP addresses and DNS names).

    It is also valid as a client certificate, because etcd peers and some tools use one certificate for both.
    """
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    return _leaf(
        ca,
        common_name,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[_san(host) for host in hosts],
        days=days,
        not_before=not_before,
    )


def issue_client(
    ca: Issued,
    common_name: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: datetime.datetime | None = None,
) -> Issued:
    """Issue a client certificate; etcd runs its requests as the user named `common_name`."""
    if not common_name:
        raise ValueError("a client certificate needs a common name: it is the etcd user")
    return _leaf(
        ca,
        common_name,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[],
        days=days,
        not_before=not_before,
    )
