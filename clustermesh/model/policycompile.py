"""From policies to one endpoint's rules: which identities, which ports, allow or deny (pure: no maps, no I/O).

`compile_endpoint(labels, policies, context)` answers, for a local endpoint with these identity labels: is it
isolated in each direction (a selecting policy enforces it), and which `Entry`s its policy map must hold, where an
entry is a direction, a peer identity (0: any), a protocol (0: any) and a port range (for ICMP: types). Selectors
resolve to identities from `context.identities` (every identity of the merged view, remote clusters' included,
and the reserved ones); a peer pinned to the local cluster does not match remote identities, unless
`context.default_local_cluster` is off (Cilium's `--policy-default-local-cluster=false`).

Deny wins over allow whatever their specificity: per direction and identity, allowed port ranges minus denied
ones are what is written as allows, and a deny of every protocol leaves nothing allowed. The datapath looks up the
peer's identity and then identity 0, and a deny from either wins: so a deny for any identity also beats an allow
for one. Entries depend on identities and policies only: a new pod of an identity already known changes nothing.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from clustermesh.model.labels import CLUSTER_LABEL, NAMESPACE_LABEL, SOURCE_K8S, Label
from clustermesh.model.policies import EGRESS, ICMP, INGRESS, Peer, Policy, PortRange, Rule

__all__ = [
    "pods_by_cidr",
    "MapPlan",
    "plan",
    "ANY",
    "Compiled",
    "CompiledRule",
    "Entry",
    "PolicyContext",
    "RESERVED_IDENTITIES",
    "cidrs_of",
    "compile_endpoint",
    "identity_labels",
]

ANY = 0  # any identity, in an entry
ID_HOST, ID_WORLD, ID_HEALTH, ID_REMOTE_NODE = 1, 2, 4, 6
RESERVED_IDENTITIES = {ID_HOST: "host", ID_WORLD: "world", ID_HEALTH: "health", ID_REMOTE_NODE: "remote-node"}
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
NAMESPACE_NAME = "kubernetes.io/metadata.name"
ALL_PORTS = (0, 65535)
ALL_TYPES = (0, 255)


class Entry(NamedTuple):
    """One thing an endpoint's policy map must say: in `direction`, traffic with `identity` (0: any) over
    `protocol` (0: any) to ports `first`..`last` (ICMP: types; all ports or types: the full range)."""

    direction: int
    identity: int
    protocol: int = 0
    first: int = 0
    last: int = 65535


def identity_labels(labels: Iterable[Label]) -> dict[str, str]:
    """An identity's Kubernetes labels as a selector sees them (key -> value)."""
    return {label.key: label.value for label in labels if label.source == SOURCE_K8S}


@dataclass
class PolicyContext:
    local_cluster: str
    #: every identity a peer can have (the merged view's, remote ones included) -> its labels
    identities: Mapping[int, Mapping[str, str]]
    #: CIDR -> the identity the agent gave the addresses of that CIDR (see `cidrs_of`)
    cidr_identities: Mapping[str, int] = field(default_factory=dict)
    default_local_cluster: bool = True
    #: endpoint identity -> the addresses of its endpoints (for an ipBlock that selects pods)
    endpoint_addresses: Mapping[int, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class CompiledRule:
    """One rule as it applies to the endpoint: for `policy get`."""

    policy: str
    direction: str
    verdict: str  # allow or deny
    peers: str
    identities: tuple[int, ...]  # 0: any
    ports: tuple[str, ...]  # empty: any


@dataclass
class Compiled:
    enforce_ingress: bool = False
    enforce_egress: bool = False
    entries: dict[Entry, bool] = field(default_factory=dict)  # -> deny
    rules: list[CompiledRule] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)


def _namespace_labels(labels: Mapping[str, str]) -> dict[str, str]:
    found = {key[len(NAMESPACE_LABELS) :]: value for key, value in labels.items() if key.startswith(NAMESPACE_LABELS)}
    if NAMESPACE_LABEL in labels:
        found.setdefault(NAMESPACE_NAME, labels[NAMESPACE_LABEL])
    return found


