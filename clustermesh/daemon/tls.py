"""TLS for the daemons' TCP APIs between hosts (the agents' flow service, the relay): mutual, with the mesh's CA.

Both sides trust only the CA files they are given (never the system's store), and a server asks every client for a
certificate of that CA: the flow service tells what every pod of a node talks to, so nobody else may read it.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ReloadingContext",
    "ServerTlsFiles",
    "TlsFilesError",
    "client_context",
    "hubble_server_name",
    "server_context",
]

log = logging.getLogger(__name__)


class TlsFilesError(ValueError):
    """The certificate, key or CA files cannot be used (missing, unreadable, or not a pair)."""


def _load(context: ssl.SSLContext, cert: Path, key: Path, cas: list[Path]) -> ssl.SSLContext:
    try:
        for ca in cas:
            context.load_verify_locations(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise TlsFilesError(f"the TLS files do not fit together ({exc.reason}): does {key} belong to {cert}?") from exc
    except OSError as exc:
        raise TlsFilesError(f"cannot load the TLS files: {exc.strerror or exc}: {exc.filename or ''}") from exc
    return context


def server_context(cert: Path, key: Path, client_cas: list[Path]) -> ssl.SSLContext:
    """A server that refuses any client without a certificate of `client_cas`."""
    if not client_cas:
        raise TlsFilesError("a TLS server of the mesh needs the CA of its clients (mutual TLS)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    return _load(context, cert, key, client_cas)


def client_context(cert: Path, key: Path, server_cas: list[Path]) -> ssl.SSLContext:
    """A client that presents its certificate and checks the server's name against `server_cas`."""
    if not server_cas:
        raise TlsFilesError("a TLS client of the mesh needs the CA of its servers")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return _load(context, cert, key, server_cas)


def hubble_server_name(cluster: str, node: str) -> str:
    """The name a node's flow service certificate carries, as Hubble's peer service names it:
    `<node>.<cluster>.hubble-grpc.cilium.io`, dots in either name turned into hyphens."""
    return f"{node.replace('.', '-')}.{cluster.replace('.', '-')}.hubble-grpc.cilium.io"


class ReloadingContext:
    """A TLS context that follows its files: rotated certificates (or a new CA bundle) are taken up by the next
    connection, no restart. The files are looked at no more than once a `period`; a set of files that does not load
    (caught half-written, or wrong) keeps the last good context and is logged."""

    def __init__(self, build: Callable[[], ssl.SSLContext], files: list[Path], *, period: float = 1.0) -> None:
        self.build = build
        self.files = files
        self.period = period
        self.context = build()
        self.fingerprint = self._fingerprint()
        self.reloads = 0
        self._checked = time.monotonic()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"missing")
        return digest.hexdigest()

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < self.period:
            return self.context
        self._checked = now
        fingerprint = self._fingerprint()
        if fingerprint != self.fingerprint:
            self.fingerprint = fingerprint  # a broken set is told once, and tried again when it changes
            try:
                self.context = self.build()
            except TlsFilesError as exc:
                log.warning("TLS files changed but do not load (the last good ones stay in use): %s", exc)
                return self.context
            self.reloads += 1
            log.info("TLS files changed: new connections use them (%s)", ", ".join(str(p) for p in self.files))
        return self.context

    def changed(self) -> bool:
        """True once when the context was rebuilt since the last call (a server restarts its listener then)."""
        before = self.reloads
        self.current()
        return self.reloads != before


class ServerTlsFiles:
    """A server's TLS context that stays one object (its listener holds it) while its files rotate: `refresh()`
    loads changed files into it, so the next connection presents the new certificate and trusts the CAs added (a
    bundle of old and new rolls a CA; a CA taken out of the bundle is still trusted until a restart, as OpenSSL only
    adds to a context's store)."""

    def __init__(self, cert: Path, key: Path, client_cas: list[Path]) -> None:
        self.cert, self.key, self.client_cas = cert, key, client_cas
        self.context = server_context(cert, key, client_cas)
        self.watch = ReloadingContext(lambda: server_context(cert, key, client_cas), [cert, key, *client_cas],
                                      period=0)  # fmt: skip

    def refresh(self) -> bool:
        """Load the files into the context if they changed and load (checked on a scratch context first)."""
        if not self.watch.changed():
            return False
        try:
            for ca in self.client_cas:
                self.context.load_verify_locations(cafile=str(ca))
            self.context.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as exc:  # cannot happen after the scratch load, but a file may move again
            log.warning("TLS files changed but could not be loaded: %s", exc)
            return False
        return True
