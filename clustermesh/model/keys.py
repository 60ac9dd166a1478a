"""The etcd key layout of the mesh (Cilium's v1 layout, DESIGN section 4).

WARNING - STABLE API: these paths are read by other clusters' agents, by Cilium itself and by older and newer
versions of this project. Changing how a path is composed breaks upgrades, downgrades and interoperability.
Every key the project writes or reads is built or parsed here and nowhere else.
"""

from __future__ import annotations

__all__ = [
    "AGENT_WRITTEN_KINDS",
    "REGISTRY_PREFIX",
    "registry_kind_prefix",
    "CLUSTER_CONFIG_PREFIX",
    "HEARTBEAT_KEY",
    "IDENTITIES_PREFIX",
    "IPCACHE_PREFIX",
    "NODES_PREFIX",
    "SERVICES_PREFIX",
    "STATE_PREFIX",
    "SYNCED_PREFIX",
    "cluster_config_key",
    "identities_key_prefix",
    "identity_key",
    "ip_key",
    "ipcache_key_prefix",
    "node_key",
    "nodes_key_prefix",
    "service_key",
    "services_key_prefix",
    "synced_key",
]

STATE_PREFIX = "cilium/state"
CLUSTER_CONFIG_PREFIX = "cilium/cluster-config"
NODES_PREFIX = "cilium/state/nodes/v1"
IPCACHE_PREFIX = "cilium/state/ip/v1"
IDENTITIES_PREFIX = "cilium/state/identities/v1"
SERVICES_PREFIX = "cilium/state/services/v1"
SYNCED_PREFIX = "cilium/synced"
HEARTBEAT_KEY = "cilium/.heartbeat"

# The ipcache has address spaces; Cilium only ever uses "default".
IPCACHE_ADDRESS_SPACE = "default"


def cluster_config_key(cluster: str) -> str:
    return f"{CLUSTER_CONFIG_PREFIX}/{cluster}"


def synced_key(cluster: str, prefix: str) -> str:
    """The canary written once the initial sync of `prefix` (e.g. NODES_PREFIX) by `cluster` is complete."""
    return f"{SYNCED_PREFIX}/{cluster}/{prefix}"


def nodes_key_prefix(cluster: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/"


def node_key(cluster: str, name: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/{name}"


def ipcache_key_prefix() -> str:
    return f"{IPCACHE_PREFIX}/{IPCACHE_ADDRESS_SPACE}/"


def ip_key(ip: str) -> str:
    return f"{IPCACHE_PREFIX}/{IPCACHE_ADDRESS_SPACE}/{ip}"


def identities_key_prefix() -> str:
    return f"{IDENTITIES_PREFIX}/id/"


def identity_key(identity: int) -> str:
    return f"{IDENTITIES_PREFIX}/id/{identity}"


def services_key_prefix(cluster: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/"


def service_key(cluster: str, namespace: str, name: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/{namespace}/{name}"


# The standalone ResourceStore keeps Kubernetes-shaped objects under this prefix of the cluster's own etcd:
# `registry/<plural>/<namespace>/<name>` for namespaced kinds, `registry/<plural>/<name>` for cluster-wide ones.
REGISTRY_PREFIX = "registry"

# The kinds a node agent writes itself (DESIGN section 3); its etcd role may write nothing else.
AGENT_WRITTEN_KINDS = ("ciliumnodes", "ciliumendpoints", "ciliumidentities")


def registry_kind_prefix(plural: str) -> str:
    return f"{REGISTRY_PREFIX}/{plural}/"
