"""Admission: what an agent accepts from a cluster's etcd, the trust boundary of the mesh, in one place.

Everything a cluster publishes is untrusted (DESIGN sections 4 and 5). Two kinds of checks stand between a value
and a route, a WireGuard peer or a map:

- **the value alone** (`decoders_for`, one decoder per state prefix): it decodes; a node or service names the
  cluster it came from and that cluster's ID; a key matches its value (a node's name, an ipcache entry's IP, a
  service's namespace and name); an identity, or the identity of an ipcache entry, lies in the cluster's range
  (reserved identities below 256 are shared); an identity's labels carry the cluster's name;
- **ownership of addresses** (`Ownership`, shared by every cluster of one agent): a node's pod CIDRs lie inside
  the mesh's pod supernets and overlap no other node's; its addresses are no other cluster's; an ipcache entry, or
  a service backend, lies in a pod CIDR of its own cluster or is one of its nodes' addresses. The local cluster
  wins every conflict; otherwise the first claim holds.

A value that breaks a rule raises `InvalidValue` (or `NotOwned`, which carries the decoded value so that its reader
can hold it and admit it later, when ownership changes) with a reason that starts with a short, stable phrase (the
metric label). So a rogue or broken cluster can publish nothing that reaches another cluster's addresses: it can
damage nothing but its own entries.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from clustermesh.model import keys, wire
from clustermesh.model.addresses import canonical_ip
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import InvalidValue, NotOwned
from clustermesh.model.identities import RESERVED_MAX, identity_range
from clustermesh.model.labels import CLUSTER_LABEL, Label, parse_label_string

__all__ = ["Claimant", "IdentityEntry", "NotOwned", "Ownership", "RemoteDecoders", "decoders_for"]


@dataclass(frozen=True)
class IdentityEntry:
    """An identity read from a cluster: its number and labels (the label string, parsed)."""

    id: int
    labels: tuple[Label, ...]
    text: str


@dataclass(frozen=True)
class RemoteDecoders:
    """Decoders for the four state prefixes of one cluster, and where each prefix's keys live."""

    cluster: ClusterInfo
    node: Callable[[str, bytes], wire.Node]
    ip: Callable[[str, bytes], wire.IPIdentityPair]
    identity: Callable[[str, bytes], IdentityEntry]
    service: Callable[[str, bytes], wire.ClusterService]

    @property
    def prefixes(self) -> dict[str, str]:
        """State prefix (as in canaries) -> the key prefix to watch."""
        return {
            keys.NODES_PREFIX: keys.nodes_key_prefix(self.cluster.name),
            keys.IPCACHE_PREFIX: keys.ipcache_key_prefix(),
            keys.IDENTITIES_PREFIX: keys.identities_key_prefix(),
            keys.SERVICES_PREFIX: keys.services_key_prefix(self.cluster.name),
        }


