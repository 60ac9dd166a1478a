"""Pod IP addresses from the node's pod CIDR: allocated lowest first, kept in a file (a restarted agent must not hand
out an address that is in use), released when the pod goes.

The network address, the node's router IP (the first host) and the broadcast address are never handed out; nor
are the first ten hosts (room for the node's own addresses), so pods start at .10 of a /24.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from certs.files import write_atomic

__all__ = ["IPAM", "IPAMExhausted"]

RESERVED_HOSTS = 9


class IPAMExhausted(Exception):
    pass


class IPAM:
    def __init__(self, cidr: str, path: Path) -> None:
        self.network = ipaddress.ip_network(cidr, strict=False)
        self.path = path
        self.allocated: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.allocated, indent=1, sort_keys=True).encode(), mode=0o644)

    def allocate(self, owner: str) -> str:
        """The address of `owner` (a container ID): the one it has, or the lowest free one."""
        if owner in self.allocated:
            return self.allocated[owner]
        used = set(self.allocated.values())
        for number, host in enumerate(self.network.hosts()):
            if number < RESERVED_HOSTS:
                continue
            if str(host) not in used:
                self.allocated[owner] = str(host)
                self._save()
                return str(host)
        raise IPAMExhausted(f"no free address left in {self.network} ({len(used)} in use)")

    def release(self, owner: str) -> str | None:
        address = self.allocated.pop(owner, None)
        if address is not None:
            self._save()
        return address

    def owner_of(self, address: str) -> str | None:
        return next((owner for owner, ip in self.allocated.items() if ip == address), None)
