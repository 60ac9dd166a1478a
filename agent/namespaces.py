"""The labels of the cluster's namespaces, for the identities of their pods (a NetworkPolicy's namespaceSelector
matches them, as Cilium's `io.cilium.k8s.namespace.labels.*` security labels).

Kubernetes gives every namespace the label `kubernetes.io/metadata.name` (its name); so does this cache, also for
a namespace that has no object (the standalone store needs none).
"""

from __future__ import annotations

from clustermesh.model.kinds import Kind, Object
from clustermesh.resources.informing import object_ref

__all__ = ["NamespaceLabels"]

NAME_LABEL = "kubernetes.io/metadata.name"


class NamespaceLabels:
    """An informer Handler of Namespaces."""

    def __init__(self) -> None:
        self._labels: dict[str, dict[str, str]] = {}

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        self._labels[object_ref(obj)[1]] = {str(k): str(v) for k, v in labels.items()}

    def on_delete(self, kind: Kind, obj: Object) -> None:
        self._labels.pop(object_ref(obj)[1], None)

    def labels(self, namespace: str) -> dict[str, str]:
        return {**self._labels.get(namespace, {}), NAME_LABEL: namespace}
