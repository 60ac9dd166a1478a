"""What the page shows, from flows and statuses: pure functions, so the page's content is tested without a browser.

A workload is a cluster, a namespace and the endpoint's `app` label (or its pod name, or its reserved label, or its
address): flows between workloads are the graph's edges, counted by verdict, with the drop reasons seen. A Service
is a node of its own (`kind: service`, in the cluster of the client that connected to it): a translated connect()
is an edge from the client to the Service and one from the Service to the chosen backend, in whichever cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["flow_row", "graph", "workload"]


def _app(labels: Iterable[str]) -> str | None:
    for label in labels:
        key, _, value = label.partition(":")[2].partition("=")
        if key == "app":
            return value
    return None


def workload(endpoint: dict[str, Any], ip: str) -> dict[str, str]:
    """The graph node of one side of a flow."""
    labels = endpoint.get("labels") or []
    cluster = str(endpoint.get("cluster_name") or "")
    namespace = str(endpoint.get("namespace") or "")
    reserved = next((label for label in labels if label.startswith("reserved:")), None)
    name = _app(labels) or endpoint.get("pod_name") or reserved or ip
    label = f"app={name}" if _app(labels) else str(name)
    return {"id": "/".join(part for part in (cluster or "?", namespace or "-", label)), "cluster": cluster or "?",
            "namespace": namespace, "label": label}  # fmt: skip


def flow_row(document: dict[str, Any]) -> dict[str, Any]:
    """One row of the flow table."""
    flow = document.get("flow") or {}
    ip = flow.get("IP") or {}
    l4: dict[str, Any] = next(iter((flow.get("l4") or {}).values()), {})
    protocol = next(iter(flow.get("l4") or {}), flow.get("Summary", ""))
    source = workload(flow.get("source") or {}, str(ip.get("source", "")))
    destination = workload(flow.get("destination") or {}, str(ip.get("destination", "")))
    return {
        "time": str(document.get("time", "")), "node": str(document.get("node_name", "")),
        "source": source["id"], "source_ip": ip.get("source", ""), "destination": destination["id"],
        "destination_ip": ip.get("destination", ""), "port": l4.get("destination_port", ""),
        "protocol": protocol, "verdict": flow.get("verdict", ""), "reason": flow.get("drop_reason_desc", ""),
        "direction": flow.get("traffic_direction", ""),
    }  # fmt: skip


def service_node(flow: dict[str, Any], client: dict[str, str]) -> dict[str, str]:
    """The graph node of the Service a trace-sock flow went through."""
    service = flow.get("service") or {}
    name = str(service.get("name") or service.get("frontend") or "?")
    namespace, _, short = name.rpartition("/")
    return {"id": f"{client['cluster']}/svc/{name}", "cluster": client["cluster"], "namespace": namespace,
            "label": f"svc {short}", "kind": "service"}  # fmt: skip


def graph(documents: Iterable[dict[str, Any]], clusters: Iterable[str] = ()) -> dict[str, Any]:
    """Workloads and Services (by cluster) and the edges between them, each with its counts by verdict and its drop
    reasons. A flow seen by both nodes (leaving one, entering the other) counts once per observer."""
    nodes: dict[str, dict[str, str]] = {}
    edges: dict[tuple[str, str], dict[str, Any]] = {}

    def count(source: dict[str, str], destination: dict[str, str], flow: dict[str, Any]) -> None:
        nodes.setdefault(source["id"], source)
        nodes.setdefault(destination["id"], destination)
        edge = edges.setdefault((source["id"], destination["id"]),
                                {"source": source["id"], "destination": destination["id"], "forwarded": 0,
                                 "dropped": 0, "reasons": []})  # fmt: skip
        if flow.get("verdict") == "DROPPED":
            edge["dropped"] += 1
            reason = flow.get("drop_reason_desc") or str(flow.get("drop_reason", ""))
            if reason and reason not in edge["reasons"]:
                edge["reasons"].append(reason)
        else:
            edge["forwarded"] += 1

    for document in documents:
        flow = document.get("flow") or {}
        ip = flow.get("IP") or {}
        if flow.get("is_reply"):
            continue
        source = workload(flow.get("source") or {}, str(ip.get("source", "")))
        if flow.get("Type") == "SOCK":
            service = service_node(flow, source)
            count(source, service, flow)
            if flow.get("verdict") != "DROPPED":
                backend_cluster = str((flow.get("service") or {}).get("backend_cluster") or "")
                destination = workload({"cluster_name": backend_cluster, **(flow.get("destination") or {})},
                                       str(ip.get("destination", "")))  # fmt: skip
                count(service, destination, flow)
            continue
        destination = workload(flow.get("destination") or {}, str(ip.get("destination", "")))
        count(source, destination, flow)
    names = sorted({*clusters, *(n["cluster"] for n in nodes.values())})
    return {"clusters": names, "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
            "edges": sorted(edges.values(), key=lambda e: (e["source"], e["destination"]))}  # fmt: skip
