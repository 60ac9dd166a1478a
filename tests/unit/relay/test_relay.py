"""The relay's merge: flows of several nodes, numbered as they come, read back in time order; nodes it cannot read
named; and the observe command's node and time filters."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import click
import pytest

from clustermesh.cli.policy import _moment, in_window
from clustermesh.relay.peers import Peer, PeerFollower
from clustermesh.relay.relay import Relay


def flow(node: str, time: str) -> dict[str, Any]:
    return {"flow": {"time": time, "node_name": node}, "node_name": node, "time": time}


def relay() -> Relay:
    return Relay(Path("/nonexistent/agent.sock"), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


PEER_1 = Peer("c1/n1", "c1", "n1", "192.168.1.11:4244", "n1.c1.hubble-grpc.cilium.io")
PEER_2 = Peer("c2/n1", "c2", "n1", "192.168.2.11:4244", "n1.c2.hubble-grpc.cilium.io")


def test_flows_of_several_nodes_are_read_in_time_order_and_after_a_number() -> None:
    merged = relay()
    merged._deliver(PEER_2, [flow("c2/n1", "2026-12-07T10:00:03.000000000Z"), flow("c2/n1", "2026-12-07T10:00:01Z")])
    merged._deliver(PEER_1, [flow("c1/n1", "2026-12-07T10:00:02.000000000Z")])
    assert [f["time"][:19] for _, f in merged.since(0)] == [
        "2026-12-07T10:00:01", "2026-12-07T10:00:02", "2026-12-07T10:00:03"]  # fmt: skip
    assert [n for n, _ in merged.since(2)] == [3], "what came after the second one received"
    assert [f["node_name"] for _, f in merged.since(0, last=1)] == ["c2/n1"], "the latest by time"
    assert merged.received.labels("c2")._value.get() == 2


async def test_a_node_and_the_peer_service_that_cannot_be_read_are_named() -> None:
    merged = relay()
    await merged.refresh_peers()
    assert merged.unreachable() == [f"peer service {merged.peer_service}: {merged.peer_service_error}"]
    assert "nothing answers" in merged.peer_service_error
    follower = PeerFollower(PEER_1, merged._tls, merged._deliver)
    follower.state, follower.error = "unreachable", "connection refused"
    merged.followers[PEER_1.name] = (follower, None)  # type: ignore[assignment]
    assert "c1/n1: connection refused" in merged.unreachable()


def test_observe_windows_by_node_glob_and_time() -> None:
    filters = {"node": "c2/*", "since": _moment("2026-12-07T10:00:02Z"), "until": None}
    assert in_window(flow("c2/n1", "2026-12-07T10:00:03.123456789Z"), filters)
    assert not in_window(flow("c1/n1", "2026-12-07T10:00:03Z"), filters), "another cluster's node"
    assert not in_window(flow("c2/n1", "2026-12-07T10:00:01.999999999Z"), filters), "before the window"
    assert in_window(flow("c2/n1", "2099-01-01T00:00:00Z"), {"node": None, "since": _moment("5m"), "until": None})
    with pytest.raises(click.BadParameter):
        _moment("yesterday")


def test_a_reloading_context_takes_up_rotated_files_and_keeps_the_last_good_ones(tmp_path: Path) -> None:
    import certs
    from clustermesh.daemon.tls import ReloadingContext, TlsFilesError, client_context

    ca = certs.create_ca("mesh")
    paths = certs.CertPaths.in_dir(tmp_path, "relay")
    certs.write_issued(ca, certs.CertPaths.in_dir(tmp_path, "ca"))
    certs.write_issued(certs.issue_client(ca, "hubble-relay"), paths)
    ca_file = tmp_path / "ca.crt"
    reloading = ReloadingContext(lambda: client_context(paths.cert, paths.key, [ca_file]),
                                 [paths.cert, paths.key, ca_file], period=0)  # fmt: skip
    first = reloading.current()
    assert reloading.current() is first, "files unchanged: the same context"
    certs.write_issued(certs.issue_client(ca, "hubble-relay"), paths)  # rotated in place
    assert reloading.changed() and reloading.current() is not first
    paths.key.write_text("not a key")  # caught half-written
    kept = reloading.current()
    assert kept is reloading.context and not reloading.changed(), "the last good context stays"
    with pytest.raises(TlsFilesError):
        client_context(paths.cert, paths.key, [ca_file])
