"""Checking an etcd endpoint's TLS before gRPC dials it, to say precisely what is wrong.

gRPC reports every TLS failure as one `UNAVAILABLE` with an OpenSSL string in it. Python's `ssl` module, given the
same files, tells the cases apart: our CA did not sign the server's certificate, the server's certificate expired or
names another host, the server refused our client certificate, the endpoint speaks no TLS, nothing listens. So the
kvstore checks the files locally, then does one handshake per endpoint with `ssl`, and only then opens the gRPC
channel. Each failure becomes one of the `kvstore.errors.TLSSetupError` types, with a message that says what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from kvstore import errors
from kvstore.config import Endpoint, EtcdConfig

__all__ = ["TLSMaterial", "load_material", "probe_endpoint"]

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

# OpenSSL verify codes (x509_vfy.h) that `ssl.SSLCertVerificationError.verify_code` carries.
_EXPIRED = 10
_NOT_YET_VALID = 9
_NAME_MISMATCHES = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}

# TLS alerts the server sends when it does not accept our client certificate.
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_DECRYPT_ERROR",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}


@dataclass(frozen=True)
class TLSMaterial:
    """The PEM bytes of the three TLS files, read once per connection attempt (so a rotation is picked up)."""

    ca: bytes
    cert: bytes
    key: bytes
    client_not_after: datetime.datetime
    client_common_name: str

    @property
    def fingerprint(self) -> bytes:
        """Changes with any of the three files: a rotation to take up."""
        return hashlib.sha256(b"\0".join((self.ca, self.cert, self.key))).digest()


def files_unchanged(config: EtcdConfig, material: TLSMaterial) -> bool:
    """The three files still hold what `material` was read from (a cheap test, made often)."""
    try:
        return (
            config.cert_file.read_bytes() == material.cert
            and config.key_file.read_bytes() == material.key
            and config.ca_file.read_bytes() == material.ca
        )
    except OSError:
        return False  # gone or unreadable: load_material says which


def load_material(config: EtcdConfig, *, now: datetime.datetime | None = None) -> TLSMaterial:
    """Read and check the CA, certificate and key files; raise `BadTLSFiles` or `ClientCertificateExpired`."""
    contents: dict[str, bytes] = {}
    for label, path in (("CA", config.ca_file), ("client certificate", config.cert_file), ("key", config.key_file)):
        try:
            contents[label] = path.read_bytes()
        except OSError as exc:
            raise errors.BadTLSFiles(f"cannot read the {label} file {path}: {exc.strerror}") from exc
    try:
        x509.load_pem_x509_certificates(contents["CA"])
    except ValueError as exc:
        raise errors.BadTLSFiles(f"{config.ca_file} holds no PEM certificate: is it the CA file?") from exc
    try:
        client = x509.load_pem_x509_certificates(contents["client certificate"])[0]
    except ValueError as exc:
        raise errors.BadTLSFiles(f"{config.cert_file} holds no PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(contents["key"], password=None)
    except (ValueError, TypeError) as exc:
        raise errors.BadTLSFiles(f"{config.key_file} holds no unencrypted PEM private key") from exc
    if key.public_key().public_bytes(*_SPKI) != client.public_key().public_bytes(*_SPKI):
        raise errors.BadTLSFiles(
            f"{config.key_file} is not the key of {config.cert_file} (half-written rotation, or mixed-up files)"
        )
    names = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > client.not_valid_after_utc or now < client.not_valid_before_utc:
        when = (
            f"expired on {client.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
            if now > client.not_valid_after_utc
            else f"is not valid before {client.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
        raise errors.ClientCertificateExpired(
            f"the client certificate {config.cert_file} (CN={common_name}) {when}: issue a new one "
            "(clustermesh certs issue, or clustermesh connect for remote users)"
        )
    return TLSMaterial(
        ca=contents["CA"],
        cert=contents["client certificate"],
        key=contents["key"],
        client_not_after=client.not_valid_after_utc,
        client_common_name=common_name,
    )


def _context(config: EtcdConfig) -> ssl.SSLContext:
    # Only the cluster's CA is trusted (not the system's, which create_default_context would load, slowly).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(config.ca_file))
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    except ssl.SSLError as exc:
        raise errors.BadTLSFiles(
            f"the TLS files do not fit together ({exc.reason}): does {config.key_file} belong to {config.cert_file}?"
        ) from exc
    except OSError as exc:
        raise errors.BadTLSFiles(f"cannot load the TLS files: {exc}") from exc
    context.set_alpn_protocols(["h2"])
    return context


async def probe_endpoint(config: EtcdConfig, endpoint: Endpoint) -> None:
    """One TLS handshake (and one read, for TLS 1.3's late client-certificate verdict) against `endpoint`."""
    context = _context(config)
    server_name = config.server_name or endpoint.host
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, ssl=context, server_hostname=server_name),
            timeout=config.dial_timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        raise _verification_error(config, endpoint, server_name, exc) from exc
    except ssl.SSLError as exc:
        raise _alert_error(config, endpoint, exc) from exc
    except socket.gaierror as exc:
        raise errors.NameNotResolved(f"cannot resolve etcd endpoint {endpoint}: {exc.strerror}") from exc
    except (TimeoutError, OSError) as exc:
        raise errors.EndpointUnreachable(f"etcd at {endpoint} is unreachable: {_os_reason(exc)}") from exc
    try:
        # With TLS 1.3 the server judges our certificate after our side of the handshake is done; its verdict (an
        # alert) arrives with the first read. A healthy etcd sends its HTTP/2 settings at once.
        await asyncio.wait_for(reader.read(1), timeout=min(config.dial_timeout, 2.0))
    except ssl.SSLError as exc:
        raise _alert_error(config, endpoint, exc) from exc
    except TimeoutError:
        pass
    except OSError as exc:
        raise errors.EndpointUnreachable(f"etcd at {endpoint} closed the connection: {_os_reason(exc)}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed connection: what a person can act on."""
    if isinstance(exc, TimeoutError):
        return "timed out (no answer: a firewall, or no route that way?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is etcd running there?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError):  # asyncio's "Multiple exceptions: [Errno 113] ..." of several addresses
        return str(exc).lower() or type(exc).__name__
    return str(exc) or type(exc).__name__


def _verification_error(
    config: EtcdConfig, endpoint: Endpoint, server_name: str, exc: ssl.SSLCertVerificationError
) -> errors.TLSSetupError:
    code = exc.verify_code
    if code in (_EXPIRED, _NOT_YET_VALID):
        return errors.ServerCertificateExpired(
            f"etcd at {endpoint} presents a certificate that is {exc.verify_message}: renew the server certificate"
        )
    if code in _NAME_MISMATCHES:
        return errors.ServerNameMismatch(
            f"etcd at {endpoint} presents a certificate that does not name {server_name!r}: add it to the server "
            "certificate's SANs, or dial a name the certificate carries"
        )
    if code in _UNKNOWN_ISSUER:
        return errors.UnknownAuthority(
            f"etcd at {endpoint} presents a certificate that {config.ca_file} did not sign ({exc.verify_message}): "
            "the CA file is the wrong one for this cluster, or the cluster's CA changed"
        )
    return errors.UnknownAuthority(f"etcd at {endpoint}: the server certificate is not trusted: {exc.verify_message}")


def _alert_error(config: EtcdConfig, endpoint: Endpoint, exc: ssl.SSLError) -> errors.KVStoreError:
    reason = exc.reason or ""
    if reason in _CLIENT_CERT_ALERTS:
        return errors.ClientCertificateRejected(
            f"etcd at {endpoint} rejected the client certificate {config.cert_file} ({reason.lower()}): it is not "
            "signed by a CA that this etcd trusts, or it has expired"
        )
    if reason in _NOT_TLS:
        return errors.PlaintextEndpoint(
            f"{endpoint} does not speak TLS ({reason.lower()}): is it a plaintext etcd? the mesh needs mTLS"
        )
    return errors.EndpointUnreachable(f"TLS with etcd at {endpoint} failed: {reason or exc}")
