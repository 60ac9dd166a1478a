"""The agent's netlink edge: pyroute2's async API behind a few verbs, errors turned into `DatapathError`.

The agent runs inside its node's network namespace; every call here acts on that namespace (`ip_in_netns` acts on
a pod's namespace given by path). Routes the agent makes carry its own protocol number (`RTPROT_CLUSTERMESH`), so it can
list and reconcile exactly its own routes and never touch anyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["RTPROT_CLUSTERMESH", "RTPROT_PODS", "DatapathError", "Netlink", "ip_in_netns", "netlink", "set_sysctl"]

RTPROT_CLUSTERMESH = 44  # routes between nodes
RTPROT_PODS = 45  # routes to this node's pods
NUD_PERMANENT = 0x80
NTF_SELF = 2  # a forwarding entry of the device itself (a VXLAN destination), not of a bridge it is a port of


class DatapathError(Exception):
    """A netlink or system call failed; `code` is the errno when there is one."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@contextlib.asynccontextmanager
async def netlink() -> AsyncIterator[Netlink]:
    """A netlink session on this process's namespace."""
    try:
        async with AsyncIPRoute() as ipr:
            yield Netlink(ipr)
    except NetlinkError as exc:
        raise DatapathError(f"netlink: {exc}", exc.code) from exc


async def ip_in_netns(netns_path: str, *commands: str) -> str:
    """Run iproute2 commands (one batch, one process) inside the namespace at `netns_path`.

    Why not pyroute2 here: its namespace helper forks from a threaded asyncio process, which is not safe (the child
    aborts); entering the namespace with nsenter in a child process is, and a pod's set-up is one batch anyway.
    """
    process = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns_path}", "ip", "-json", "-batch", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate("\n".join(commands).encode() + b"\n")
    if process.returncode != 0:
        raise DatapathError(f"in {netns_path}: {stderr.decode().strip() or f'ip exited {process.returncode}'}")
    return stdout.decode()


def set_sysctl(path: str, value: str) -> None:
    """Write /proc/sys/<path> (of this network namespace, for net.* keys)."""
    target = Path("/proc/sys") / path.replace(".", "/")
    try:
        target.write_text(value)
    except OSError as exc:
        raise DatapathError(f"cannot set {path}={value}: {exc.strerror}", exc.errno or 0) from exc


class Netlink:
    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr

    async def _call(self, what: str, coroutine: Any) -> Any:
        try:
            return await coroutine
        except NetlinkError as exc:
            raise DatapathError(f"{what}: {exc}", exc.code) from exc

    async def index(self, name: str) -> int | None:
        found = await self.ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    async def require(self, name: str) -> int:
        index = await self.index(name)
        if index is None:
            raise DatapathError(f"no interface {name}", errno.ENODEV)
        return index

    async def links(self) -> dict[str, int]:
        return {link.get_attr("IFLA_IFNAME"): link["index"] async for link in await self.ipr.get_links()}

    async def delete_link(self, name: str) -> bool:
        index = await self.index(name)
        if index is None:
            return False
        await self._call(f"delete {name}", self.ipr.link("del", index=index))
        return True

    async def up(self, index: int, *, mtu: int | None = None, address: str | None = None) -> None:
        options: dict[str, Any] = {"state": "up"}
        if mtu is not None:
            options["mtu"] = mtu
        if address is not None:
            options["address"] = address
        await self._call(f"set link {index} up", self.ipr.link("set", index=index, **options))

    async def ensure_address(self, index: int, cidr: str) -> None:
        interface = ipaddress.ip_interface(cidr)
        present = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) async for a in await self.ipr.get_addr(index=index)]
        if (str(interface.ip), interface.network.prefixlen) not in present:
            await self._call(
                f"add {cidr}",
                self.ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen),
            )

    async def route(self, dst: str, *, via: str | None = None, oif: int | None = None, onlink: bool = False,
                    scope: int | None = None, proto: int = RTPROT_CLUSTERMESH) -> None:  # fmt: skip
        """Create or replace a route to `dst`, marked as ours."""
        options: dict[str, Any] = {"dst": dst, "proto": proto}
        if via is not None:
            options["gateway"] = via
        if oif is not None:
            options["oif"] = oif
        if onlink:
            options["flags"] = ["onlink"]
        if scope is not None:
            options["scope"] = scope
        await self._call(f"route {dst}", self.ipr.route("replace", **options))

    async def delete_route(self, dst: str) -> None:
        with contextlib.suppress(DatapathError):
            await self._call(f"delete route {dst}", self.ipr.route("del", dst=dst, proto=RTPROT_CLUSTERMESH))

    async def our_routes(self, proto: int = RTPROT_CLUSTERMESH) -> dict[str, dict[str, Any]]:
        """Our routes: destination CIDR -> {"via": gateway or None, "oif": index}."""
        routes: dict[str, dict[str, Any]] = {}
        async for route in await self.ipr.get_routes(proto=proto, family=2):
            dst = route.get_attr("RTA_DST")
            if dst is None:
                continue
            routes[f"{dst}/{route['dst_len']}"] = {
                "via": route.get_attr("RTA_GATEWAY"),
                "oif": route.get_attr("RTA_OIF"),
            }
        return routes

    async def gateway_to(self, address: str) -> str | None:
        """The next hop the kernel would use to reach `address` (None when it is on a local link)."""
        answer = await self._call(f"route get {address}", self.ipr.route("get", dst=address))
        for route in answer if isinstance(answer, list) else [route async for route in answer]:
            return route.get_attr("RTA_GATEWAY")  # type: ignore[no-any-return]
        return None

    async def neighbour(self, index: int, ip: str, mac: str) -> None:
        await self._call(f"neighbour {ip}", self.ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index,
                                                           state="permanent"))  # fmt: skip

    async def neighbours(self, index: int) -> dict[str, str]:
        """Permanent neighbour entries of a device: IP -> MAC."""
        found: dict[str, str] = {}
        async for entry in await self.ipr.get_neighbours(ifindex=index):
            if entry["state"] & NUD_PERMANENT and entry.get_attr("NDA_DST") and entry.get_attr("NDA_LLADDR"):
                found[entry.get_attr("NDA_DST")] = entry.get_attr("NDA_LLADDR")
        return found

    async def mac(self, index: int) -> str:
        async for link in await self.ipr.get_links(index):
            return str(link.get_attr("IFLA_ADDRESS") or "")
        return ""

    async def delete_neighbour(self, index: int, ip: str) -> None:
        with contextlib.suppress(DatapathError):
            await self._call(f"delete neighbour {ip}", self.ipr.neigh("del", dst=ip, ifindex=index))

    async def fdb(self, index: int, mac: str, dst: str) -> None:
        await self._call(f"fdb {mac}", self.ipr.fdb("replace", ifindex=index, lladdr=mac, dst=dst,
                                                                flags=NTF_SELF))  # fmt: skip

    async def delete_fdb(self, index: int, mac: str, dst: str) -> None:
        with contextlib.suppress(DatapathError):
            await self._call(f"delete fdb {mac}", self.ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst,
                                                                           flags=NTF_SELF))  # fmt: skip

    async def move_to_netns(self, index: int, netns_path: str, new_name: str) -> None:
        fd = os.open(netns_path, os.O_RDONLY)
        try:
            await self._call("move to netns", self.ipr.link("set", index=index, net_ns_fd=fd, ifname=new_name))
        finally:
            os.close(fd)
