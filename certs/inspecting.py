"""Describing certificates for people: subject, issuer, SANs, validity, and what is wrong with them.

Used by `clustermesh certs show` and by the kvstore's connect checks, which turn "the handshake failed" into
"your client certificate expired on <date>".
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["CertificateInfo", "describe", "validity_problem"]


@dataclass(frozen=True)
class CertificateInfo:
    """What a person wants to know about one certificate."""

    subject: str
    common_name: str
    issuer: str
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)

    @property
    def sans(self) -> list[str]:
        return [*self.dns_names, *self.ip_addresses]

    def status(self, now: datetime.datetime | None = None) -> str:
        problem = validity_problem(self.not_before, self.not_after, now)
        return problem or "valid"


def _common_name(name: x509.Name) -> str:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else ""


def describe(certificate: x509.Certificate) -> CertificateInfo:
    dns_names: list[str] = []
    ips: list[str] = []
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        dns_names = list(sans.get_values_for_type(x509.DNSName))
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        common_name=_common_name(certificate.subject),
        issuer=certificate.issuer.rfc4514_string(),
        serial=format(certificate.serial_number, "x"),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        is_ca=is_ca,
        dns_names=dns_names,
        ip_addresses=ips,
    )


def validity_problem(
    not_before: datetime.datetime, not_after: datetime.datetime, now: datetime.datetime | None = None
) -> str | None:
    """`None` if the period covers `now`, else a sentence saying since or until when it is invalid."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > not_after:
        return f"expired on {not_after.isoformat()}"
    if now < not_before:
        return f"not valid before {not_before.isoformat()}"
    return None
