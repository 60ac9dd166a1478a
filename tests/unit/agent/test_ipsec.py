"""The IPsec driver's pure parts: connection names, the vici connection for a peer, who initiates, and what
`apply` asks charon for, with the vici exchange replaced by a session double (no charon runs here)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.datapath.ipsec import IpsecDriver, connection_name, split_pem
from agent.datapath.routing import Peer


def pem(body: str) -> bytes:
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


CERT, KEY, CA = pem("NODE"), b"-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n", pem("MESHCA")


def driver(tmp_path: Path, node_ip: str = "192.168.1.11", pod_cidrs: tuple[str, ...] = ("10.1.1.0/24",)) -> IpsecDriver:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "node.crt").write_bytes(CERT)
    (tmp_path / "node.key").write_bytes(KEY)
    (tmp_path / "ca.crt").write_bytes(CA)
    return IpsecDriver(
        node_ip=node_ip,
        pod_cidrs=list(pod_cidrs),
        run_dir=tmp_path / "run",
        cert=tmp_path / "node.crt",
        key=tmp_path / "node.key",
        ca=tmp_path / "ca.crt",
    )


# --- connection names


def test_a_connection_name_is_stable_and_readable() -> None:
    name = connection_name("c2/c2-node-1")
    assert name == connection_name("c2/c2-node-1")
    assert name.startswith("cm-c2-c2-node-1-")


@pytest.mark.parametrize("key", ["c2/c2-node-1", "c1/a b;c'd\"e/../f", "c1/" + "x" * 300, ""])
def test_a_connection_name_has_only_safe_characters_and_a_bounded_length(key: str) -> None:
    name = connection_name(key)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name
    assert len(name) <= 64


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("c1/a.b", "c1/a-b"),
        ("c1/a", "c1-a"),  # both sanitise to c1-a
        ("c1/a b", "c1/a_b"),
        ("c1/" + "x" * 60 + "1", "c1/" + "x" * 60 + "2"),  # equal where the readable part is cut
    ],
)
def test_distinct_peers_get_distinct_connection_names(one: str, other: str) -> None:
    """One name for two peers would make charon replace one peer's connection with the other's."""
    assert connection_name(one) != connection_name(other)


# --- the connection loaded for a peer


def test_the_connection_authenticates_both_nodes_by_their_ips(tmp_path: Path) -> None:
    ipsec = driver(tmp_path, pod_cidrs=("10.1.1.0/24", "10.1.200.0/24"))
    peer = Peer("c2/c2-node-1", "192.168.2.11", ("10.2.1.0/24", "10.2.200.0/24"))
    conn = ipsec._connection(peer)
    assert conn["version"] == "2"
    assert conn["local_addrs"] == ["192.168.1.11"]
    assert conn["remote_addrs"] == ["192.168.2.11"]
    assert conn["encap"] == "yes", "kernel-libipsec speaks ESP in UDP only"
    assert conn["local"] == {"auth": "pubkey", "certs": [CERT], "id": "192.168.1.11"}
    assert conn["remote"] == {"auth": "pubkey", "id": "192.168.2.11", "cacerts": [CA]}
    child = conn["children"]["pods"]
    assert child["local_ts"] == ["10.1.1.0/24", "10.1.200.0/24"]
    assert child["remote_ts"] == ["10.2.1.0/24", "10.2.200.0/24"]
    assert child["mode"] == "tunnel"


def test_the_node_key_is_never_put_in_a_connection(tmp_path: Path) -> None:
    """The key is loaded once into charon; a connection (whose fingerprint is logged and compared) never has it."""
    conn = driver(tmp_path)._connection(Peer("c2/n", "192.168.2.11", ("10.2.1.0/24",)))
    assert KEY not in repr(conn).encode()


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("192.168.1.9", "192.168.1.10"),  # as text, "192.168.1.9" sorts after "192.168.1.10"
        ("10.0.0.1", "192.168.0.1"),
        ("fd00::9", "fd00::10"),
        ("fd00::ff", "fd00::1:0"),
    ],
)
def test_exactly_one_of_two_nodes_initiates_the_lower_address(tmp_path: Path, low: str, high: str) -> None:
    lower = driver(tmp_path / "low", node_ip=low)
    higher = driver(tmp_path / "high", node_ip=high)
    assert lower._initiator(Peer("c/high", high, ("10.2.0.0/24",)))
    assert not higher._initiator(Peer("c/low", low, ("10.1.0.0/24",)))


def test_the_initiator_restarts_a_dead_peer_and_the_responder_clears_it(tmp_path: Path) -> None:
    """Both sides restarting would make two IKE SAs for one pair; neither would leave the pair down for good."""
    lower = driver(tmp_path / "low", node_ip="192.168.1.9")
    higher = driver(tmp_path / "high", node_ip="192.168.1.10")
    initiating = lower._connection(Peer("c/high", "192.168.1.10", ("10.1.10.0/24",)))["children"]["pods"]
    responding = higher._connection(Peer("c/low", "192.168.1.9", ("10.1.9.0/24",)))["children"]["pods"]
    assert (initiating["dpd_action"], initiating["close_action"]) == ("restart", "start")
    assert (responding["dpd_action"], responding["close_action"]) == ("clear", "none")


# --- pending


def test_pending_while_a_loaded_connection_has_no_installed_child_sa(tmp_path: Path) -> None:
    ipsec = driver(tmp_path)
    assert not ipsec.pending(), "no peers: nothing to wait for"
    ipsec.loaded = {"cm-a": "f1", "cm-b": "f2"}
    ipsec.sas = {"cm-a": "ESTABLISHED/INSTALLED"}
    assert ipsec.pending(), "cm-b has no SA at all yet"
    ipsec.sas["cm-b"] = "CONNECTING/-"
    assert ipsec.pending()
    ipsec.sas["cm-b"] = "ESTABLISHED/-"
    assert ipsec.pending(), "an IKE SA without its child SA carries no traffic"
    ipsec.sas["cm-b"] = "ESTABLISHED/INSTALLED"
    assert not ipsec.pending()
    ipsec.sas["cm-gone"] = "DELETING/-"
    assert not ipsec.pending(), "an SA of a connection we no longer have does not hold the router back"


# --- apply, against a vici session double


class FakeSession:
    """Records what the driver asks of charon; `ike_sas` is what list_sas answers (as charon: bytes values)."""

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str]] = []
        self.ike_sas: list[dict[str, dict[str, Any]]] = []

    def load_conn(self, conns: dict[str, dict[str, Any]]) -> None:
        for name, conn in conns.items():
            self.loaded[name] = conn
            self.log.append(("load", name))

    def unload_conn(self, request: dict[str, str]) -> None:
        del self.loaded[request["name"]]
        self.log.append(("unload", request["name"]))

    def terminate(self, request: dict[str, str]) -> Iterator[dict[str, Any]]:
        self.log.append(("terminate", request["ike"]))
        return iter(())

    def initiate(self, request: dict[str, str]) -> Iterator[dict[str, Any]]:
        assert request["child"] == "pods"
        self.log.append(("initiate", request["ike"]))
        return iter(())

    def list_sas(self) -> Iterator[dict[str, dict[str, Any]]]:
        return iter(self.ike_sas)

    def load_cert(self, request: dict[str, Any]) -> None:
        assert request["flag"] == "CA"
        self.log.append(("load-ca", request["data"].decode()))

    def load_key(self, request: dict[str, Any]) -> None:
        self.log.append(("load-key", request["data"].decode()))


def sa(name: str, state: bytes, *children: bytes) -> dict[str, dict[str, Any]]:
    return {name: {"state": state, "child-sas": {f"pods-{i}": {"state": s} for i, s in enumerate(children)}}}


@pytest.fixture
def session() -> FakeSession:
    return FakeSession()


def wired(tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch) -> IpsecDriver:
    ipsec = driver(tmp_path, node_ip="192.168.1.50")

    async def vici(what: str, call: Any) -> Any:
        return call(session)

    monkeypatch.setattr(ipsec, "_vici", vici)
    return ipsec


HIGHER = Peer("c2/c2-node-1", "192.168.2.11", ("10.2.1.0/24",))  # we initiate
LOWER = Peer("c1/c1-node-2", "192.168.1.12", ("10.1.2.0/24",))  # it initiates
UP, DOWN = connection_name(HIGHER.key), connection_name(LOWER.key)


async def test_apply_loads_a_connection_per_peer_and_initiates_only_towards_higher_ips(
    tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipsec = wired(tmp_path, session, monkeypatch)
    await ipsec.apply({HIGHER.key: HIGHER, LOWER.key: LOWER})
    assert sorted(session.loaded) == sorted([UP, DOWN])
    assert session.loaded[UP]["remote_addrs"] == ["192.168.2.11"]
    assert ("initiate", UP) in session.log
    assert ("initiate", DOWN) not in session.log
    assert ipsec.pending()


async def test_apply_leaves_established_and_connecting_sas_alone(
    tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reload of an unchanged connection, no second initiate while charon is still retransmitting."""
    ipsec = wired(tmp_path, session, monkeypatch)
    peers = {HIGHER.key: HIGHER, LOWER.key: LOWER}
    await ipsec.apply(peers)
    session.log.clear()

    session.ike_sas = [sa(UP, b"CONNECTING"), sa(DOWN, b"ESTABLISHED", b"INSTALLED")]
    await ipsec.apply(peers)
    assert session.log == []
    assert ipsec.sas == {UP: "CONNECTING/-", DOWN: "ESTABLISHED/INSTALLED"}
    assert ipsec.pending()

    session.ike_sas = [sa(UP, b"ESTABLISHED", b"INSTALLED"), sa(DOWN, b"ESTABLISHED", b"INSTALLED")]
    await ipsec.apply(peers)
    assert session.log == []
    assert not ipsec.pending()


