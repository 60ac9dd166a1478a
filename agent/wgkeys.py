"""The node's WireGuard key pair: made once with `cryptography` (X25519), kept in the agent's state folder.

The private key never leaves the node (mode 0600, written atomically); the public key is published in the node's
CiliumNode (annotation `network.cilium.io/wg-pub-key`), from where every other node of the mesh reads it.

A key file that is not a key (truncated by a full disk, edited by hand) is set aside as `<name>.corrupt-<time>`,
said in the log, and a new pair is made: the node publishes the new public key and its peers follow, where
stopping the agent would cut the node off the mesh until someone repairs the file by hand.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from certs.files import write_atomic

__all__ = ["KeyPair", "load", "load_or_create"]

log = logging.getLogger(__name__)


class KeyPair:
    def __init__(self, private: x25519.X25519PrivateKey) -> None:
        self._private = private

    @property
    def private_base64(self) -> str:
        raw = self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw).decode()

    @property
    def public_base64(self) -> str:
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()


def load(path: Path) -> KeyPair:
    """The key pair in `path`; `ValueError` saying what is wrong with a file that does not hold one."""
    try:
        text = path.read_bytes().decode("ascii").strip()
        raw = base64.b64decode(text, validate=True)
    except (UnicodeDecodeError, binascii.Error) as exc:
        raise ValueError(f"{path} is not a base64 WireGuard key ({exc})") from None
    if len(raw) != 32:
        raise ValueError(f"{path} holds {len(raw)} bytes; a WireGuard private key has 32")
    return KeyPair(x25519.X25519PrivateKey.from_private_bytes(raw))


def load_or_create(path: Path) -> KeyPair:
    """The key pair in `path` (the private key, base64, as `wg` reads it); made and saved if absent or corrupt."""
    if path.exists():
        try:
            return load(path)
        except ValueError as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            path.rename(aside)
            log.error("%s: set aside as %s; a new key pair is made (peers follow its published key)", exc, aside)
    pair = KeyPair(x25519.X25519PrivateKey.generate())
    write_atomic(path, (pair.private_base64 + "\n").encode(), mode=0o600)
    return pair
