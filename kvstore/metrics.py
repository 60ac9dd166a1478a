"""The kvstore's Prometheus metrics, built on a registry the caller passes in (never the global one).

Tests assert on them with `registry.get_sample_value(...)`; processes expose their registry over HTTP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["KVStoreMetrics"]


class KVStoreMetrics:
    def __init__(self, registry: CollectorRegistry, *, namespace: str = "clustermesh") -> None:
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
