"""The node's WireGuard key pair: made once with `cryptography` (X25519), kept in the agent's state folder.

The private key never leaves the node (mode 0600, written atomically); the public key is published in the node's
CiliumNode (annotation `network.cilium.io/wg-pub-key`), from where every other node of the mesh reads it.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from certs.files import write_atomic

__all__ = ["KeyPair", "load_or_create"]


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


def load_or_create(path: Path) -> KeyPair:
    """The key pair in `path` (the private key, base64, as `wg` reads it); made and saved if absent."""
    if path.exists():
        raw = base64.b64decode(path.read_text().strip())
        return KeyPair(x25519.X25519PrivateKey.from_private_bytes(raw))
    pair = KeyPair(x25519.X25519PrivateKey.generate())
    write_atomic(path, (pair.private_base64 + "\n").encode(), mode=0o600)
    return pair
