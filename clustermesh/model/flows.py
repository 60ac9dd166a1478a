"""Flows as Hubble prints them: Cilium's names for drop reasons and protocols, and the one-line form of a flow.

Pure: the agent builds flows from datapath events (agent.flows), the CLI prints them (`clustermesh observe`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DROP_REASONS", "PROTOCOLS", "RESERVED", "compact"]

#: Cilium's drop reasons: code -> (the metric's text, the flow's enum name).
DROP_REASONS = {
    133: ("Policy denied", "POLICY_DENIED"),
    158: ("Service backend not found", "NO_SERVICE"),
    181: ("Policy denied by denylist", "POLICY_DENY"),
}
RESERVED = {1: "host", 2: "world", 4: "health", 6: "remote-node"}
PROTOCOLS = {6: "TCP", 17: "UDP", 1: "ICMPv4", 132: "SCTP"}


def compact(document: dict[str, Any]) -> str:
    """The one-line form: `time [node]: src (labels) -> dst (labels) verdict reason`."""
    flow = document["flow"]

    def side(endpoint: dict[str, Any], ip: str, port: int | None) -> str:
        where = f"{endpoint['namespace']}/{endpoint['pod_name']}" if endpoint.get("pod_name") else ip
        if port:
            where += f":{port}"
        labels = ",".join(label for label in endpoint.get("labels", []) if "io.cilium.k8s" not in label
                          and "io.kubernetes.pod.namespace" not in label)  # fmt: skip
        cluster = endpoint.get("cluster_name")
        return f"{where} ({labels or 'ID:' + str(endpoint.get('identity', 0))}{', ' + cluster if cluster else ''})"

    l4: dict[str, Any] = next(iter(flow.get("l4", {}).values()), {})
    when = flow["time"][11:23]
    if flow.get("Type") == "SOCK":  # a connect() to a Service: `pod -> ns/svc (frontend) => backend (cluster)`
        service = flow.get("service", {})
        target = f"{service.get('name') or '?'} ({service.get('frontend', '')})"
        if "backend" in service:
            chosen = side(flow["destination"], flow["IP"]["destination"], l4.get("destination_port"))
            target += f" => {chosen}" + (f" in {service['backend_cluster']}" if service.get("backend_cluster") else "")
        verdict = "post-xlate-fwd TRANSLATED" if flow["verdict"] == "TRANSLATED" else "DROPPED no backend"
        return (
            f"{when} [{flow['node_name']}]: {side(flow['source'], flow['IP']['source'], None)} -> {target} "
            f"{verdict} ({flow['Summary']})"
        )
    reason = DROP_REASONS.get(flow.get("drop_reason", 0), ("", ""))[0] if flow["verdict"] == "DROPPED" else ""
    return (
        f"{when} [{flow['node_name']}]: {side(flow['source'], flow['IP']['source'], l4.get('source_port'))} -> "
        f"{side(flow['destination'], flow['IP']['destination'], l4.get('destination_port'))} "
        f"{flow['Summary']} {flow['traffic_direction']} {flow['verdict']}" + (f" {reason}" if reason else "")
    )
