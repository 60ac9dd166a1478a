"""The lab's underlay: the world namespace with a bridge per cluster and routing between them, and how a namespace
is attached to a cluster's bridge. No default route anywhere: nothing of the lab can reach past it."""

from __future__ import annotations

from clustermesh.lab import netns
from clustermesh.lab.layout import UNDERLAY_SUPERNET
from clustermesh.lab.state import LabContext

__all__ = ["attach", "build"]


def build(ctx: LabContext) -> None:
    layout = ctx.layout
    world = layout.world_netns
    netns.ip("netns", "add", world)
    netns.ip("link", "set", "lo", "up", netns=world)
    # /proc/sys/net is the namespace of whoever writes it (sysctl(8) is not on every machine: procps)
    netns.run(*netns.nsenter(world), "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    for cluster in layout.all_clusters():
        netns.ip("link", "add", cluster.bridge, "type", "bridge", netns=world)
        netns.ip("addr", "add", f"{cluster.gateway}/24", "dev", cluster.bridge, netns=world)
        netns.ip("link", "set", cluster.bridge, "up", netns=world)
        attach(ctx, cluster.control_plane_netns, cluster.control_plane_veth, cluster.bridge,
                     f"{cluster.control_plane_ip}/24", cluster.gateway)  # fmt: skip
    ctx.progress(
        f"underlay: namespace {world} routes between "
        + ", ".join(f"{c.bridge} {c.subnet}" for c in layout.all_clusters())
        + " (no default route anywhere)"
    )


def attach(ctx: LabContext, namespace: str, world_veth: str, bridge: str, address: str, gateway: str) -> None:
    """A namespace on a cluster's bridge: a veth, an address, a route to the underlay (never a default)."""
    world = ctx.layout.world_netns
    netns.ip("netns", "add", namespace)
    netns.ip("link", "set", "lo", "up", netns=namespace)
    netns.ip("link", "add", world_veth, "netns", world, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    netns.ip("link", "set", world_veth, "master", bridge, "up", netns=world)
    netns.ip("addr", "add", address, "dev", "eth0", netns=namespace)
    netns.ip("link", "set", "eth0", "up", netns=namespace)
    netns.ip("route", "add", UNDERLAY_SUPERNET, "via", gateway, netns=namespace)
