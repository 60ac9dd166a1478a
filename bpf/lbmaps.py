"""Typed access to the load balancer's maps (`bpf/src/lb.h`), over real maps or the in-memory double.

- `LbServiceMap`: (frontend address, port, protocol, slot) -> slot 0: (count, reverse-NAT index); slot n: backend id;
- `LbBackendMap`: backend id -> (address, port, protocol, flags, cluster ID);
- `LbRevNatMap`: reverse-NAT index -> the frontend's address and port;
- `LbCounters`: what the socket programs did (translated, refused for want of a backend, reversed, stale).

Addresses are dotted strings, ports numbers, protocols IP protocol numbers (6 TCP, 17 UDP); the C layouts keep
addresses and ports in network order.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable
from typing import Generic, NamedTuple, TypeVar

from bpf.maps import SHAPES, MemoryMap, RawMap

__all__ = [
    "LB_SHAPES",
    "LbBackend",
    "LbBackendMap",
    "LbCounters",
    "LbFrontendKey",
    "LbRevNatMap",
    "LbService",
    "LbServiceMap",
    "SOCK_EVENT_SIZE",
    "SockEvent",
    "lb_memory_map",
]

TCP, UDP = 6, 17
PROTOCOLS = {"TCP": TCP, "UDP": UDP}
#: cm_lb_counters' slots (lb.h)
TRANSLATED, NO_BACKEND, REVERSED, STALE = 0, 1, 2, 3
#: struct sock_event's verdicts
SOCK_TRANSLATED, SOCK_NO_BACKEND = 0, 1

_SOCK_EVENT = struct.Struct("<QQQ4s4s2s2sIHHBB10x")
SOCK_EVENT_SIZE = _SOCK_EVENT.size


class SockEvent(NamedTuple):
    """A socket's connect() translated (or refused) by the socket load balancer: struct sock_event of lb.h."""

    time_ns: int
    socket_cookie: int
    netns_cookie: int
    frontend: str
    backend: str
    frontend_port: int
    backend_port: int
    backend_id: int
    rev_nat: int
    cluster_id: int
    protocol: int
    verdict: int

    @classmethod
    def decode(cls, data: bytes) -> SockEvent:
        (time_ns, cookie, netns, frontend, backend, frontend_port, backend_port, backend_id, rev_nat, cluster_id,
         protocol, verdict) = _SOCK_EVENT.unpack_from(data)  # fmt: skip
        return cls(time_ns, cookie, netns, socket.inet_ntoa(frontend), socket.inet_ntoa(backend),
                   struct.unpack("!H", frontend_port)[0], struct.unpack("!H", backend_port)[0], backend_id, rev_nat,
                   cluster_id, protocol, verdict)  # fmt: skip

    def encode(self) -> bytes:
        return _SOCK_EVENT.pack(self.time_ns, self.socket_cookie, self.netns_cookie, socket.inet_aton(self.frontend),
                                socket.inet_aton(self.backend), struct.pack("!H", self.frontend_port),
                                struct.pack("!H", self.backend_port), self.backend_id, self.rev_nat, self.cluster_id,
                                self.protocol, self.verdict)  # fmt: skip


class LbFrontendKey(NamedTuple):
    address: str
    port: int
    protocol: int
    slot: int = 0


class LbService(NamedTuple):
    """Slot 0: `backends` for new connections (the C layout's count) and the frontend's `rev_nat`; slot n:
    `backend_id`."""

    backend_id: int = 0
    backends: int = 0
    rev_nat: int = 0


class LbBackend(NamedTuple):
    address: str
    port: int
    protocol: int
    flags: int = 0
    cluster_id: int = 0


_KEY = struct.Struct("<4s2sBBHH")
_SERVICE = struct.Struct("<IHH")
_BACKEND_ID = struct.Struct("<I")
_BACKEND = struct.Struct("<4s2sBBHH")
_REVNAT_KEY = struct.Struct("<H")
_REVNAT = struct.Struct("<4s2sH")

#: The load balancer's maps by kind: (key size, value size, longest-prefix), as the checks and the agent make them.
LB_SHAPES = {
    "lb-services": (_KEY.size, _SERVICE.size, False),
    "lb-backends": (_BACKEND_ID.size, _BACKEND.size, False),
    "lb-revnat": (_REVNAT_KEY.size, _REVNAT.size, False),
}


SHAPES.update(LB_SHAPES)  # so that `memory_map`, the checks and the tests make them like the datapath's others


