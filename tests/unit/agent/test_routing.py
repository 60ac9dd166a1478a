"""Which nodes of the merged view become routing peers, and the Router that feeds them to a driver.

The Router runs in virtual time (looptime) against a real MergedView and a driver double that records each apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agent.datapath.netlink import DatapathError
from agent.datapath.routing import Peer, Router, node_peer, peers_from_view
from agent.view import MergedView
from clustermesh.model import wire
from clustermesh.model.keys import ipcache_key_prefix

OWN = "c1/c1-node-1"


def node(
    cluster: str,
    name: str,
    *addresses: tuple[str, str],
    cidr: str | None = None,
    secondary: tuple[str, ...] = (),
    key: str = "",
) -> wire.Node:
    return wire.Node(
        Name=name,
        Cluster=cluster,
        IPAddresses=[wire.Address(kind, ip) for kind, ip in addresses] or None,
        IPv4AllocCIDR=wire.ip_net(cidr) if cidr else None,
        IPv4SecondaryAllocCIDRs=[wire.ip_net(c) for c in secondary] or None,
        WireguardPubKey=key,
    )


def internal(ip: str) -> tuple[str, str]:
    return ("InternalIP", ip)


def test_a_node_with_an_ipv4_internal_ip_and_a_pod_cidr_is_a_peer() -> None:
    peer = node_peer("c2/c2-node-1", node("c2", "c2-node-1", internal("192.168.2.11"), cidr="10.2.1.0/24", key="K="))
    assert peer == Peer("c2/c2-node-1", "192.168.2.11", ("10.2.1.0/24",), "K=")


def test_the_first_ipv4_internal_ip_is_the_peer_address() -> None:
    """Dual-stack nodes list their IPv6 address too, and external addresses are not for node-to-node traffic."""
    dual = node(
        "c2",
        "n",
        ("ExternalIP", "203.0.113.5"),
        internal("fd00::11"),
        internal("192.168.2.11"),
        internal("192.168.2.99"),
        cidr="10.2.1.0/24",
    )
    peer = node_peer("c2/n", dual)
    assert peer is not None
    assert peer.ip == "192.168.2.11"


def test_secondary_pod_cidrs_are_routed_too() -> None:
    multi = node("c2", "n", internal("192.168.2.11"), cidr="10.2.1.0/24", secondary=("10.2.200.0/24", "10.2.201.0/25"))
    peer = node_peer("c2/n", multi)
    assert peer is not None
    assert peer.pod_cidrs == ("10.2.1.0/24", "10.2.200.0/24", "10.2.201.0/25")


def test_peers_are_every_other_routable_node() -> None:
    nodes = {
        OWN: node("c1", "c1-node-1", internal("192.168.1.11"), cidr="10.1.1.0/24"),
        "c1/c1-node-2": node("c1", "c1-node-2", internal("192.168.1.12"), cidr="10.1.2.0/24", key="K1="),
        "c2/c2-node-1": node("c2", "c2-node-1", internal("192.168.2.11"), cidr="10.2.1.0/24", key="K2="),
        "c2/ipv6-only": node("c2", "ipv6-only", internal("fd00::12"), cidr="10.2.2.0/24"),
        "c2/external-only": node("c2", "external-only", ("ExternalIP", "203.0.113.5"), cidr="10.2.3.0/24"),
        "c2/no-address": node("c2", "no-address", cidr="10.2.4.0/24"),
        "c2/no-cidr": node("c2", "no-cidr", internal("192.168.2.15")),
    }
    peers = peers_from_view(nodes, OWN)
    assert peers == {
        "c1/c1-node-2": Peer("c1/c1-node-2", "192.168.1.12", ("10.1.2.0/24",), "K1="),
        "c2/c2-node-1": Peer("c2/c2-node-1", "192.168.2.11", ("10.2.1.0/24",), "K2="),
    }


def test_a_node_of_the_same_name_in_another_cluster_is_a_peer() -> None:
    """Only our own <cluster>/<node> key is left out, not every node called like ours."""
    nodes = {
        OWN: node("c1", "c1-node-1", internal("192.168.1.11"), cidr="10.1.1.0/24"),
        "c2/c1-node-1": node("c2", "c1-node-1", internal("192.168.2.11"), cidr="10.2.1.0/24"),
    }
    assert list(peers_from_view(nodes, OWN)) == ["c2/c1-node-1"]


# --- the Router


class RecordingDriver:
    """A Driver that records the peer sets it is given; `failures` applies raise first, `pending` is settable."""

    name = "recording"
    mtu = 1500

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[dict[str, Peer]] = []
        self.failures = failures
        self.converging = False
        self.closed = False
        self.applied = asyncio.Event()

    async def setup(self) -> None:
        return None

    async def apply(self, peers: dict[str, Peer]) -> None:
        self.calls.append(dict(peers))
        self.applied.set()
        if self.failures:
            self.failures -= 1
            raise DatapathError("wg set cm0: No such device")

    def pending(self) -> bool:
        return self.converging

    async def close(self) -> None:
        self.closed = True

    def describe(self) -> dict[str, object]:
        return {"driver": self.name}

    async def until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        """Wait for `condition`, checked after each apply (the router's round ends before this task resumes)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self.applied.clear()
                await self.applied.wait()


def view_with(*nodes: wire.Node) -> MergedView:
    view = MergedView("c1")
    for n in nodes:
        view.upsert(n.Cluster, "node", n.key_name(), n)
    return view


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


ME = node("c1", "c1-node-1", internal("192.168.1.11"), cidr="10.1.1.0/24")
C2N1 = node("c2", "c2-node-1", internal("192.168.2.11"), cidr="10.2.1.0/24", key="K21=")
C2N2 = node("c2", "c2-node-2", internal("192.168.2.12"), cidr="10.2.2.0/24", key="K22=")


@pytest.mark.looptime
async def test_node_changes_in_the_view_are_applied() -> None:
    view = view_with(ME, C2N1)
    driver = RecordingDriver()
    router = Router(view, driver, OWN, resync=3600, retry=3600)
    task = asyncio.create_task(router.run())
    try:
        await driver.until(lambda: len(driver.calls) == 1)
        assert list(driver.calls[0]) == ["c2/c2-node-1"]

        view.upsert("c2", "node", C2N2.key_name(), C2N2)
        await driver.until(lambda: len(driver.calls) == 2)
        assert sorted(driver.calls[1]) == ["c2/c2-node-1", "c2/c2-node-2"]
        assert router.applied == driver.calls[1]

        moved = node("c2", "c2-node-1", internal("192.168.2.51"), cidr="10.2.1.0/24", key="K21=")
        view.upsert("c2", "node", moved.key_name(), moved)
        await driver.until(lambda: len(driver.calls) == 3)
        assert driver.calls[2]["c2/c2-node-1"].ip == "192.168.2.51"

        view.delete("c2", "node", C2N2.key_name(), C2N2)
        await driver.until(lambda: len(driver.calls) == 4)
        assert list(driver.calls[3]) == ["c2/c2-node-1"]
        assert router.applies == 4
        assert router.last_error == ""
    finally:
        await stop(task)
    assert driver.closed, "the router closes its driver when it stops"
    assert view.changes > 0


@pytest.mark.looptime
async def test_changes_of_other_kinds_do_not_cause_an_apply() -> None:
    view = view_with(ME, C2N1)
    driver = RecordingDriver()
    task = asyncio.create_task(Router(view, driver, OWN, resync=3600, retry=3600).run())
    try:
        await driver.until(lambda: len(driver.calls) == 1)
        pair = wire.make_ip_pair(ip="10.2.1.10", host_ip="192.168.2.11", identity=1234)
        view.upsert("c2", "ipcache", ipcache_key_prefix() + "10.2.1.10", pair)
        await asyncio.sleep(60)  # virtual time, far less than the resync
        assert len(driver.calls) == 1
        view.upsert("c2", "node", C2N2.key_name(), C2N2)  # the router still follows node changes afterwards
        await driver.until(lambda: len(driver.calls) == 2)
    finally:
        await stop(task)


@pytest.mark.looptime
async def test_a_failing_driver_is_retried_and_the_error_is_reported_meanwhile() -> None:
    view = view_with(ME, C2N1)
    driver = RecordingDriver(failures=2)
    router = Router(view, driver, OWN, resync=3600, retry=1)
    task = asyncio.create_task(router.run())
    try:
        await driver.until(lambda: len(driver.calls) == 1)
        assert router.last_error == "DatapathError: wg set cm0: No such device"
        assert router.applies == 0
        assert router.applied == {}
        assert not router.converged()

        await driver.until(lambda: router.applies == 1)  # retried after `retry`, not `resync`
        assert not task.done(), "a datapath error must not stop the router"
        assert len(driver.calls) == 3
        assert router.last_error == ""
        assert list(router.applied) == ["c2/c2-node-1"]
        assert router.converged()
    finally:
        await stop(task)


@pytest.mark.looptime
async def test_a_converging_driver_is_applied_again_soon_then_at_the_resync_pace() -> None:
    """An IKE SA being negotiated: the router comes back after `retry` until the driver says it is done."""
    view = view_with(ME, C2N1)
    driver = RecordingDriver()
    driver.converging = True
    router = Router(view, driver, OWN, resync=1000, retry=1)
    task = asyncio.create_task(router.run())
    try:
        await driver.until(lambda: len(driver.calls) == 1)
        assert not router.converged()
        await asyncio.sleep(10.5)
        assert len(driver.calls) >= 5, "rounds every `retry` seconds while the driver converges"
        driver.converging = False
        await asyncio.sleep(2)  # the round already waiting comes, then the pace is `resync`
        settled = len(driver.calls)
        assert router.converged()
        await asyncio.sleep(100)
        assert len(driver.calls) == settled
        await asyncio.sleep(1000)
        assert len(driver.calls) == settled + 1, "and a periodic resync puts back what was changed by hand"
    finally:
        await stop(task)
