"""The Kubernetes-shaped kinds the mesh reads and writes, and where each lives.

An object is a plain JSON-like dict, as Kubernetes serves it (`apiVersion`, `kind`, `metadata`, and the kind's own
fields). The registry below is the one place that knows, per kind, its API group and version, its plural (the REST
path segment, and the folder of the standalone store), and whether it is namespaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustermesh.model.errors import ModelError

__all__ = ["KINDS", "Kind", "Object", "UnknownKind", "kind_by_name", "resolve_kind"]

Object = dict[str, Any]


class UnknownKind(ModelError):
    """A kind (or plural, or short name) the mesh does not know."""


@dataclass(frozen=True)
class Kind:
    name: str  # CiliumNode
    group: str  # "" for the core group
    version: str
    plural: str  # ciliumnodes
    namespaced: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        """The REST path of the collection (all namespaces when `namespace` is None)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"


KINDS: tuple[Kind, ...] = (
    Kind("Namespace", "", "v1", "namespaces", False, ("ns",)),
    Kind("Service", "", "v1", "services", True, ("svc",)),
    Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True, ()),
    Kind("CiliumNode", "cilium.io", "v2", "ciliumnodes", False, ("cn", "ciliumnode")),
    Kind("CiliumEndpoint", "cilium.io", "v2", "ciliumendpoints", True, ("cep", "ciliumep")),
    Kind("CiliumIdentity", "cilium.io", "v2", "ciliumidentities", False, ("ciliumid",)),
    Kind("CiliumNetworkPolicy", "cilium.io", "v2", "ciliumnetworkpolicies", True, ("cnp", "ciliumnp")),
    Kind("CiliumClusterwideNetworkPolicy", "cilium.io", "v2", "ciliumclusterwidenetworkpolicies", False, ("ccnp",)),
    Kind("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies", True, ("netpol",)),
    # Access to a remote cluster, handed over by `clustermesh connect`: a kind of ours, not Kubernetes' nor Cilium's.
    Kind("ClusterMeshRemote", "clustermesh.io", "v1", "clustermeshremotes", False, ("remote", "remotes")),
)

_BY_NAME = {kind.name: kind for kind in KINDS}
_ALIASES = {
    alias.lower(): kind
    for kind in KINDS
    for alias in (kind.name, kind.plural, kind.plural.rstrip("s"), *kind.short_names)
}


def kind_by_name(name: str) -> Kind:
    """The kind called exactly `name` (an object's `kind` field)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise UnknownKind(f"unknown kind {name!r}; the mesh knows {known}") from None


def resolve_kind(text: str) -> Kind:
    """A kind from what a person types: `CiliumNode`, `ciliumnodes`, `ciliumnode`, `cn`, `svc`, ..."""
    kind = _ALIASES.get(text.lower())
    if kind is None:
        known = ", ".join(sorted(k.plural for k in KINDS))
        raise UnknownKind(f"unknown resource type {text!r}; try one of: {known}")
    return kind
