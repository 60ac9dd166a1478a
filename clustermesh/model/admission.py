"""What a reader accepts from a remote cluster: the checks of DESIGN section 4, one decoder per state prefix.

Each decoder turns (key, value) read from cluster C's etcd into a wire value, or raises `InvalidValue` with a reason
that starts with a short, stable phrase (the metric label): a value that does not decode, a node or service that
names another cluster or another cluster ID, a node whose name is not its key, an ipcache entry whose IP is not its
key or whose identity is outside C's range (reserved identities below 256 are shared and allowed), an identity
outside C's range or whose labels do not carry C's name. A rogue or buggy cluster can then damage nothing but its
own entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from clustermesh.model import keys, wire
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import InvalidValue
from clustermesh.model.identities import RESERVED_MAX, identity_range
from clustermesh.model.labels import CLUSTER_LABEL, Label, parse_label_string

__all__ = ["IdentityEntry", "RemoteDecoders", "decoders_for"]


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
    """The validating decoders for values read from `cluster`'s etcd."""
    name, cluster_id = cluster.name, cluster.id
    own = identity_range(cluster_id, cluster.max_connected_clusters)
    first, last = own.first, own.last
    decode_node = wire.decoder_for(wire.Node)
    decode_pair = wire.decoder_for(wire.IPIdentityPair)
    decode_service = wire.decoder_for(wire.ClusterService)
    node_prefix = keys.nodes_key_prefix(name)
    ip_prefix = keys.ipcache_key_prefix()
    identity_prefix = keys.identities_key_prefix()
    service_prefix = keys.services_key_prefix(name)

    def node(key: str, data: bytes) -> wire.Node:
        value = decode_node(key, data)
        if value.Cluster != name:
            raise InvalidValue(key, f"cluster name mismatch: the node says {value.Cluster!r}, it came from {name!r}")
        if value.ClusterID != cluster_id:
            raise InvalidValue(key, f"cluster ID mismatch: the node says {value.ClusterID}, {name} is {cluster_id}")
        if key[len(node_prefix) :] != value.Name:
            raise InvalidValue(key, f"name does not match key: the node is called {value.Name!r}")
        return value

    ip_prefix_length = len(ip_prefix)
    raw_pair = msgspec.json.Decoder(wire.IPIdentityPair).decode

    def ip(key: str, data: bytes) -> wire.IPIdentityPair:
        # The ipcache is the hot path (one entry per endpoint): the decoder is called directly, and only its
        # failures go through the wrapper that turns them into InvalidValue.
        try:
            value: wire.IPIdentityPair = raw_pair(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            value = decode_pair(key, data)  # raises InvalidValue with the reason
        if value.Mask is None:
            if key[ip_prefix_length:] != value.IP:
                raise InvalidValue(key, f"IP does not match key: the entry is for {value.key_name()}")
        elif key[ip_prefix_length:] != value.key_name():
            raise InvalidValue(key, f"IP does not match key: the entry is for {value.key_name()}")
        number = value.ID
        if not (first <= number <= last or 0 < number <= RESERVED_MAX):
            raise InvalidValue(key, f"identity out of range: {number} is not in {name}'s range {own}")
        return value

    def identity(key: str, data: bytes) -> IdentityEntry:
        suffix = key[len(identity_prefix) :]
        if not suffix.isdigit():
            raise InvalidValue(key, f"invalid identity key: {suffix!r} is not a number")
        number = int(suffix)
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
        value = decode_service(key, data)
        if value.cluster != name:
            raise InvalidValue(key, f"cluster name mismatch: the service says {value.cluster!r}, it came from {name!r}")
        if value.clusterID != cluster_id:
            raise InvalidValue(key, f"cluster ID mismatch: the service says {value.clusterID}, {name} is {cluster_id}")
        if key[len(service_prefix) :] != f"{value.namespace}/{value.name}":
            raise InvalidValue(key, f"name does not match key: the service is {value.namespace}/{value.name}")
        return value

    return RemoteDecoders(cluster, node, ip, identity, service)
