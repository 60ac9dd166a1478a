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

__all__ = ["IPAM", "IPAMExhausted", "recovered_owner"]

RESERVED_HOSTS = 9


class IPAMExhausted(Exception):
    pass


def recovered_owner(device_or_address: str) -> str:
    """The owner recorded for an address found in use with no owner known: by its interface when known."""
    return f"recovered-{device_or_address}"


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

    def reserve(self, address: str, device: str | None = None) -> None:
        """Mark an address found in use (a pod's route) whose owner is unknown: it is not handed out again until
        its pod goes. `device`, the route's interface, names the pod: its container's DEL or ADD finds it by it."""
        if address not in self.allocated.values() and ipaddress.ip_address(address) in self.network:
            self.allocated[recovered_owner(device or address)] = address
            self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.allocated, indent=1, sort_keys=True).encode(), mode=0o644)

    def allocate(self, owner: str, device: str | None = None) -> str:
        """The address of `owner` (a container ID): the one it has (also one recovered on its `device`), or the
        lowest free one."""
        if owner in self.allocated:
            return self.allocated[owner]
        if device is not None and (address := self.allocated.pop(recovered_owner(device), None)) is not None:
            self.allocated[owner] = address
            self._save()
            return address
        used = set(self.allocated.values())
        for number, host in enumerate(self.network.hosts()):
            if number < RESERVED_HOSTS:
                continue
            if str(host) not in used:
                self.allocated[owner] = str(host)
                self._save()
                return str(host)
        raise IPAMExhausted(f"no free address left in {self.network} ({len(used)} in use)")

    def release(self, owner: str, device: str | None = None) -> str | None:
        """Free the address of `owner`, or the one recovered on its `device` (its owner was lost with the state)."""
        address = self.allocated.pop(owner, None)
        if address is None and device is not None:
            address = self.allocated.pop(recovered_owner(device), None)
        if address is not None:
            self._save()
        return address

    def owner_of(self, address: str) -> str | None:
        return next((owner for owner, ip in self.allocated.items() if ip == address), None)
