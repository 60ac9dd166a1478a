"""The maps' contract as runnable checks, for the kernel's maps and the in-memory double alike.

`check_maps(factory)` runs every check against maps the factory makes (`factory(kind)` with kind "hash" or
"lpm", in the sizes of the datapath's maps): the unit tests run it on `MemoryMap`, the privileged tests on maps
made with bpf(2). This is what keeps the double honest, as `kvstore.testing` does for the etcd backend.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from bpf.lbmaps import TCP, UDP, LbBackend, LbBackendMap, LbFrontendKey, LbRevNatMap, LbService, LbServiceMap
from bpf.maps import (
    EGRESS,
    INGRESS,
    SHAPES,
    EndpointMap,
    EndpointSettings,
    IpcacheEntry,
    IpcacheMap,
    MemoryMap,
    PolicyKey,
    PolicyMap,
    RawMap,
    memory_map,
    port_prefixes,
)

__all__ = ["CHECKS", "MapFactory", "MemoryDatapath", "check_maps"]

#: kind ("hash", "lpm-ipcache", "lpm-policy", "endpoints"), max entries -> a new empty map
MapFactory = Callable[[str, int], RawMap]


def check_raw_hash(make: MapFactory) -> None:
    raw = make("endpoints", 4)
    key, value = struct.pack("<I", 7), struct.pack("<IBBH", 65537, 1, 0, 0)
    assert raw.lookup(key) is None
    raw.update(key, value)
    assert raw.lookup(key) == value
    for flags, number in ((1, errno.EEXIST),):  # NOEXIST on a key that exists
        try:
            raw.update(key, value, flags)
        except OSError as exc:
            assert exc.errno == number, exc
        else:
            raise AssertionError("an update with NOEXIST of an existing key succeeded")
    try:
        raw.update(struct.pack("<I", 8), value, 2)  # EXIST on a key that does not
    except OSError as exc:
        assert exc.errno == errno.ENOENT, exc
    else:
        raise AssertionError("an update with EXIST of a missing key succeeded")
    assert raw.delete(key) is True and raw.delete(key) is False
    raw.update_batch([(struct.pack("<I", i), value) for i in range(4)])
    assert sorted(raw.all_keys()) == [struct.pack("<I", i) for i in range(4)]
    try:
        raw.update(struct.pack("<I", 9), value)
    except OSError as exc:
        assert exc.errno in (errno.E2BIG, errno.ENOSPC), exc
    else:
        raise AssertionError("a full map took one more key")
    assert raw.delete_batch([struct.pack("<I", i) for i in range(2)]) == 2
    assert sorted(raw.all_keys()) == [struct.pack("<I", 2), struct.pack("<I", 3)]
    try:
        raw.update(b"\0", value)
    except ValueError:
        pass
    else:
        raise AssertionError("a key of the wrong size was taken")


def check_ipcache_longest_prefix(make: MapFactory) -> None:
    ipcache = IpcacheMap(make("lpm-ipcache", 64))
    ipcache.write({
        "10.1.0.0/16": IpcacheEntry(6, "192.168.1.11"),
        "10.1.1.0/24": IpcacheEntry(65537, "192.168.1.12"),
        "10.1.1.10/32": IpcacheEntry(65538, ""),
    })  # fmt: skip
    assert ipcache.lookup("10.1.1.10") == IpcacheEntry(65538, "")
    assert ipcache.lookup("10.1.1.11") == IpcacheEntry(65537, "192.168.1.12")
    assert ipcache.lookup("10.1.2.1") == IpcacheEntry(6, "192.168.1.11")
    assert ipcache.lookup("10.2.0.1") is None
    assert ipcache.remove(["10.1.1.0/24", "10.9.9.9/32"]) == 1, "a missing key is skipped"
    assert ipcache.lookup("10.1.1.11") == IpcacheEntry(6, "192.168.1.11"), "the shorter prefix shows through"
    assert set(ipcache.items()) == {"10.1.0.0/16", "10.1.1.10/32"}


def check_policy_lookups(make: MapFactory) -> None:
    """What the datapath finds for a packet, from the rules an endpoint's map holds."""
    policy = PolicyMap(make("lpm-policy", 256))
    web, db = 65537, 65538
    rules: dict[PolicyKey, bool] = {
        PolicyKey(INGRESS, web, 6, port, bits): False for port, bits in port_prefixes(80, 90)
    }
    rules[PolicyKey(INGRESS, web, 6, 85, 16)] = True  # deny one port of the range
    rules[PolicyKey(INGRESS, 0, 17, 53, 16)] = False  # anyone, UDP 53
    rules[PolicyKey(INGRESS, db, 0)] = False  # db: any protocol, any port
    rules[PolicyKey(EGRESS, 0, 0)] = True  # deny all egress
    rules[PolicyKey(INGRESS, 0, 1, 8 << 8, 8)] = False  # ICMP echo requests from anyone
    policy.write(rules)
    assert policy.verdict(INGRESS, web, 6, 80) is False
    assert policy.verdict(INGRESS, web, 6, 90) is False
    assert policy.verdict(INGRESS, web, 6, 91) is None
    assert policy.verdict(INGRESS, web, 6, 79) is None
    assert policy.verdict(INGRESS, web, 6, 85) is True, "the longer (exact) prefix wins within a lookup"
    assert policy.verdict(INGRESS, web, 17, 80) is None, "another protocol"
    assert policy.verdict(INGRESS, 99999, 17, 53) is False, "any identity"
    assert policy.verdict(INGRESS, db, 132, 4000) is False, "any protocol"
    assert policy.verdict(EGRESS, web, 6, 80) is True
    assert policy.verdict(INGRESS, 99999, 1, (8 << 8) | 0) is False and policy.verdict(INGRESS, 99999, 1, 0) is None
    assert policy.items() == rules, "every rule reads back as written"
    assert policy.remove([PolicyKey(INGRESS, web, 6, 85, 16)]) == 1
    assert policy.verdict(INGRESS, web, 6, 85) is False


