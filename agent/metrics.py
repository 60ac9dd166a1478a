"""The agent's Prometheus metrics, per connected cluster, on a registry the caller passes in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bpf.maps import EGRESS, Counters

__all__ = ["AgentMetrics", "CiliumClusterMeshMetrics", "DatapathCounters"]

#: Cilium's drop reasons as its metrics name them (`cilium_drop_count_total{reason}`).
DROP_REASON_TEXT = {133: "Policy denied", 181: "Policy denied by denylist"}


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry, *, namespace: str = "clustermesh") -> None:
        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, namespace=namespace, registry=registry)

        self.ready = gauge("remote_cluster_ready", "1 while a connected cluster is ready", ["cluster"])
        self.last_failure = gauge(
            "remote_cluster_last_failure_timestamp", "Unix time of a cluster's last failure", ["cluster"]
        )
        self.failures = Counter(
            "remote_cluster_failures", "Failed connections and sessions", ["cluster"], namespace=namespace,
            registry=registry,
        )  # fmt: skip
        self.entries = gauge("remote_cluster_entries", "Entries in the merged view by cluster and kind",
                             ["cluster", "kind"])  # fmt: skip
        self.rejected = gauge(
            "remote_cluster_rejected_entries", "Keys whose current value was rejected, by cluster and kind",
            ["cluster", "kind"],
        )  # fmt: skip
        self.propagation = Histogram(
            "remote_cluster_propagation_delay_seconds",
            "From an etcd change reaching the agent to the merged view and its subscribers",
            ["cluster"],
            namespace=namespace,
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.clusters = gauge("remote_clusters", "Configured clusters (the local one included)", [])
        self.config_problems = gauge(
            "config_problems", "Files of the clustermesh config directory that are not used (see status)", []
        )
        self.tls_reloads = Counter(
            "tls_reloads", "Rotated certificate files taken up by a running etcd session (ok) or not yet (failed)",
            ["cluster", "result"], namespace=namespace, registry=registry,
        )  # fmt: skip
        self.api_errors = Counter(
            "api_errors", "Errors the agent's local API answered (the CNI plugin's among them), by route and reason",
            ["route", "reason"], namespace=namespace, registry=registry,
        )  # fmt: skip


class DatapathCounters(Collector):
    """Cilium's packet counters, read from the datapath's per-CPU counters map at each scrape:
    `cilium_drop_count_total{reason,direction}` and `cilium_forward_count_total{direction}`."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        drops = CounterMetricFamily("cilium_drop_count", "Packets dropped, by reason and direction",
                                    labels=["reason", "direction"])  # fmt: skip
        forwards = CounterMetricFamily("cilium_forward_count", "Packets forwarded, by direction", labels=["direction"])
        totals: dict[str, int] = {"INGRESS": 0, "EGRESS": 0}
        for (reason, direction), count in sorted(self.counters.read().items()):
            name = "EGRESS" if direction == EGRESS else "INGRESS"
            if reason == 0:
                totals[name] += count
            else:
                drops.add_metric([DROP_REASON_TEXT.get(reason, f"reason {reason}"), name], count)
        for name, count in totals.items():
            forwards.add_metric([name], count)
        yield drops
        yield forwards


class PolicyProblems(Collector):
    """`clustermesh_policies_not_enforced{kind}`: policy objects this agent does not enforce (refused by the model,
    or skipped by the store as malformed), counted at each scrape."""

    def __init__(self, not_enforced: Callable[[], dict[str, str]]) -> None:
        self.not_enforced = not_enforced

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("clustermesh_policies_not_enforced", "Policy objects not enforced, by kind",
                                  labels=["kind"])  # fmt: skip
        kinds: dict[str, int] = {}
        for label in self.not_enforced():
            kind = label.partition(" ")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in sorted(kinds.items()):
            gauge.add_metric([kind], count)
        yield gauge


class RemoteClusterFacts(Protocol):
    name: str
    is_local: bool
    failures: int
    last_failure_time: float
    cache_revocations: int

    def ready(self) -> bool: ...


class CiliumClusterMeshMetrics(Collector):
    """Cilium agent's clustermesh metrics, by its names and labels (`source_cluster`, `source_node_name`,
    `target_cluster`), read from the remote clusters and the merged view at each scrape, so that Cilium's dashboards
    and alerts work unchanged."""

    def __init__(self, source_cluster: str, source_node: str, remotes: Callable[[], list[RemoteClusterFacts]],
                 counts: Callable[[str], dict[str, int]]) -> None:  # fmt: skip
        self.source = [source_cluster, source_node]
        self.remotes = remotes
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["source_cluster", "source_node_name", "target_cluster"]
        remotes = [r for r in self.remotes() if not r.is_local]
        total = GaugeMetricFamily("cilium_clustermesh_remote_clusters", "Remote clusters configured",
                                  labels=labels[:2])  # fmt: skip
        total.add_metric(self.source, len(remotes))
        yield total
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "readiness_status": GaugeMetricFamily("cilium_clustermesh_remote_cluster_readiness_status",
                                                  "1 while a remote cluster is ready", labels=labels),
            "failures": GaugeMetricFamily("cilium_clustermesh_remote_cluster_failures",
                                          "Failures of a remote cluster's connection", labels=labels),
            "last_failure_ts": GaugeMetricFamily("cilium_clustermesh_remote_cluster_last_failure_ts",
                                                 "Unix time of a remote cluster's last failure", labels=labels),
            "nodes": GaugeMetricFamily("cilium_clustermesh_remote_cluster_nodes", "Nodes of a remote cluster",
                                       labels=labels),
            "endpoints": GaugeMetricFamily("cilium_clustermesh_remote_cluster_endpoints",
                                           "Endpoints (ipcache entries) of a remote cluster", labels=labels),
            "services": GaugeMetricFamily("cilium_clustermesh_remote_cluster_services",
                                          "Global services a remote cluster exports", labels=labels),
            "cache_revocations": CounterMetricFamily("cilium_clustermesh_remote_cluster_cache_revocations",
                                                     "Times a remote cluster's services were drained after the "
                                                     "cache TTL", labels=labels),
        }  # fmt: skip
        for remote in sorted(remotes, key=lambda r: r.name):
            values = [*self.source, remote.name]
            counts = self.counts(remote.name)
            families["readiness_status"].add_metric(values, 1 if remote.ready() else 0)
            families["failures"].add_metric(values, remote.failures)
            families["last_failure_ts"].add_metric(values, remote.last_failure_time)
            families["nodes"].add_metric(values, counts.get("node", 0))
            families["endpoints"].add_metric(values, counts.get("ipcache", 0))
            families["services"].add_metric(values, counts.get("service", 0))
            families["cache_revocations"].add_metric(values, remote.cache_revocations)
        yield from families.values()
