"""Names for the node's pods: a small DNS server on the node's router address (what pods have as their resolver).

    <service>.<namespace>.svc.cluster.local      A: the local Service's ClusterIP (a global Service's carries the
                                                 backends of every cluster)
    <service>.<namespace>.svc.clusterset.local   A: the same, for a global Service (the MCS-API convention)

A name under cluster.local or clusterset.local that is no such Service gets NXDOMAIN; an AAAA question for one gets
an empty answer (the datapath is IPv4); any other name gets REFUSED at once (this server resolves nothing else, and
a pod's resolver must not wait on it). UDP and TCP, as RFC 1035 says; a malformed question gets FORMERR, never
silence. Answers carry a TTL of 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

__all__ = ["DnsServer", "answer", "parse_question"]

log = logging.getLogger(__name__)

A, AAAA, ANY = 1, 28, 255
CLASS_IN = 1
NOERROR, FORMERR, NXDOMAIN, REFUSED = 0, 1, 3, 5
TTL = 5
_HEADER = struct.Struct(">HHHHHH")

#: namespace, name, whether clusterset -> the ClusterIP, or None
Resolve = Callable[[str, str, bool], str | None]


class Malformed(ValueError):
    pass


def parse_question(message: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, name, type, the question's end) of a query; `Malformed` if it is not one."""
    if len(message) < _HEADER.size:
        raise Malformed("shorter than a header")
    ident, flags, questions, _, _, _ = _HEADER.unpack_from(message)
    if flags & 0x8000 or questions != 1:
        raise Malformed("not one question")
    labels, offset = [], _HEADER.size
    while True:
        if offset >= len(message):
            raise Malformed("the name runs past the message")
        length = message[offset]
        offset += 1
        if length == 0:
            break
        if length > 63 or offset + length > len(message):
            raise Malformed("a label is too long or cut")
        labels.append(message[offset : offset + length].decode("ascii", "replace").lower())
        offset += length
    if offset + 4 > len(message):
        raise Malformed("no type and class")
    qtype, qclass = struct.unpack_from(">HH", message, offset)
    if qclass != CLASS_IN:
        raise Malformed("not class IN")
    return ident, flags, ".".join(labels), qtype, offset + 4


def _reply(message: bytes, ident: int, flags: int, end: int, code: int, address: str | None) -> bytes:
    answers = 1 if address is not None else 0
    header = _HEADER.pack(ident, 0x8000 | 0x0400 | (flags & 0x0100) | code, 1, answers, 0, 0)  # QR, AA, RD as asked
    body = message[_HEADER.size : end]
    if address is not None:
        body += struct.pack(">HHHIH", 0xC00C, A, CLASS_IN, TTL, 4) + bytes(int(p) for p in address.split("."))
    return header + body


def answer(message: bytes, resolve: Resolve) -> tuple[bytes | None, str]:
    """The reply to a query, and its outcome's name (for the metric); None when not even an id can be read."""
    try:
        ident, flags, name, qtype, end = parse_question(message)
    except Malformed:
        if len(message) >= 2:
            ident = struct.unpack_from(">H", message)[0]
            return _HEADER.pack(ident, 0x8000 | FORMERR, 0, 0, 0, 0), "formerr"
        return None, "formerr"
    labels = name.split(".")
    for zone, clusterset in (("cluster.local", False), ("clusterset.local", True)):
        if name == zone or name.endswith("." + zone):
            if len(labels) == 5 and labels[2] == "svc":
                address = resolve(labels[1], labels[0], clusterset)
                if address is not None:
                    if qtype in (A, ANY):
                        return _reply(message, ident, flags, end, NOERROR, address), "answered"
                    return _reply(message, ident, flags, end, NOERROR, None), "nodata"
            return _reply(message, ident, flags, end, NXDOMAIN, None), "nxdomain"
    return _reply(message, ident, flags, end, REFUSED, None), "refused"


class DnsServer:
    """UDP and TCP on one address; `resolve` says a Service's ClusterIP."""

    def __init__(self, address: str, resolve: Resolve, *, port: int = 53, registry: CollectorRegistry | None = None):
        self.address = address
        self.port = port
        self.resolve = resolve
        self.queries = Counter("clustermesh_dns_queries", "DNS questions of the node's pods, by outcome", ["outcome"],
                               registry=registry or CollectorRegistry())  # fmt: skip
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def _answer(self, message: bytes) -> bytes | None:
        reply, outcome = answer(message, self.resolve)
        self.queries.labels(outcome).inc()
        return reply

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server._answer(data)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.address, self.port))
        self._transport = transport
        self._tcp = await asyncio.start_server(self._serve_tcp, self.address, self.port, reuse_address=True)
        log.info("DNS for the node's pods on %s:%d (udp, tcp)", self.address, self.port)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
                reply = self._answer(await reader.readexactly(length))
                if reply is None:
                    break
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
