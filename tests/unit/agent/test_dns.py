"""The pods' DNS: Services by name in cluster.local and clusterset.local, NXDOMAIN for other names there, REFUSED
for the rest of the world, FORMERR for what is not a query: always an answer, never silence."""

from __future__ import annotations

import struct

from agent.dns import AAAA, FORMERR, NOERROR, NXDOMAIN, REFUSED, A, answer

SERVICES = {("shop", "web"): ("10.96.1.2", True), ("shop", "db"): ("10.96.1.3", False)}


def resolve(namespace: str, name: str, clusterset: bool) -> str | None:
    found = SERVICES.get((namespace, name))
    if found is None or (clusterset and not found[1]):
        return None
    return found[0]


def query(name: str, qtype: int = A, ident: int = 0x1234) -> bytes:
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", qtype, 1)


def code_and_addresses(reply: bytes | None) -> tuple[int, list[str]]:
    assert reply is not None
    ident, flags, _, answers, _, _ = struct.unpack_from(">HHHHHH", reply)
    assert ident == 0x1234 and flags & 0x8000, "a reply to our query"
    addresses = [".".join(str(b) for b in reply[-4:])] if answers else []
    return flags & 0xF, addresses


def test_services_by_name() -> None:
    assert code_and_addresses(answer(query("web.shop.svc.cluster.local"), resolve)[0]) == (NOERROR, ["10.96.1.2"])
    assert code_and_addresses(answer(query("WEB.Shop.svc.cluster.local"), resolve)[0]) == (NOERROR, ["10.96.1.2"])
    assert code_and_addresses(answer(query("web.shop.svc.clusterset.local"), resolve)[0]) == (NOERROR, ["10.96.1.2"])
    assert code_and_addresses(answer(query("db.shop.svc.clusterset.local"), resolve)[0]) == (NXDOMAIN, []), "local"
    assert code_and_addresses(answer(query("web.shop.svc.cluster.local", AAAA), resolve)[0]) == (NOERROR, [])


def test_other_names_are_answered_at_once() -> None:
    assert answer(query("nope.shop.svc.cluster.local"), resolve)[1] == "nxdomain"
    assert code_and_addresses(answer(query("shop.svc.cluster.local"), resolve)[0])[0] == NXDOMAIN
    assert code_and_addresses(answer(query("example.com"), resolve)[0])[0] == REFUSED
    reply, outcome = answer(query("web.shop.svc.cluster.local")[:15], resolve)
    assert outcome == "formerr" and reply is not None and struct.unpack_from(">H", reply, 2)[0] & 0xF == FORMERR
    assert answer(b"\x12", resolve) == (None, "formerr")
