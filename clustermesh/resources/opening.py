"""The ResourceStore a program runs on, by its `--source`: the same choice for the apiserver and the agent."""

from __future__ import annotations

from clustermesh.resources.standalone import StandaloneStore
from clustermesh.resources.store import ResourceStore
from kvstore.backend import Backend

__all__ = ["open_resource_store"]


def open_resource_store(
    source: str, backend: Backend, kubeconfig: str | None = None, context: str | None = None
) -> ResourceStore:
    """`standalone`: objects in the cluster's etcd (`backend`); `kubernetes`: the API server of the kubeconfig
    (imported only then: hosts without Kubernetes do not need its client). Close it when done."""
    if source == "standalone":
        return StandaloneStore(backend)
    from clustermesh.resources.kubernetes import KubernetesStore

    store: ResourceStore = KubernetesStore.from_kubeconfig(kubeconfig, context)
    return store
