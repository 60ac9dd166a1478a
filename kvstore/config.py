"""How to reach one etcd: endpoints and the three TLS files, in memory and in Cilium's config-file format.

Cilium's agents read one YAML file per remote cluster:

    endpoints:
    - https://10.0.0.1:2379
    trusted-ca-file: /var/lib/cilium/clustermesh/c2.etcd-client-ca.crt
    cert-file: /var/lib/cilium/clustermesh/c2.etcd-client.crt
    key-file: /var/lib/cilium/clustermesh/c2.etcd-client.key

`load_config_file` reads that format; relative paths are taken from the file's folder. Plaintext endpoints are
refused here, before anything dials: etcd is always mTLS in the mesh (DESIGN section 5).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from kvstore import errors

__all__ = ["Endpoint", "EtcdConfig", "load_config_file", "parse_endpoint"]

DEFAULT_PORT = 2379


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        """`host:port` as gRPC wants it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"https://{self.address}"


def parse_endpoint(url: str) -> Endpoint:
    """Parse `https://host:port`; a plaintext `http://` URL is refused with the reason."""
    text = url.strip()
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    if parts.scheme == "http":
        raise errors.PlaintextEndpoint(
            f"endpoint {url!r} is plaintext http: etcd in the mesh is always reached over mTLS; use https://"
        )
    if parts.scheme != "https":
        raise errors.BadTLSFiles(f"endpoint {url!r}: unsupported scheme {parts.scheme!r}; use https://host:port")
    if not parts.hostname:
        raise errors.BadTLSFiles(f"endpoint {url!r} names no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise errors.BadTLSFiles(f"endpoint {url!r}: {exc}") from exc
    return Endpoint(parts.hostname, port)


@dataclass(frozen=True)
class EtcdConfig:
    """Everything needed to open an mTLS connection to one etcd cluster."""

    endpoints: list[str]
    ca_file: Path
    cert_file: Path
    key_file: Path
    #: The name to check the server's certificate against, when it is not the endpoint's host.
    server_name: str | None = None
    #: Seconds to wait for a TCP and TLS handshake before calling the endpoint unreachable.
    dial_timeout: float = 5.0
    parsed: list[Endpoint] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise errors.BadTLSFiles("no etcd endpoints given")
        object.__setattr__(self, "parsed", [parse_endpoint(url) for url in self.endpoints])

    def describe(self) -> str:
        return ", ".join(str(endpoint) for endpoint in self.parsed)


def load_config_file(path: Path) -> EtcdConfig:
    """Read an etcd client config in Cilium's YAML format; errors name the file and the field."""
    try:
        data = yaml.safe_load(path.read_bytes().decode())
    except OSError as exc:
        raise errors.BadTLSFiles(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise errors.BadTLSFiles(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise errors.BadTLSFiles(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise errors.BadTLSFiles(f"{path}: expected a mapping with endpoints, trusted-ca-file, cert-file, key-file")
    endpoints = data.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
        raise errors.BadTLSFiles(f"{path}: 'endpoints' must be a non-empty list of https:// URLs")
    files: dict[str, Path] = {}
    for name in ("trusted-ca-file", "cert-file", "key-file"):
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise errors.BadTLSFiles(f"{path}: '{name}' is missing: etcd in the mesh needs mTLS")
        file = Path(value)
        files[name] = file if file.is_absolute() else path.parent / file
    server_name = data.get("tls-server-name")
    return EtcdConfig(
        endpoints=endpoints,
        ca_file=files["trusted-ca-file"],
        cert_file=files["cert-file"],
        key_file=files["key-file"],
        server_name=server_name if isinstance(server_name, str) else None,
    )