async def test_an_ike_sa_without_its_child_is_initiated_again(
    tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipsec = wired(tmp_path, session, monkeypatch)
    await ipsec.apply({HIGHER.key: HIGHER})
    session.log.clear()
    session.ike_sas = [sa(UP, b"ESTABLISHED")]
    await ipsec.apply({HIGHER.key: HIGHER})
    assert session.log == [("initiate", UP)]


@pytest.mark.parametrize("order", ["installed first", "installed last"])
async def test_a_duplicate_sa_while_rekeying_counts_as_installed(
    tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    ipsec = wired(tmp_path, session, monkeypatch)
    duplicates = [sa(UP, b"ESTABLISHED", b"INSTALLED"), sa(UP, b"REKEYING", b"REKEYING")]
    session.ike_sas = duplicates if order == "installed first" else duplicates[::-1]
    await ipsec.apply({HIGHER.key: HIGHER})
    assert ipsec.sas == {UP: "ESTABLISHED/INSTALLED"}
    assert ("initiate", UP) not in session.log


async def test_a_changed_peer_is_reloaded_and_a_gone_peer_unloaded_and_terminated(
    tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipsec = wired(tmp_path, session, monkeypatch)
    await ipsec.apply({HIGHER.key: HIGHER, LOWER.key: LOWER})
    session.log.clear()

    grown = Peer(HIGHER.key, HIGHER.ip, ("10.2.1.0/24", "10.2.200.0/24"))
    await ipsec.apply({HIGHER.key: grown})
    assert ("load", UP) in session.log
    assert session.loaded[UP]["children"]["pods"]["remote_ts"] == ["10.2.1.0/24", "10.2.200.0/24"]
    assert ("unload", DOWN) in session.log
    assert ("terminate", DOWN) in session.log
    assert list(session.loaded) == [UP]
    assert list(ipsec.loaded) == [UP]


# --- certificates rotated under a running charon


def test_a_ca_bundle_is_split_into_its_certificates() -> None:
    assert split_pem(pem("NEW") + pem("OLD")) == [pem("NEW"), pem("OLD")]
    assert split_pem(CA) == [CA]
    assert split_pem(b"") == []


async def test_rotated_files_go_to_the_running_charon_and_reload_the_connections(
    tmp_path: Path, session: FakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipsec = wired(tmp_path, session, monkeypatch)
    monkeypatch.setattr(ipsec, "_running_charon", lambda: 4242)  # a charon runs: none is started
    await ipsec.setup()
    await ipsec.apply({HIGHER.key: HIGHER})
    assert [entry[0] for entry in session.log[:2]] == ["load-ca", "load-key"]
    session.log.clear()
    await ipsec.setup()
    await ipsec.apply({HIGHER.key: HIGHER})
    assert not [e for e in session.log if e[0] != "initiate"], "unchanged files: nothing loaded again"

    rolled = pem("NEWCA") + CA
    (tmp_path / "ca.crt").write_bytes(rolled)
    (tmp_path / "node.crt").write_bytes(pem("NODE2"))
    (tmp_path / "node.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nKEY2\n-----END PRIVATE KEY-----\n")
    await ipsec.setup()
    await ipsec.apply({HIGHER.key: HIGHER})
    assert ("load-ca", pem("NEWCA").decode()) in session.log and ("load-ca", CA.decode()) in session.log
    assert any(kind == "load-key" and "KEY2" in data for kind, data in session.log)
    assert ("load", UP) in session.log, "the connection names the new certificate: loaded again"
    assert session.loaded[UP]["local"]["certs"] == [pem("NODE2")]
    assert session.loaded[UP]["remote"]["cacerts"] == [pem("NEWCA"), CA], "both CAs trusted during a roll"
    assert ("unload", UP) not in session.log and ("terminate", UP) not in session.log, "its SAs are kept"
