"""Pod IP addresses from the node's pod CIDR: allocated lowest first, kept in a file (a restarted agent must not hand
out an address that is in use), released when the pod goes.

The network address, the node's router IP (the first host) and the broadcast address are never handed out; nor
are the first nine hosts (room for the node's own addresses), so pods start at .10 of a /24.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path

from certs.files import write_atomic

log = logging.getLogger(__name__)

__all__ = ["IPAM", "IPAMExhausted"]

RESERVED_HOSTS = 9


class IPAMExhausted(Exception):
    pass


class IPAM:
    def __init__(self, cidr: str, path: Path) -> None:
        self.network = ipaddress.ip_network(cidr, strict=False)
        self.path = path
        self.allocated: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        """The saved allocations; a file that cannot be read is set aside (never silently overwritten) and the
        addresses still in use are found again from the node's routes (`reserve`, by the pod network)."""
        if not self.path.exists():
            return {}
        try:
            loaded = json.loads(self.path.read_text())
            if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
                raise ValueError("not an object of container IDs to addresses")
            return {str(owner): address for owner, address in loaded.items()}
        except (OSError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt")
            self.path.replace(aside)
            log.error("IPAM state %s is unreadable (%s): kept as %s; addresses in use are taken from the routes",
                      self.path, exc, aside)  # fmt: skip
            return {}

    def reserve(self, address: str) -> None:
        """Mark an address found in use (a pod's route) whose owner is unknown: it is never handed out again."""
        if address not in self.allocated.values() and ipaddress.ip_address(address) in self.network:
            self.allocated[f"recovered-{address}"] = address
            self._save()

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
