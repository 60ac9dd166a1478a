"""Typed access to the datapath's maps (`bpf/src/datapath.h`), over real maps or the in-memory double.

A `RawMap` is what a typed map needs: lookup, update, delete, keys and batches on bytes. `bpf.syscall.MapFd` is
the real one; `MemoryMap` is the double for unit tests (a dict, with the longest-prefix lookup of an LPM trie), and
both pass one conformance suite (`bpf.testing`). The typed maps encode and decode the C layouts, byte for byte:

- `IpcacheMap`: CIDR -> (identity, tunnel endpoint);
- `EndpointMap`: host-side veth ifindex -> (identity, ingress enforced, egress enforced);
- `PolicyMap`: one endpoint's rules: (direction, peer identity or 0 for any, protocol or 0 for any, port prefix)
  -> allow or deny;
- `CtMap` and `Counters`, read for status and metrics;
- `FlowEvent`: one record of the ring buffer.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = [
    "Counters",
    "CtMap",
    "EndpointMap",
    "EndpointSettings",
    "FlowEvent",
    "IpcacheEntry",
    "IpcacheMap",
    "MemoryMap",
    "SHAPES",
    "memory_map",
    "PolicyKey",
    "PolicyMap",
    "RawMap",
    "port_prefixes",
]

# Reserved identities, as Cilium numbers them (the C header's).
ID_HOST, ID_WORLD, ID_HEALTH, ID_REMOTE_NODE = 1, 2, 4, 6
INGRESS, EGRESS = 0, 1
VERDICT_FORWARDED, VERDICT_DROPPED = 0, 1
REASON_POLICY_DENIED, REASON_POLICY_DENY = 133, 181
REASON_MAX = 256


class RawMap(Protocol):
    key_size: int
    value_size: int

    def lookup(self, key: bytes) -> bytes | None: ...

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None: ...

    def delete(self, key: bytes) -> bool: ...

    def all_keys(self) -> Iterator[bytes]: ...

    def update_batch(self, items: list[tuple[bytes, bytes]]) -> None: ...

    def delete_batch(self, keys: list[bytes]) -> int: ...


class MemoryMap:
    """A map in a dict: the double of a kernel map. With `lpm`, a lookup finds the longest stored prefix (keys are a
    u32 prefix length, then data bytes), as an LPM trie's does; updates and deletes are exact, as the kernel's."""

    def __init__(self, key_size: int, value_size: int, max_entries: int, *, lpm: bool = False) -> None:
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.lpm = lpm
        self.data: dict[bytes, bytes] = {}
        self.writes = 0  # updates and deletes made, for tests that count them

    def _check(self, key: bytes, value: bytes | None = None) -> None:
        if len(key) != self.key_size or (value is not None and len(value) != self.value_size):
            raise ValueError(f"a key has {self.key_size} bytes and a value {self.value_size}")

    def lookup(self, key: bytes) -> bytes | None:
        self._check(key)
        if not self.lpm:
            return self.data.get(key)
        bits = min(struct.unpack_from("<I", key)[0], (self.key_size - 4) * 8)
        data = int.from_bytes(key[4:], "big")
        width = (self.key_size - 4) * 8
        for length in range(bits, -1, -1):
            masked = data >> (width - length) << (width - length) if length else 0
            found = self.data.get(struct.pack("<I", length) + masked.to_bytes(self.key_size - 4, "big"))
            if found is not None:
                return found
        return None

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self._check(key, value)
        exists = key in self.data
        if flags == 1 and exists:
            raise OSError(errno.EEXIST, f"key {key.hex()} exists")
        if flags == 2 and not exists:
            raise OSError(errno.ENOENT, f"key {key.hex()} does not exist")
        if not exists and len(self.data) >= self.max_entries:  # the kernel's words for a full hash, and trie
            raise OSError(errno.ENOSPC if self.lpm else errno.E2BIG, "the map is full")
        self.data[key] = value
        self.writes += 1

    def delete(self, key: bytes) -> bool:
        self._check(key)
        if self.data.pop(key, None) is None:
            return False
        self.writes += 1
        return True

    def all_keys(self) -> Iterator[bytes]:
        return iter(list(self.data))

    def update_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self.update(key, value)

    def delete_batch(self, keys: list[bytes]) -> int:
        return sum(1 for key in keys if self.delete(key))


#: The datapath's maps by kind, as the checks and the agent make them: (key size, value size, longest-prefix).
SHAPES = {"endpoints": (8 // 2, 8, False), "lpm-ipcache": (8, 8, True), "lpm-policy": (12, 4, True)}


def memory_map(kind: str, max_entries: int) -> MemoryMap:
    key_size, value_size, lpm = SHAPES[kind]
    return MemoryMap(key_size, value_size, max_entries, lpm=lpm)


# --- ipcache


class IpcacheEntry(NamedTuple):
    identity: int
    tunnel_endpoint: str  # "" when not behind a tunnel


_IPCACHE_KEY = struct.Struct("<I4s")
_IPCACHE_VALUE = struct.Struct("<I4s")
_NO_ENDPOINT = b"\0\0\0\0"


def _ipcache_key(cidr: str) -> bytes:
    network = ipaddress.IPv4Network(cidr, strict=False)
    return _IPCACHE_KEY.pack(network.prefixlen, network.network_address.packed)


class IpcacheMap:
    """CIDR (or a host address) -> identity and tunnel endpoint; IPv4."""

    key_size, value_size = _IPCACHE_KEY.size, _IPCACHE_VALUE.size

    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    @staticmethod
    def encode(cidr: str, entry: IpcacheEntry) -> tuple[bytes, bytes]:
        endpoint = socket.inet_aton(entry.tunnel_endpoint) if entry.tunnel_endpoint else _NO_ENDPOINT
        return _ipcache_key(cidr), _IPCACHE_VALUE.pack(entry.identity, endpoint)

    def write(self, entries: dict[str, IpcacheEntry]) -> None:
        self.raw.update_batch([self.encode(cidr, entry) for cidr, entry in entries.items()])

    def remove(self, cidrs: Iterable[str]) -> int:
        return self.raw.delete_batch([_ipcache_key(cidr) for cidr in cidrs])

    def lookup(self, ip: str) -> IpcacheEntry | None:
        """What the datapath finds for an address: the longest prefix that holds it."""
        value = self.raw.lookup(_IPCACHE_KEY.pack(32, socket.inet_aton(ip)))
        return self._entry(value) if value is not None else None

    @staticmethod
    def _entry(value: bytes) -> IpcacheEntry:
        identity, endpoint = _IPCACHE_VALUE.unpack(value)
        return IpcacheEntry(identity, socket.inet_ntoa(endpoint) if endpoint != _NO_ENDPOINT else "")

    def items(self) -> dict[str, IpcacheEntry]:
        found = {}
        for key in self.raw.all_keys():
            length, address = _IPCACHE_KEY.unpack(key)
            value = self.raw.lookup(key)
            if value is not None:
                found[f"{socket.inet_ntoa(address)}/{length}"] = self._entry(value)
        return found


# --- endpoints


class EndpointSettings(NamedTuple):
    identity: int
    enforce_ingress: bool
    enforce_egress: bool


_ENDPOINT_KEY = struct.Struct("<I")
_ENDPOINT_VALUE = struct.Struct("<IBBH")


class EndpointMap:
    """Host-side veth ifindex -> the endpoint's identity and where its policy is enforced."""

    key_size, value_size = _ENDPOINT_KEY.size, _ENDPOINT_VALUE.size

    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    def set(self, ifindex: int, settings: EndpointSettings) -> None:
        value = _ENDPOINT_VALUE.pack(settings.identity, int(settings.enforce_ingress), int(settings.enforce_egress), 0)
        self.raw.update(_ENDPOINT_KEY.pack(ifindex), value)

    def get(self, ifindex: int) -> EndpointSettings | None:
        value = self.raw.lookup(_ENDPOINT_KEY.pack(ifindex))
        if value is None:
            return None
        identity, ingress, egress, _ = _ENDPOINT_VALUE.unpack(value)
        return EndpointSettings(identity, bool(ingress), bool(egress))

    def remove(self, ifindex: int) -> bool:
        return self.raw.delete(_ENDPOINT_KEY.pack(ifindex))

    def items(self) -> dict[int, EndpointSettings]:
        found = {}
        for key in self.raw.all_keys():
            (ifindex,) = _ENDPOINT_KEY.unpack(key)
            if (settings := self.get(ifindex)) is not None:
                found[ifindex] = settings
        return found