def lb_memory_map(kind: str, max_entries: int = 1 << 16) -> MemoryMap:
    key_size, value_size, lpm = LB_SHAPES[kind]
    return MemoryMap(key_size, value_size, max_entries, lpm=lpm)


def _address(text: str) -> bytes:
    return socket.inet_aton(text)


K = TypeVar("K")
V = TypeVar("V")


class _TypedMap(Generic[K, V]):
    """A hash map of typed keys and values: batches of writes and removals, and its whole content."""

    encode_key: Callable[[K], bytes]
    decode_key: Callable[[bytes], K]
    encode_value: Callable[[V], bytes]
    decode_value: Callable[[bytes], V]

    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    def write(self, entries: dict[K, V]) -> None:
        self.raw.update_batch([(type(self).encode_key(k), type(self).encode_value(v)) for k, v in entries.items()])

    def remove(self, keys: Iterable[K]) -> int:
        return self.raw.delete_batch([type(self).encode_key(key) for key in keys])

    def get(self, key: K) -> V | None:
        found = self.raw.lookup(type(self).encode_key(key))
        return None if found is None else type(self).decode_value(found)

    def items(self) -> dict[K, V]:
        found = {}
        for raw_key in self.raw.all_keys():
            value = self.raw.lookup(raw_key)
            if value is not None:
                found[type(self).decode_key(raw_key)] = type(self).decode_value(value)
        return found


def _encode_frontend(key: LbFrontendKey) -> bytes:
    return _KEY.pack(_address(key.address), key.port.to_bytes(2, "big"), key.protocol, 0, key.slot, 0)


def _decode_frontend(raw: bytes) -> LbFrontendKey:
    address, port, protocol, _, slot, _ = _KEY.unpack(raw)
    return LbFrontendKey(socket.inet_ntoa(address), int.from_bytes(port, "big"), protocol, slot)


class LbServiceMap(_TypedMap[LbFrontendKey, LbService]):
    key_size, value_size = _KEY.size, _SERVICE.size
    encode_key = staticmethod(_encode_frontend)
    decode_key = staticmethod(_decode_frontend)
    encode_value = staticmethod(lambda value: _SERVICE.pack(*value))
    decode_value = staticmethod(lambda raw: LbService(*_SERVICE.unpack(raw)))


def _encode_backend(backend: LbBackend) -> bytes:
    return _BACKEND.pack(_address(backend.address), backend.port.to_bytes(2, "big"), backend.protocol,
                         backend.flags, backend.cluster_id, 0)  # fmt: skip


def _decode_backend(raw: bytes) -> LbBackend:
    address, port, protocol, flags, cluster_id, _ = _BACKEND.unpack(raw)
    return LbBackend(socket.inet_ntoa(address), int.from_bytes(port, "big"), protocol, flags, cluster_id)


class LbBackendMap(_TypedMap[int, LbBackend]):
    key_size, value_size = _BACKEND_ID.size, _BACKEND.size
    encode_key = staticmethod(_BACKEND_ID.pack)
    decode_key = staticmethod(lambda raw: _BACKEND_ID.unpack(raw)[0])
    encode_value = staticmethod(_encode_backend)
    decode_value = staticmethod(_decode_backend)


def _encode_revnat(frontend: tuple[str, int]) -> bytes:
    return _REVNAT.pack(_address(frontend[0]), frontend[1].to_bytes(2, "big"), 0)


def _decode_revnat(raw: bytes) -> tuple[str, int]:
    address, port, _ = _REVNAT.unpack(raw)
    return socket.inet_ntoa(address), int.from_bytes(port, "big")


class LbRevNatMap(_TypedMap[int, tuple[str, int]]):
    key_size, value_size = _REVNAT_KEY.size, _REVNAT.size
    encode_key = staticmethod(_REVNAT_KEY.pack)
    decode_key = staticmethod(lambda raw: _REVNAT_KEY.unpack(raw)[0])
    encode_value = staticmethod(_encode_revnat)
    decode_value = staticmethod(_decode_revnat)


class LbCounters:
    """cm_lb_counters, summed over the CPUs: translated, no_backend, reversed, stale."""

    NAMES = ("translated", "no_backend", "reversed", "stale", "packet_nat")

    def __init__(self, raw: RawMap) -> None:
        self.raw = raw

    def read(self) -> dict[str, int]:
        found = {}
        for index, name in enumerate(self.NAMES):
            value = self.raw.lookup(struct.pack("<I", index))
            found[name] = sum(struct.unpack(f"<{len(value) // 8}Q", value)) if value else 0
        return found
