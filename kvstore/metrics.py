"""The kvstore's Prometheus metrics, built on a registry the caller passes in (never the global one).

Tests assert on them with `registry.get_sample_value(...)`; processes expose their registry over HTTP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["KVStoreMetrics"]


class KVStoreMetrics:
    """Ours (`clustermesh_kvstore_*{store}`), and Cilium's by its names (`cilium_kvstore_*` in an agent,
    `cilium_clustermesh_apiserver_kvstore_*` in the apiserver) with its labels: `scope` and `source_cluster`, taken
    from a store's name (`c2/nodes` in an agent, `nodes` with the local cluster in the apiserver)."""

    def __init__(self, registry: CollectorRegistry, *, namespace: str = "clustermesh",
                 cilium_prefix: str = "cilium_kvstore", source_cluster: str = "") -> None:  # fmt: skip
        self.source_cluster = source_cluster
        self.cilium_sync_queue = Gauge(
            f"{cilium_prefix}_sync_queue_size", "Keys waiting to be written (Cilium's name)",
            ["scope", "source_cluster"], registry=registry,
        )  # fmt: skip
        self.cilium_initial_sync = Gauge(
            f"{cilium_prefix}_initial_sync_completed", "1 once a store's initial sync completed (Cilium's name)",
            ["scope", "source_cluster", "action"], registry=registry,
        )  # fmt: skip
        self.sync_queue = Gauge(
            "kvstore_sync_queue_size", "Keys waiting to be written by a sync store", ["store"],
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.initial_sync_done = Gauge(
            "kvstore_initial_sync_completed", "1 once a store finished its initial sync", ["store"],
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "kvstore_errors", "Failed kvstore operations by store and reason", ["store", "reason"],
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.entries = Gauge(
            "kvstore_entries", "Entries held by a watch store", ["store"],
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "kvstore_rejected_entries", "Values a watch store rejected, by reason", ["store", "reason"],
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.events = Counter(
            "kvstore_events", "Upserts and deletes a watch store passed on", ["store", "action"],
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.relists = Counter(
            "kvstore_relists", "Times a watch store listed its prefix again, by cause", ["store", "cause"],
            namespace=namespace, registry=registry,
        )  # fmt: skip

    def _cilium_labels(self, store: str) -> tuple[str, str]:
        cluster, _, scope = store.rpartition("/")
        return scope, cluster or self.source_cluster

    def queue_size(self, store: str, size: int) -> None:
        self.sync_queue.labels(store).set(size)
        self.cilium_sync_queue.labels(*self._cilium_labels(store)).set(size)

    def initial_sync_completed(self, store: str, action: str) -> None:
        """`action`: `write` for a writer's first full sync, `read` for a reader's first list."""
        if action == "write":
            self.initial_sync_done.labels(store).set(1)
        self.cilium_initial_sync.labels(*self._cilium_labels(store), action).set(1)
