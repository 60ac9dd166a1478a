"""The values stored under `cilium/`, as msgspec Structs that encode byte for byte like Cilium's Go JSON.

Go's `encoding/json` rules that the Structs below reproduce:

- struct fields in declaration order, map keys sorted bytewise, compact output;
- `net.IP` as text (`""` when unset); `net.IPMask` and `[]byte` as base64; nil maps and slices as `null`,
  empty ones as `{}` / `[]`; `omitempty` fields left out when empty (here: `msgspec.UNSET`);
- `<`, `>`, `&`, U+2028 and U+2029 escaped inside strings (`encode` does it).

Decoding checks types and ranges (uint8, uint16, uint32) and the IP syntax of IP fields; whatever fails becomes one
`InvalidValue(key, reason)`. Decoding a value that Cilium wrote and encoding it again gives the same bytes.
Checks that need context (does this node belong to the cluster it came from?) are in `clustermesh.model.validation`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from clustermesh.model import keys
from clustermesh.model.addresses import ip_version
from clustermesh.model.errors import InvalidValue

__all__ = [
    "Address",
    "BackendZone",
    "ClusterConfig",
    "ClusterConfigCapabilities",
    "ClusterService",
    "ForZone",
    "IPIdentityPair",
    "IPNet",
    "L4Addr",
    "NamedPort",
    "Node",
    "decode",
    "decoder_for",
    "encode",
    "ip_net",
    "make_ip_pair",
]

UInt8 = Annotated[int, Meta(ge=0, le=0xFF)]
UInt16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
UInt32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]


def _check_ip(value: str, what: str, *, allow_empty: bool = True) -> None:
    if not value and allow_empty:
        return
    if not ip_version(value):
        raise ValueError(f"{what} {value!r} is not an IP address")


# --- Node: cilium/state/nodes/v1/<cluster>/<name>


class Address(Struct, frozen=True):
    Type: str
    IP: str

    def __post_init__(self) -> None:
        _check_ip(self.IP, "address", allow_empty=False)


class IPNet(Struct, frozen=True):
    """Go's net.IPNet (Cilium's cidr.CIDR): the IP as text and the mask as its raw bytes."""

    IP: str
    Mask: bytes

    def __post_init__(self) -> None:
        _check_ip(self.IP, "CIDR address", allow_empty=False)
        if len(self.Mask) not in (4, 16):
            raise ValueError(f"CIDR mask has {len(self.Mask)} bytes; expected 4 or 16")

    @property
    def prefixlen(self) -> int:
        return sum(bin(byte).count("1") for byte in self.Mask)

    def __str__(self) -> str:
        return f"{self.IP}/{self.prefixlen}"

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(str(self), strict=False)


def ip_net(cidr: str) -> IPNet:
    """`10.244.0.0/24` -> IPNet as Go encodes it: the network address and a 4- or 16-byte mask."""
    network = ipaddress.ip_network(cidr, strict=False)
    return IPNet(IP=str(network.network_address), Mask=network.netmask.packed)


class Node(Struct, frozen=True, kw_only=True):
    """Cilium's types.Node: one node of a cluster, with its addresses, pod CIDRs and WireGuard key."""

    Name: str = ""
    Cluster: str = ""
    IPAddresses: list[Address] | None = None
    IPv4AllocCIDR: IPNet | None = None
    IPv4SecondaryAllocCIDRs: list[IPNet] | None = None
    IPv6AllocCIDR: IPNet | None = None
    IPv6SecondaryAllocCIDRs: list[IPNet] | None = None
    IPv4HealthIP: str = ""
    IPv6HealthIP: str = ""
    IPv4IngressIP: str = ""
    IPv6IngressIP: str = ""
    ClusterID: UInt32 = 0
    Source: str = ""
    EncryptionKey: UInt8 = 0
    Labels: dict[str, str] | None = None
    Annotations: dict[str, str] | None = None
    NodeIdentity: UInt32 = 0
    WireguardPubKey: str = ""
    BootID: str = ""

    def __post_init__(self) -> None:
        for what, value in (
            ("IPv4HealthIP", self.IPv4HealthIP),
            ("IPv6HealthIP", self.IPv6HealthIP),
            ("IPv4IngressIP", self.IPv4IngressIP),
            ("IPv6IngressIP", self.IPv6IngressIP),
        ):
            _check_ip(value, what)

    def key_name(self) -> str:
        """The key below `cilium/state/nodes/v1/`: `<cluster>/<name>` (STABLE API)."""
        return keys.node_key(self.Cluster, self.Name).removeprefix(f"{keys.NODES_PREFIX}/")

    def addresses_of(self, kind: str) -> list[str]:
        return [address.IP for address in self.IPAddresses or () if address.Type == kind]


# --- IPIdentityPair: cilium/state/ip/v1/default/<ip>


class NamedPort(Struct, frozen=True):
    Name: str
    Port: UInt16
    Protocol: str