# --- policy


class PolicyKey(NamedTuple):
    """One entry of an endpoint's policy map. `identity` 0 is any identity; `protocol` 0 is any protocol (then the
    port counts for nothing); `port_bits` of `port` count (16: exactly that port, 0: any port). For ICMP, `port` is
    the type in its high byte (`port_bits` 8 for a type)."""

    direction: int
    identity: int
    protocol: int = 0
    port: int = 0
    port_bits: int = 0

    @property
    def prefixlen(self) -> int:
        if not self.protocol:
            return 40
        return 48 + self.port_bits


_POLICY_KEY = struct.Struct("<IB4sB2s")
_POLICY_VALUE = struct.Struct("<B3x")


@functools.lru_cache(maxsize=4096)
def port_prefixes(first: int, last: int) -> tuple[tuple[int, int], ...]:
    """The fewest (port, prefix bits) that cover exactly first..last: a port range in an LPM key (policies repeat
    their ranges for every peer identity: each is worked out once)."""
    prefixes = []
    port = first
    while port <= last:
        bits = 16
        while bits > 0:
            size = 1 << (16 - (bits - 1))
            if port % size or port + size - 1 > last:
                break
            bits -= 1
        prefixes.append((port, bits))
        port += 1 << (16 - bits)
    return tuple(prefixes)