def _endpoint_peer_matches(peer: Peer, labels: Mapping[str, str], context: PolicyContext) -> bool:
    if peer.local_only and context.default_local_cluster and labels.get(CLUSTER_LABEL) != context.local_cluster:
        return False
    if peer.namespace is not None and labels.get(NAMESPACE_LABEL) != peer.namespace:
        return False
    if peer.namespaces is not None and not peer.namespaces.matches(_namespace_labels(labels)):
        return False
    return peer.endpoints is None or peer.endpoints.matches(labels)


def _inside(cidr: str, outer: str) -> bool:
    return ipaddress.ip_network(cidr).subnet_of(ipaddress.ip_network(outer))  # type: ignore[arg-type]


def peer_identities(peer: Peer, context: PolicyContext) -> set[int]:
    """The identities a peer clause selects (0: any identity, the world's addresses included)."""
    if peer.entity is not None:
        if peer.entity == "all":
            return {ANY}
        if peer.entity == "world":
            return {ID_WORLD, *context.cidr_identities.values()}
        if peer.entity == "cluster":
            local = {
                n for n, labels in context.identities.items() if labels.get(CLUSTER_LABEL) == context.local_cluster
            }
            return local | {ID_HOST, ID_REMOTE_NODE, ID_HEALTH}
        named = {"host": ID_HOST, "remote-node": ID_REMOTE_NODE, "health": ID_HEALTH}
        return {named[peer.entity]} if peer.entity in named else set()  # init, unmanaged: none here
    if peer.cidr is not None:
        selected = {
            number
            for cidr, number in context.cidr_identities.items()
            if _inside(cidr, peer.cidr) and not any(_inside(cidr, item) for item in peer.excepts)
        }
        if ipaddress.ip_network(peer.cidr).prefixlen == 0:
            selected.add(ID_WORLD)  # every address outside the mesh and outside every CIDR of a policy
        if peer.cidr_selects_pods:
            selected |= _pods_inside(peer, context)
        return selected
    return {number for number, labels in context.identities.items() if _endpoint_peer_matches(peer, labels, context)}


def _pods_inside(peer: Peer, context: PolicyContext) -> set[int]:
    """The endpoint identities all of whose addresses are in the block and outside its exceptions: the datapath
    tells peers by identity, so an identity with one pod outside (or excepted) is not selected at all."""
    assert peer.cidr is not None
    block = ipaddress.ip_network(peer.cidr)
    excepted = [ipaddress.ip_network(item) for item in peer.excepts]
    selected = set()
    for number, addresses in context.endpoint_addresses.items():
        ips = [ipaddress.ip_address(address) for address in addresses]
        if ips and all(ip in block and not any(ip in item for item in excepted) for ip in ips):
            selected.add(number)
    return selected


def pods_by_cidr(policies: Iterable[Policy]) -> bool:
    """Whether a policy has an ipBlock that selects pods by address: then a pod's address coming or going can
    change what a policy allows, and the agent recomputes on ipcache changes too."""
    return any(peer.cidr_selects_pods for policy in policies for rule in policy.rules for peer in rule.peers or ())


def _ranges(port: PortRange) -> tuple[int, int]:
    if port.protocol == ICMP:
        return (port.first, port.last) if port.last else ALL_TYPES
    return (port.first, port.last) if port.last else ALL_PORTS


def _subtract(allowed: list[tuple[int, int]], denied: list[tuple[int, int]]) -> list[tuple[int, int]]:
    result = _merge(allowed)
    for low, high in _merge(denied):
        kept = []
        for first, last in result:
            if last < low or first > high:
                kept.append((first, last))
                continue
            if first < low:
                kept.append((first, low - 1))
            if last > high:
                kept.append((high + 1, last))
        result = kept
    return result


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


Wanted = dict[tuple[int, int], list[PortRange | None]]  # (direction, identity) -> ports (None: every protocol)


