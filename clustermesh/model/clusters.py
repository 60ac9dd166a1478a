"""Cluster names and IDs: the rules every cluster of a mesh must follow, checked in one place.

A cluster ID names the cluster in the datapath (it is in the top bits of every identity of the cluster), so two
clusters of one mesh must never share it, and every cluster must agree on how many clusters a mesh may hold
(`max-connected-clusters`, 255 or 511): it decides how many bits the ID takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clustermesh.model.errors import InvalidClusterInfo

__all__ = [
    "CLUSTER_NAME_MAX_LENGTH",
    "DEFAULT_MAX_CONNECTED_CLUSTERS",
    "MAX_CONNECTED_CLUSTERS_CHOICES",
    "ClusterInfo",
    "validate_cluster_id",
    "validate_cluster_name",
    "validate_max_connected_clusters",
]

CLUSTER_NAME_MAX_LENGTH = 32
CLUSTER_NAME_PATTERN = re.compile(r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$")
DEFAULT_MAX_CONNECTED_CLUSTERS = 255
MAX_CONNECTED_CLUSTERS_CHOICES = (255, 511)


def validate_cluster_name(name: str) -> str:
    """Return `name` if it is a valid cluster name, else raise with the rule it breaks."""
    if not name:
        raise InvalidClusterInfo("cluster name is empty")
    if len(name) > CLUSTER_NAME_MAX_LENGTH:
        raise InvalidClusterInfo(
            f"cluster name {name!r} is {len(name)} characters long; at most {CLUSTER_NAME_MAX_LENGTH} are allowed"
        )
    if not CLUSTER_NAME_PATTERN.match(name):
        raise InvalidClusterInfo(
            f"cluster name {name!r} is invalid: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_max_connected_clusters(value: int) -> int:
    if value not in MAX_CONNECTED_CLUSTERS_CHOICES:
        choices = ", ".join(map(str, MAX_CONNECTED_CLUSTERS_CHOICES))
        raise InvalidClusterInfo(f"max-connected-clusters is {value}; it must be one of {choices}")
    return value


def validate_cluster_id(cluster_id: int, *, max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS) -> int:
    """Return `cluster_id` if it is in 1..max_connected_clusters, else raise."""
    validate_max_connected_clusters(max_connected_clusters)
    if isinstance(cluster_id, bool) or not isinstance(cluster_id, int):
        raise InvalidClusterInfo(f"cluster ID {cluster_id!r} is not an integer")
    if not 1 <= cluster_id <= max_connected_clusters:
        raise InvalidClusterInfo(
            f"cluster ID {cluster_id} is out of range: it must be between 1 and {max_connected_clusters}"
            f" (max-connected-clusters={max_connected_clusters})"
        )
    return cluster_id


@dataclass(frozen=True)
class ClusterInfo:
    """The name, ID and mesh size of one cluster, valid by construction."""

    name: str
    id: int
    max_connected_clusters: int = DEFAULT_MAX_CONNECTED_CLUSTERS

    def __post_init__(self) -> None:
        validate_cluster_name(self.name)
        validate_cluster_id(self.id, max_connected_clusters=self.max_connected_clusters)