def check_endpoints(make: MapFactory) -> None:
    endpoints = EndpointMap(make("endpoints", 16))
    endpoints.set(12, EndpointSettings(65537, True, False))
    assert endpoints.get(12) == EndpointSettings(65537, True, False)
    endpoints.set(12, EndpointSettings(65537, True, True))
    assert endpoints.items() == {12: EndpointSettings(65537, True, True)}
    assert endpoints.remove(12) and endpoints.get(12) is None


def check_load_balancer(make: MapFactory) -> None:
    services = LbServiceMap(make("lb-services", 64))
    backends = LbBackendMap(make("lb-backends", 64))
    revnat = LbRevNatMap(make("lb-revnat", 64))
    frontend = LbFrontendKey("10.96.1.2", 80, TCP)
    entries = {
        frontend: LbService(0, 2, 7),
        frontend._replace(slot=1): LbService(11),
        frontend._replace(slot=2): LbService(12),
    }
    services.write(entries)
    backends.write({11: LbBackend("10.1.1.10", 8080, TCP, 0, 1), 12: LbBackend("10.2.1.10", 9090, TCP, 0, 2)})
    revnat.write({7: ("10.96.1.2", 80)})
    assert services.items() == entries and services.get(frontend) == LbService(0, 2, 7)
    assert services.get(LbFrontendKey("10.96.1.2", 80, UDP)) is None, "the protocol is part of the frontend"
    assert backends.get(12) == LbBackend("10.2.1.10", 9090, TCP, 0, 2)
    assert revnat.items() == {7: ("10.96.1.2", 80)}
    assert services.remove([frontend._replace(slot=2)]) == 1
    services.write({frontend: LbService(0, 1, 7)})
    assert services.get(frontend) == LbService(0, 1, 7) and len(services.items()) == 2


CHECKS: list[Callable[[MapFactory], None]] = [
    check_raw_hash,
    check_ipcache_longest_prefix,
    check_policy_lookups,
    check_endpoints,
    check_load_balancer,
]


def check_maps(make: MapFactory) -> None:
    for check in CHECKS:
        check(make)


class MemoryDatapath:
    """The loaded datapath's maps in memory, for the agent's unit tests: the same typed maps over `MemoryMap`s; the
    programs "attached" are the veth names in `attached`."""

    def __init__(self) -> None:
        self.ipcache = IpcacheMap(memory_map("lpm-ipcache", 1 << 20))
        self.endpoints = EndpointMap(memory_map("endpoints", 4096))
        self.policies: dict[int, MemoryMap] = {}
        self.attached: list[str] = []

    def policy_map(self, ifindex: int) -> PolicyMap:
        if ifindex not in self.policies:
            key_size, value_size, _ = SHAPES["lpm-policy"]
            self.policies[ifindex] = MemoryMap(key_size, value_size, 65536, lpm=True)
        return PolicyMap(self.policies[ifindex])

    def forget_endpoint(self, ifindex: int) -> None:
        self.endpoints.remove(ifindex)
        self.policies.pop(ifindex, None)

    def attach(self, ifname: str) -> None:
        self.attached.append(ifname)
