"""The etcd key layout of the mesh (Cilium's v1 layout, DESIGN section 4).

WARNING - STABLE API: these paths are read by other clusters' agents, by Cilium itself and by older and newer
versions of this project. Changing how a path is composed breaks upgrades, downgrades and interoperability.
Every key the project writes or reads is built or parsed here and nowhere else.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from clustermesh.model.errors import InvalidValue

__all__ = [
    "AGENT_WRITTEN_KINDS",
    "REGISTRY_PREFIX",
    "registry_kind_prefix",
    "CILIUM_PREFIX",
    "CLUSTER_CONFIG_PREFIX",
    "cluster_configs_prefix",
    "registry_prefix",
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
    "ip_key_name",
    "ip_of_checked_key",
    "service_key_name",
    "ipcache_key_prefix",
    "node_key",
    "nodes_key_prefix",
    "service_key",
    "services_key_prefix",
    "synced_key",
    "synced_key_prefix",
    "state_key_prefix",
    "registry_key",
    "parse_cluster_config_key",
    "parse_identity_key",
    "parse_ip_key",
    "parse_node_key",
    "parse_registry_key",
    "parse_service_key",
]

#: Every key of the mesh's state, its cluster-configs, canaries and heartbeat lives below this.
CILIUM_PREFIX = "cilium/"
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


def cluster_configs_prefix() -> str:
    return f"{CLUSTER_CONFIG_PREFIX}/"


def cluster_config_key(cluster: str) -> str:
    return f"{CLUSTER_CONFIG_PREFIX}/{cluster}"


def parse_cluster_config_key(key: str) -> str:
    """The cluster a cluster-config key names."""
    cluster = _suffix(key, f"{CLUSTER_CONFIG_PREFIX}/", "cluster-config")
    if not cluster or "/" in cluster:
        raise InvalidValue(key, "invalid cluster-config key: expected cilium/cluster-config/<cluster>")
    return cluster


def state_key_prefix() -> str:
    """Everything a cluster publishes for the mesh (what a remote user may read)."""
    return f"{STATE_PREFIX}/"


def synced_key_prefix(cluster: str) -> str:
    return f"{SYNCED_PREFIX}/{cluster}/"


def synced_key(cluster: str, prefix: str) -> str:
    """The canary written once the initial sync of `prefix` (e.g. NODES_PREFIX) by `cluster` is complete."""
    return f"{SYNCED_PREFIX}/{cluster}/{prefix}"


def nodes_key_prefix(cluster: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/"


def node_key(cluster: str, name: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/{name}"


def parse_node_key(key: str) -> tuple[str, str]:
    """(cluster, node name) of a node key."""
    cluster, sep, name = _suffix(key, f"{NODES_PREFIX}/", "node").partition("/")
    if not cluster or not sep or not name or "/" in name:
        raise InvalidValue(key, "invalid node key: expected cilium/state/nodes/v1/<cluster>/<name>")
    return cluster, name


def ipcache_key_prefix() -> str:
    return f"{IPCACHE_PREFIX}/{IPCACHE_ADDRESS_SPACE}/"


def ip_key_name(ip: str, prefix_length: int | None = None) -> str:
    """An ipcache entry's key below the ipcache prefix: `<ip>` for a host, `<ip>/<prefix length>` for a CIDR."""
    return ip if prefix_length is None else f"{ip}/{prefix_length}"


def ip_key(ip: str) -> str:
    return f"{IPCACHE_PREFIX}/{IPCACHE_ADDRESS_SPACE}/{ip}"


_IP_KEY_PREFIX = f"{IPCACHE_PREFIX}/{IPCACHE_ADDRESS_SPACE}/"
_IP_KEY_START = len(_IP_KEY_PREFIX)


#: The IP (or CIDR) of an ipcache key already checked by `parse_ip_key`: a slice in C, for the view's hot loops.
ip_of_checked_key: Callable[[str], str] = operator.itemgetter(slice(_IP_KEY_START, None))


def parse_ip_key(key: str) -> str:
    """The IP (`10.0.0.1`) or CIDR (`10.0.0.0/24`) an ipcache key names; not checked for syntax (its value's IP is
    compared with it). On the hot path: one entry per endpoint of the mesh."""
    if not key.startswith(_IP_KEY_PREFIX) or len(key) == _IP_KEY_START:
        raise InvalidValue(key, "invalid ipcache key: expected cilium/state/ip/v1/default/<ip>")
    return key[_IP_KEY_START:]


def identities_key_prefix() -> str:
    return f"{IDENTITIES_PREFIX}/id/"


def identity_key(identity: int) -> str:
    return f"{IDENTITIES_PREFIX}/id/{identity}"


def parse_identity_key(key: str) -> int:
    """The identity number an identity key names."""
    suffix = _suffix(key, f"{IDENTITIES_PREFIX}/id/", "identity")
    if not suffix.isdigit() or not suffix.isascii():
        raise InvalidValue(key, f"invalid identity key: {suffix!r} is not a number")
    return int(suffix)


def services_key_prefix(cluster: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/"


def service_key_name(namespace: str, name: str) -> str:
    """A service's key below its cluster's services prefix."""
    return f"{namespace}/{name}"


def service_key(cluster: str, namespace: str, name: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/{service_key_name(namespace, name)}"


def parse_service_key(key: str) -> tuple[str, str, str]:
    """(cluster, namespace, name) of a service key."""
    parts = _suffix(key, f"{SERVICES_PREFIX}/", "service").split("/")
    if len(parts) != 3 or not all(parts):
        raise InvalidValue(key, "invalid service key: expected cilium/state/services/v1/<cluster>/<namespace>/<name>")
    return parts[0], parts[1], parts[2]


def _suffix(key: str, prefix: str, what: str) -> str:
    if not key.startswith(prefix):
        raise InvalidValue(key, f"invalid {what} key: it does not start with {prefix}")
    return key[len(prefix) :]


# The standalone ResourceStore keeps Kubernetes-shaped objects under this prefix of the cluster's own etcd:
# `registry/<plural>/<namespace>/<name>` for namespaced kinds, `registry/<plural>/<name>` for cluster-wide ones.
REGISTRY_PREFIX = "registry"

# The kinds a node agent writes itself (DESIGN section 3); its etcd role may write nothing else.
AGENT_WRITTEN_KINDS = ("ciliumnodes", "ciliumendpoints", "ciliumidentities")


def registry_prefix() -> str:
    return f"{REGISTRY_PREFIX}/"


def registry_kind_prefix(plural: str) -> str:
    return f"{REGISTRY_PREFIX}/{plural}/"


def registry_key(plural: str, name: str, namespace: str | None = None) -> str:
    """`registry/<plural>/<namespace>/<name>` for a namespaced kind, `registry/<plural>/<name>` otherwise."""
    if namespace is not None:
        return f"{REGISTRY_PREFIX}/{plural}/{namespace}/{name}"
    return f"{REGISTRY_PREFIX}/{plural}/{name}"


def parse_registry_key(plural: str, key: str, *, namespaced: bool) -> tuple[str | None, str]:
    """(namespace or None, name) of a registry key of the kind `plural`."""
    parts = _suffix(key, registry_kind_prefix(plural), plural).split("/")
    if len(parts) != (2 if namespaced else 1) or not all(parts):
        shape = "<namespace>/<name>" if namespaced else "<name>"
        raise InvalidValue(key, f"invalid {plural} key: expected {registry_kind_prefix(plural)}{shape}")
    return (parts[0], parts[1]) if namespaced else (None, parts[0])
