"""Numeric identities: which numbers belong to which cluster.

An identity is a 24-bit number. Its top bits carry the cluster ID, so every cluster allocates from its own range and
two clusters never hand out the same number (Cilium's layout):

    max-connected-clusters 255:  cluster ID in bits 16..23, range [id << 16, ((id + 1) << 16) - 1]
    max-connected-clusters 511:  cluster ID in bits 15..23, range [id << 15, ((id + 1) << 15) - 1]

Identities below 256 are reserved (host, world, health, ...) and the same in every cluster. Identities with bit 24
set are node-local (CIDR identities) and never leave a node. A reader checks that every identity a cluster publishes
is in that cluster's range or reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

from clustermesh.model.clusters import (
    DEFAULT_MAX_CONNECTED_CLUSTERS,
    validate_cluster_id,
    validate_max_connected_clusters,
)

__all__ = [
    "LOCAL_SCOPE_FLAG",
    "MINIMAL_ALLOCATION_OFFSET",
    "RESERVED_MAX",
    "IdentityRange",
    "cluster_id_of",
    "cluster_id_shift",
    "identity_range",
    "is_local_scope",
    "is_reserved",
]

RESERVED_MAX = 255
MINIMAL_ALLOCATION_OFFSET = 256  # the first allocatable number within a cluster's range
LOCAL_SCOPE_FLAG = 1 << 24
IDENTITY_BITS_MASK = (1 << 24) - 1


def cluster_id_shift(max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> int:
    """How far the cluster ID is shifted into an identity: 16 for a mesh of 255 clusters, 15 for 511."""
    validate_max_connected_clusters(max_connected_clusters)
    return 16 if max_connected_clusters == 255 else 15


@dataclass(frozen=True)
class IdentityRange:
    """The identities of one cluster, `first..last` inclusive; `allocatable` skips the reserved low numbers."""

    cluster_id: int
    first: int
    last: int

    def __contains__(self, identity: object) -> bool:
        return isinstance(identity, int) and self.first <= identity <= self.last

    @property
    def allocatable_first(self) -> int:
        return self.first + MINIMAL_ALLOCATION_OFFSET

    def __str__(self) -> str:
        return f"{self.first}..{self.last}"


def identity_range(cluster_id: int, max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> IdentityRange:
    validate_cluster_id(cluster_id, max_connected_clusters=max_connected_clusters)
    shift = cluster_id_shift(max_connected_clusters)
    return IdentityRange(cluster_id, cluster_id << shift, ((cluster_id + 1) << shift) - 1)


def cluster_id_of(identity: int, max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> int:
    """The cluster ID carried by a global identity (0 for reserved ones)."""
    return (identity & IDENTITY_BITS_MASK) >> cluster_id_shift(max_connected_clusters)


def is_reserved(identity: int) -> bool:
    return 0 < identity <= RESERVED_MAX


def is_local_scope(identity: int) -> bool:
    return bool(identity & LOCAL_SCOPE_FLAG)