class PolicyMap:
    """One endpoint's rules: `PolicyKey` -> deny (True) or allow (False)."""

    key_size, value_size = _POLICY_KEY.size, _POLICY_VALUE.size

    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    @staticmethod
    def encode_key(key: PolicyKey) -> bytes:
        port = key.port & ~((1 << (16 - key.port_bits)) - 1) & 0xFFFF if key.protocol else 0
        return _POLICY_KEY.pack(key.prefixlen, key.direction, key.identity.to_bytes(4, "big"),
                                key.protocol if key.protocol else 0, port.to_bytes(2, "big"))  # fmt: skip

    @staticmethod
    def decode_key(raw: bytes) -> PolicyKey:
        prefixlen, direction, identity, protocol, port = _POLICY_KEY.unpack(raw)
        if prefixlen <= 40:
            return PolicyKey(direction, int.from_bytes(identity, "big"))
        return PolicyKey(direction, int.from_bytes(identity, "big"), protocol, int.from_bytes(port, "big"),
                         prefixlen - 48)  # fmt: skip

    def write(self, entries: dict[PolicyKey, bool]) -> None:
        self.raw.update_batch([(self.encode_key(key), _POLICY_VALUE.pack(int(deny))) for key, deny in entries.items()])

    def remove(self, keys: Iterable[PolicyKey]) -> int:
        return self.raw.delete_batch([self.encode_key(key) for key in keys])

    def items(self) -> dict[PolicyKey, bool]:
        found = {}
        for raw in self.raw.all_keys():
            value = self.raw.lookup(raw)
            if value is not None:
                found[self.decode_key(raw)] = bool(_POLICY_VALUE.unpack(value)[0])
        return found

    def verdict(self, direction: int, identity: int, protocol: int, port: int) -> bool | None:
        """What the datapath would find for one packet: deny (True), allow (False), or no entry (None); the exact
        identity's entry, then any identity's, a deny winning."""
        found = []
        for who in (identity, 0):
            value = self.raw.lookup(self.encode_key(PolicyKey(direction, who, protocol, port, 16)))
            if value is not None:
                found.append(bool(_POLICY_VALUE.unpack(value)[0]))
        if True in found:
            return True
        return False if found else None


# --- connection tracking and counters


_CT_KEY = struct.Struct("<4s4sHHBBH")
_CT_VALUE = struct.Struct("<QQ")


@dataclass(frozen=True)
class CtEntry:
    source: str
    destination: str
    sport: int
    dport: int
    protocol: int
    direction: int
    packets: int


class CtMap:
    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    def entries(self) -> list[CtEntry]:
        found = []
        for key in self.raw.all_keys():
            value = self.raw.lookup(key)
            if value is None:
                continue
            saddr, daddr, sport, dport, protocol, direction, _ = _CT_KEY.unpack(key)
            _, packets = _CT_VALUE.unpack(value)
            found.append(CtEntry(socket.inet_ntoa(saddr), socket.inet_ntoa(daddr), sport, dport, protocol,
                                 direction, packets))  # fmt: skip
        return found

    def clear(self) -> int:
        return self.raw.delete_batch(list(self.raw.all_keys()))


class Counters:
    """The per-CPU packet counters by (reason, direction), summed over CPUs. Reason 0 counts forwarded packets."""

    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    def read(self) -> dict[tuple[int, int], int]:
        counts = {}
        for reason in range(REASON_MAX):
            for direction in (INGRESS, EGRESS):
                value = self.raw.lookup(struct.pack("<I", reason * 2 + direction))
                if value is None:
                    continue
                total = sum(struct.unpack_from(f"<{len(value) // 8}Q", value))
                if total:
                    counts[(reason, direction)] = total
        return counts


# --- events


_EVENT = struct.Struct("<QII4s4sHHBBBBIB3x")
FLOW_EVENT_SIZE = _EVENT.size


class FlowEvent(NamedTuple):
    time_ns: int
    src_identity: int
    dst_identity: int
    source: str
    destination: str
    sport: int
    dport: int
    protocol: int
    verdict: int
    reason: int
    direction: int
    ifindex: int
    is_reply: bool

    @classmethod
    def decode(cls, data: bytes) -> FlowEvent:
        (time_ns, src, dst, saddr, daddr, sport, dport, protocol, verdict, reason, direction, ifindex,
         is_reply) = _EVENT.unpack_from(data)  # fmt: skip
        return cls(time_ns, src, dst, socket.inet_ntoa(saddr), socket.inet_ntoa(daddr), sport, dport, protocol,
                   verdict, reason, direction, ifindex, bool(is_reply))  # fmt: skip

    def encode(self) -> bytes:
        return _EVENT.pack(self.time_ns, self.src_identity, self.dst_identity, socket.inet_aton(self.source),
                           socket.inet_aton(self.destination), self.sport, self.dport, self.protocol, self.verdict,
                           self.reason, self.direction, self.ifindex, int(self.is_reply))  # fmt: skip