def decoders_for(cluster: ClusterInfo) -> RemoteDecoders:
    """The validating decoders for values read from `cluster`'s etcd (each value alone; see `Ownership`)."""
    name, cluster_id = cluster.name, cluster.id
    own = identity_range(cluster_id, cluster.max_connected_clusters)
    first, last = own.first, own.last
    decode_node = wire.decoder_for(wire.Node)
    decode_pair = wire.decoder_for(wire.IPIdentityPair)
    decode_service = wire.decoder_for(wire.ClusterService)

    def node(key: str, data: bytes) -> wire.Node:
        key_cluster, key_name = keys.parse_node_key(key)
        if key_cluster != name:
            raise InvalidValue(key, f"cluster name mismatch: the key names {key_cluster!r}, it came from {name!r}")
        value = decode_node(key, data)
        if value.Cluster != name:
            raise InvalidValue(key, f"cluster name mismatch: the node says {value.Cluster!r}, it came from {name!r}")
        if value.ClusterID != cluster_id:
            raise InvalidValue(key, f"cluster ID mismatch: the node says {value.ClusterID}, {name} is {cluster_id}")
        if key_name != value.Name:
            raise InvalidValue(key, f"name does not match key: the node is called {value.Name!r}")
        return value

    raw_pair = msgspec.json.Decoder(wire.IPIdentityPair).decode
    ip_of_key = keys.ip_of_checked_key  # the store lists the ipcache prefix: a key that is not an IP matches no value

    def ip(key: str, data: bytes) -> wire.IPIdentityPair:
        # The ipcache is the hot path (one entry per endpoint): the decoder is called directly, and only its
        # failures go through the wrapper that turns them into InvalidValue.
        try:
            value: wire.IPIdentityPair = raw_pair(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            value = decode_pair(key, data)  # raises InvalidValue with the reason
        if value.Mask is None:
            if ip_of_key(key) != value.IP:
                raise InvalidValue(key, f"IP does not match key: the entry is for {value.key_name()}")
        elif ip_of_key(key) != value.key_name():
            raise InvalidValue(key, f"IP does not match key: the entry is for {value.key_name()}")
        number = value.ID
        if first <= number <= last or 0 < number <= RESERVED_MAX:
            return value
        raise InvalidValue(key, f"identity out of range: {number} is not in {name}'s range {own}")

    def identity(key: str, data: bytes) -> IdentityEntry:
        number = keys.parse_identity_key(key)
        if number not in own:
            raise InvalidValue(key, f"identity out of range: {number} is not in {name}'s range {own}")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise InvalidValue(key, "malformed labels: not UTF-8") from None
        labels = tuple(parse_label_string(text))
        if not labels:
            raise InvalidValue(key, "malformed labels: no labels")
        entry = IdentityEntry(number, labels, text)
        cluster_label = [label for label in labels if label.key == CLUSTER_LABEL]
        if not cluster_label or cluster_label[0].source != "k8s" or cluster_label[0].value != name:
            found = cluster_label[0].value if cluster_label else "none"
            raise InvalidValue(key, f"cluster label mismatch: {CLUSTER_LABEL} is {found!r}, expected {name!r}")
        return entry

    def service(key: str, data: bytes) -> wire.ClusterService:
        key_cluster, namespace, service_name = keys.parse_service_key(key)
        if key_cluster != name:
            raise InvalidValue(key, f"cluster name mismatch: the key names {key_cluster!r}, it came from {name!r}")
        value = decode_service(key, data)
        if value.cluster != name:
            raise InvalidValue(key, f"cluster name mismatch: the service says {value.cluster!r}, it came from {name!r}")
        if value.clusterID != cluster_id:
            raise InvalidValue(key, f"cluster ID mismatch: the service says {value.clusterID}, {name} is {cluster_id}")
        if (namespace, service_name) != (value.namespace, value.name):
            raise InvalidValue(key, f"name does not match key: the service is {value.namespace}/{value.name}")
        return value

    return RemoteDecoders(cluster, node, ip, identity, service)


# --- ownership: which cluster owns which addresses of the flat network


@dataclass(frozen=True, order=True)
class Claimant:
    """A node that claims addresses: its cluster and its name."""

    cluster: str
    node: str

    def __str__(self) -> str:
        return f"{self.cluster}/{self.node}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Ranges:
    """Disjoint address ranges of one IP family, each with its claimant, sorted by their first address: an
    address's owner is found by bisection (the ipcache asks once per entry, a million times at scale)."""

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.lasts: list[int] = []
        self.owners: list[Claimant] = []

    def owner(self, address: int) -> Claimant | None:
        index = bisect.bisect_right(self.firsts, address) - 1
        if index >= 0 and address <= self.lasts[index]:
            return self.owners[index]
        return None

    def overlapping(self, first: int, last: int) -> list[Claimant]:
        """Claimants of the ranges that share an address with [first, last]."""
        found = []
        index = bisect.bisect_right(self.firsts, last) - 1
        while index >= 0 and self.lasts[index] >= first:  # disjoint and sorted: the lasts are sorted too
            found.append(self.owners[index])
            index -= 1
        return found

    def add(self, first: int, last: int, owner: Claimant) -> None:
        index = bisect.bisect_left(self.firsts, first)
        self.firsts.insert(index, first)
        self.lasts.insert(index, last)
        self.owners.insert(index, owner)

    def remove(self, first: int) -> None:
        index = bisect.bisect_left(self.firsts, first)
        if index < len(self.firsts) and self.firsts[index] == first:
            del self.firsts[index], self.lasts[index], self.owners[index]


@dataclass(frozen=True)
class _Claim:
    networks: tuple[Network, ...]
    ips: tuple[str, ...]


def _node_networks(node: wire.Node) -> list[Network]:
    found: list[Network] = []
    for cidr in (node.IPv4AllocCIDR, *(node.IPv4SecondaryAllocCIDRs or ()), node.IPv6AllocCIDR,
                 *(node.IPv6SecondaryAllocCIDRs or ())):  # fmt: skip
        if cidr is not None:
            found.append(cidr.network())
    return found


def _node_ips(node: wire.Node) -> list[str]:
    ips = [address.IP for address in node.IPAddresses or ()]
    ips += [ip for ip in (node.IPv4HealthIP, node.IPv6HealthIP, node.IPv4IngressIP, node.IPv6IngressIP) if ip]
    return sorted({canonical_ip(ip) for ip in ips})


def _address(ip: str) -> tuple[int, int]:
    """(IP version, the address as an integer) of a valid address."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")


class Ownership:
    """Who owns which pod CIDR and node address of the flat network, from the nodes admitted so far.

    A node's pod CIDRs must lie inside the mesh's pod supernets and overlap no pod CIDR of another node; its
    addresses must be no other cluster's node address and lie in no other cluster's pod CIDR. The first claim
    holds, with one exception: the local cluster's nodes always win, and a remote claim they overlap is taken
    back (`take_changes` names it, and the agent evicts it). An ipcache entry or a service backend must lie in a
    pod CIDR of its own cluster, or be one of its nodes' addresses.

    Every rule breaks with `NotOwned` (the value is held, not forgotten) except a pod CIDR outside the supernets,
    which no change of ownership can fix (`InvalidValue`).
    """

    def __init__(self, local_cluster: str, supernets: Iterable[str]) -> None:
        self.local_cluster = local_cluster
        self.supernets: tuple[Network, ...] = tuple(ipaddress.ip_network(s, strict=False) for s in supernets)
        self._ranges = {4: _Ranges(), 6: _Ranges()}
        self._ips: dict[str, Claimant] = {}  # canonical node address -> its node
        self._claims: dict[Claimant, _Claim] = {}
        self._pinned: dict[Claimant, wire.Node] = {}
        #: Remote claims the local cluster took over since the last `take_changes`, with the reason.
        self._evicted: dict[Claimant, str] = {}
        #: Clusters that lost addresses since the last `take_changes`: their entries are checked again.
        self._shrunk: set[str] = set()
        self._changed = False
        #: (first, last, cluster) of the IPv4 pod CIDR the last admitted endpoint lay in (endpoints come in runs)
        self._last_hit: tuple[int, int, str] | None = None
        #: Called after every change of ownership (the agent schedules its reconciliation there).
        self.on_change: Callable[[], None] | None = None

    # --- nodes

    def admit_node(self, cluster: str, key: str, node: wire.Node) -> None:
        """Check `node`'s claims and take them (replacing the node's earlier ones); raise if it may not."""
        claimant = Claimant(cluster, node.Name)
        networks = _node_networks(node)
        for network in networks:
            if not any(network.version == s.version and network.subnet_of(s) for s in self.supernets):  # type: ignore[arg-type]
                inside = ", ".join(map(str, self.supernets)) or "nothing"
                raise InvalidValue(key, f"pod CIDR outside the mesh: {network} is not inside {inside}")
        ips = _node_ips(node)
        local = cluster == self.local_cluster
        losers: dict[Claimant, str] = {}
        for network in networks:
            span = (int(network.network_address), int(network.broadcast_address))
            for holder in self._ranges[network.version].overlapping(*span):
                if holder == claimant:
                    continue
                if local and holder.cluster != cluster:
                    losers.setdefault(
                        holder, f"pod CIDR conflict: {network} overlaps a pod CIDR of {claimant} (local: it wins)"
                    )
                else:
                    raise NotOwned(key, f"pod CIDR conflict: {network} overlaps a pod CIDR of {holder}", node)
        for ip in ips:
            version, number = _address(ip)
            holders = (("an address of", self._ips.get(ip)), ("in a pod CIDR of", self._ranges[version].owner(number)))
            for what, other in holders:
                if other is None or other.cluster == cluster:
                    continue
                if local:
                    losers.setdefault(
                        other, f"node address conflict: {ip} is an address of {claimant} (local: it wins)"
                    )
                else:
                    raise NotOwned(key, f"node address conflict: {ip} is {what} {other}", node)
        claim = _Claim(tuple(networks), tuple(ips))
        if self._claims.get(claimant) == claim and not losers:
            return
        for loser, reason in losers.items():
            self._release(loser)
            self._evicted[loser] = reason
        self._release(claimant)
        self._take(claimant, claim)
        self._touch()

    def pin_node(self, cluster: str, node: wire.Node) -> None:
        """Claim a node's addresses before any store says so, and keep them when its published node goes (the
        agent's own node: known from its settings)."""
        self._pinned[Claimant(cluster, node.Name)] = node
        self.admit_node(cluster, keys.node_key(cluster, node.Name), node)

    def release_node(self, cluster: str, name: str) -> None:
        """The node is gone (deleted, evicted, drained): its addresses are free."""
        claimant = Claimant(cluster, name)
        if claimant not in self._claims:
            return
        self._release(claimant)
        pinned = self._pinned.get(claimant)
        if pinned is not None:
            self.admit_node(cluster, keys.node_key(cluster, name), pinned)
        self._touch()

    def _take(self, claimant: Claimant, claim: _Claim) -> None:
        for network in claim.networks:
            self._ranges[network.version].add(int(network.network_address), int(network.broadcast_address),
                                              claimant)  # fmt: skip
        for ip in claim.ips:
            self._ips.setdefault(ip, claimant)
        self._claims[claimant] = claim

    def _release(self, claimant: Claimant) -> None:
        claim = self._claims.pop(claimant, None)
        if claim is None:
            return
        for network in claim.networks:
            self._ranges[network.version].remove(int(network.network_address))
        for ip in claim.ips:
            if self._ips.get(ip) == claimant:
                del self._ips[ip]
        self._shrunk.add(claimant.cluster)

    def _touch(self) -> None:
        self._last_hit = None
        self._changed = True
        if self.on_change is not None:
            self.on_change()

    def take_changes(self) -> tuple[dict[Claimant, str], set[str], bool]:
        """What changed since the last call: claims taken over (to evict), clusters that lost addresses (to check
        again), and whether anything changed at all (held entries may fit now)."""
        changes = (self._evicted, self._shrunk, self._changed)
        self._evicted, self._shrunk, self._changed = {}, set(), False
        return changes

    # --- addresses

    def owner(self, ip: str) -> Claimant | None:
        """The node whose pod CIDR holds `ip`, or whose address it is."""
        version, number = _address(ip)
        return self._ranges[version].owner(number) or self._ips.get(canonical_ip(ip))

    def owns(self, cluster: str, ip: str) -> bool:
        owner = self.owner(ip)
        return owner is not None and owner.cluster == cluster

    def admit_ip(self, cluster: str, key: str, pair: wire.IPIdentityPair) -> None:
        """An ipcache entry's address (or every address of its CIDR) must be its cluster's."""
        self.ip_admitter(cluster)(key, pair)

    def ip_admitter(self, cluster: str) -> Callable[[str, wire.IPIdentityPair], None]:
        """`admit_ip` for one cluster, for its reader's hot path (one call per endpoint of the mesh): an IPv4 host
        entry inside the pod CIDR the previous one hit costs one conversion and two comparisons."""
        to_number, aton = int.from_bytes, socket.inet_aton

        def admit(key: str, pair: wire.IPIdentityPair) -> None:
            ip = pair.IP
            if pair.Mask is None:
                hit = self._last_hit
                if hit is not None and hit[2] == cluster and "." in ip:
                    try:
                        if hit[0] <= to_number(aton(ip), "big") <= hit[1]:
                            return
                    except OSError:
                        pass
                if self.owns(cluster, ip):
                    self._remember_hit(cluster, ip)
                    return
                raise NotOwned(key, f"address not owned: {ip} {self._whose(ip, cluster)}", pair)
            self._admit_cidr(cluster, key, pair)

        return admit

    def _admit_cidr(self, cluster: str, key: str, pair: wire.IPIdentityPair) -> None:
        network = ipaddress.ip_network(pair.key_name(), strict=False)
        first, last = str(network.network_address), str(network.broadcast_address)
        version, number = _address(first)
        owner = self._ranges[version].owner(number)
        if owner is None or owner.cluster != cluster or self._ranges[version].owner(_address(last)[1]) != owner:
            raise NotOwned(key, f"address not owned: {network} is not inside one pod CIDR of {cluster}", pair)

    def _remember_hit(self, cluster: str, ip: str) -> None:
        version, number = _address(ip)
        ranges = self._ranges[version]
        index = bisect.bisect_right(ranges.firsts, number) - 1
        if version == 4 and index >= 0 and number <= ranges.lasts[index]:
            self._last_hit = (ranges.firsts[index], ranges.lasts[index], cluster)

    def admit_service(self, cluster: str, key: str, service: wire.ClusterService) -> None:
        """Every backend of a service must be an address of its cluster."""
        for ip in service.backends or ():
            if not self.owns(cluster, ip):
                raise NotOwned(key, f"address not owned: backend {ip} {self._whose(ip, cluster)}", service)

    def _whose(self, ip: str, cluster: str) -> str:
        owner = self.owner(ip)
        if owner is None:
            return f"is in no pod CIDR and no node address of {cluster}"
        return f"belongs to {owner}, not to {cluster}"