def _resolve(allows: Wanted, denies: Wanted) -> dict[Entry, bool]:
    """Per (direction, identity): deny ranges as they are, allow ranges minus them."""
    entries: dict[Entry, bool] = {}
    for (direction, identity), ports in denies.items():
        if None in ports:  # every protocol denied: nothing else of this identity matters
            entries[Entry(direction, identity, 0, 0, 65535)] = True
            continue
        by_protocol: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for port in ports:
            assert port is not None
            by_protocol[port.protocol].append(_ranges(port))
        for protocol, ranges in by_protocol.items():
            for first, last in _merge(ranges):
                entries[Entry(direction, identity, protocol, first, last)] = True
    # most identities share their ports (one rule, many peers): each distinct set is worked out once
    worked: dict[tuple[tuple[PortRange | None, ...], tuple[PortRange | None, ...]], list[tuple[int, int, int]]] = {}
    for (direction, identity), ports in allows.items():
        denied = denies.get((direction, identity), [])
        if None in denied:
            continue
        shape = (tuple(ports), tuple(denied))
        if shape not in worked:
            worked[shape] = _allowed_ranges(ports, denied)
        for protocol, first, last in worked[shape]:
            entries.setdefault(Entry(direction, identity, protocol, first, last), False)
    return entries


def _allowed_ranges(ports: list[PortRange | None], denied: list[PortRange | None]) -> list[tuple[int, int, int]]:
    """(protocol, first, last) that `ports` allow minus what `denied` refuses; protocol 0: every protocol."""
    found = []
    if None in ports:  # every protocol: one short entry; longer deny entries win their ports in the trie
        found.append((0, 0, 65535))
    by_protocol: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for port in ports:
        if port is not None:
            by_protocol[port.protocol].append(_ranges(port))
    for protocol, ranges in by_protocol.items():
        refused = [_ranges(p) for p in denied if p is not None and p.protocol == protocol]
        found.extend((protocol, first, last) for first, last in _subtract(ranges, refused))
    return found


def compile_endpoint(labels: Mapping[str, str], policies: Iterable[Policy], context: PolicyContext) -> Compiled:
    compiled = Compiled()
    allows: Wanted = defaultdict(list)
    denies: Wanted = defaultdict(list)
    for policy in policies:
        if not policy.selects(dict(labels)):
            continue
        compiled.policies.append(policy.ref)
        compiled.enforce_ingress |= INGRESS in policy.enforces
        compiled.enforce_egress |= EGRESS in policy.enforces
        for rule in policy.rules:
            identities = _rule_identities(rule, context)
            target = denies if rule.deny else allows
            for identity in identities:
                target[(rule.direction, identity)].extend(rule.ports or [None])
            compiled.rules.append(
                CompiledRule(
                    policy.ref,
                    "ingress" if rule.direction == INGRESS else "egress",
                    "deny" if rule.deny else "allow",
                    " or ".join(map(str, rule.peers)) if rule.peers is not None else "every peer",
                    tuple(sorted(identities)),
                    tuple(str(port) for port in rule.ports),
                )
            )
    compiled.entries = _resolve(allows, denies)
    return compiled


def _rule_identities(rule: Rule, context: PolicyContext) -> set[int]:
    if rule.peers is None:
        return {ANY}
    found: set[int] = set()
    for peer in rule.peers:
        found |= peer_identities(peer, context)
    return found


def cidrs_of(policies: Iterable[Policy]) -> set[str]:
    """Every CIDR (and exception) the policies name but 0.0.0.0/0: each gets an identity of its own, so that the
    datapath's longest-prefix lookup tells them apart (addresses in none of them are the world)."""
    found: set[str] = set()
    for policy in policies:
        for rule in policy.rules:
            for peer in rule.peers or ():
                if peer.cidr is not None:
                    found.update(c for c in (peer.cidr, *peer.excepts) if ipaddress.ip_network(c).prefixlen)
    return found


K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class MapPlan(Generic[K, V]):
    """The writes that turn a map's `actual` content into the `desired` one, and nothing else."""

    writes: dict[K, V]
    deletes: list[K]

    def __len__(self) -> int:
        return len(self.writes) + len(self.deletes)


def plan(desired: Mapping[K, V], actual: Mapping[K, V]) -> MapPlan[K, V]:
    """What changes: an entry unchanged is never rewritten, so a recompute that changes nothing writes nothing."""
    writes = {key: value for key, value in desired.items() if actual.get(key, _MISSING) != value}
    return MapPlan(writes, [key for key in actual if key not in desired])


_MISSING = object()