class IPIdentityPair(Struct, frozen=True, kw_only=True):
    """Cilium's identity.IPIdentityPair: which identity an IP (or CIDR) has, and behind which node it lives."""

    IP: str
    Mask: bytes | None = None
    HostIP: str = ""
    ID: UInt32 = 0
    Key: UInt8 = 0
    Metadata: str = ""
    K8sNamespace: str | UnsetType = UNSET
    K8sPodName: str | UnsetType = UNSET
    K8sServiceAccount: str | UnsetType = UNSET
    NamedPorts: list[NamedPort] | UnsetType = UNSET

    def __post_init__(self) -> None:
        _check_ip(self.IP, "IP", allow_empty=False)
        _check_ip(self.HostIP, "HostIP")
        if self.Mask is not None and len(self.Mask) not in (4, 16):
            raise ValueError(f"Mask has {len(self.Mask)} bytes; expected 4 or 16")

    def key_name(self) -> str:
        """`<ip>` for a host entry, `<ip>/<prefix length>` for a CIDR entry (STABLE API)."""
        if self.Mask is None:
            return self.IP
        return keys.ip_key_name(self.IP, sum(bin(byte).count("1") for byte in self.Mask))

    @property
    def namespace(self) -> str:
        return self.K8sNamespace if isinstance(self.K8sNamespace, str) else ""

    @property
    def pod_name(self) -> str:
        return self.K8sPodName if isinstance(self.K8sPodName, str) else ""


def make_ip_pair(
    *,
    ip: str,
    host_ip: str,
    identity: int,
    encryption_key: int = 0,
    namespace: str = "",
    pod_name: str = "",
    service_account: str = "",
    named_ports: list[NamedPort] | None = None,
) -> IPIdentityPair:
    """An ipcache entry for an endpoint, with Go's omitempty applied to the optional fields."""
    return IPIdentityPair(
        IP=ip,
        HostIP=host_ip,
        ID=identity,
        Key=encryption_key,
        K8sNamespace=namespace or UNSET,
        K8sPodName=pod_name or UNSET,
        K8sServiceAccount=service_account or UNSET,
        NamedPorts=named_ports or UNSET,
    )


# --- ClusterService: cilium/state/services/v1/<cluster>/<namespace>/<name>


class L4Addr(Struct, frozen=True):
    Protocol: str
    Port: UInt16

    def __str__(self) -> str:
        return f"{self.Port}/{self.Protocol}"


#: port name ("" for an unnamed port) -> protocol and port
PortConfiguration = dict[str, L4Addr | None]


class ForZone(Struct, frozen=True):
    name: str


class BackendZone(Struct, frozen=True):
    zone: str
    forZones: list[ForZone] | None = None


class ClusterService(Struct, frozen=True, kw_only=True):
    """Cilium's ClusterService: a global service as one cluster exports it, with that cluster's backends."""

    cluster: str = ""
    namespace: str = ""
    name: str = ""
    frontends: dict[str, PortConfiguration] | None = field(default_factory=dict)
    backends: dict[str, PortConfiguration] | None = field(default_factory=dict)
    hostnames: dict[str, str] | UnsetType = UNSET
    zones: dict[str, BackendZone] | UnsetType = UNSET
    labels: dict[str, str] | None = field(default_factory=dict)
    selector: dict[str, str] | None = field(default_factory=dict)
    includeExternal: bool = False
    shared: bool = False
    clusterID: UInt32 = 0

    def __post_init__(self) -> None:
        for what, addresses in (("frontend", self.frontends), ("backend", self.backends)):
            for address in addresses or ():
                _check_ip(address, what, allow_empty=False)

    def key_name(self) -> str:
        """`<cluster>/<namespace>/<name>` (STABLE API)."""
        return f"{self.cluster}/{keys.service_key_name(self.namespace, self.name)}"


# --- cluster-config: cilium/cluster-config/<cluster>


class ClusterConfigCapabilities(Struct, frozen=True, kw_only=True, omit_defaults=True):
    syncedCanaries: bool = False
    cached: bool = False
    maxConnectedClusters: UInt32 = 0
    serviceExportsEnabled: bool | None = None


class ClusterConfig(Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: UInt32 = 0
    capabilities: ClusterConfigCapabilities = field(default_factory=ClusterConfigCapabilities)


# --- encoding and decoding

_ENCODER = msgspec.json.Encoder(order="deterministic")
_GO_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def encode(value: Struct) -> bytes:
    """Compact JSON exactly as Go's json.Marshal writes it."""
    data = _ENCODER.encode(value)
    # These characters can only occur inside JSON strings, so replacing them everywhere is safe.
    for raw, escaped in _GO_ESCAPES:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


T = TypeVar("T", bound=Struct)


_DECODERS: dict[type[Any], Callable[[str, bytes], Any]] = {}


def decoder_for(kind: type[T]) -> Callable[[str, bytes], T]:
    """A decoding function for `kind` (built once) that raises InvalidValue(key, reason) on any bad value."""
    cached: Callable[[str, bytes], T] | None = _DECODERS.get(kind)
    if cached is not None:
        return cached
    typed: msgspec.json.Decoder[T] = msgspec.json.Decoder(kind)
    name = kind.__name__

    def decode_value(key: str, data: bytes) -> T:
        try:
            value: T = typed.decode(data)
        except msgspec.ValidationError as exc:
            raise InvalidValue(key, f"invalid {name}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidValue(key, f"malformed JSON: {exc}") from None
        return value

    _DECODERS[kind] = decode_value
    return decode_value


def decode(kind: type[T], key: str, data: bytes) -> T:
    """Decode one value of `kind` read at `key`."""
    decoded: T = decoder_for(kind)(key, data)
    return decoded
