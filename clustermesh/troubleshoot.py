"""`clustermesh troubleshoot`: per remote cluster, each hop from this node to it, in order, the first that fails
named with its evidence and the fix to apply.

The agent has already classified every failure into a stable code (`clustermesh.model.api`: each connection
attempt, TLS handshake, etcd answer, cluster-config check, canary, heartbeat, and its data-path probes); this places
that code on the hop where it happens. Hops before it passed (the connection got that far); hops after it were not
reached. A cluster with no problem passes every hop, the tunnel peer and the data path included when the node has
a datapath.
"""

from __future__ import annotations

from dataclasses import dataclass

from clustermesh.model.api import AgentStatus, ClusterStatus

__all__ = ["HOPS", "Hop", "diagnose", "diagnose_config_file"]

HOPS = ("name resolution", "TCP", "TLS", "certificate chain", "SAN and expiry", "etcd user and role",
        "cluster-config", "synced canaries", "heartbeat", "tunnel peer", "data path")  # fmt: skip

#: problem code -> (the hop where it happens, the fix)
FIXES: dict[str, tuple[str, str]] = {
    "dns": (
        "name resolution",
        "the endpoint's host name does not resolve here: fix the name in the cluster's config "
        "file, or use an IP address",
    ),
    "unreachable": (
        "TCP",
        "nothing accepts connections at the endpoint: check that etcd (or its load balancer) runs "
        "there, the port, routes and firewalls between this node and it",
    ),
    "plaintext": ("TLS", "the endpoint does not speak TLS: use https:// and etcd's TLS port"),
    "bad-tls-files": (
        "TLS",
        "the config's certificate, key or CA files are missing or do not belong together: "
        "`clustermesh connect` writes them again",
    ),
    "client-certificate-rejected": (
        "TLS",
        "etcd does not trust this node's client certificate: reissue it from "
        "that cluster's CA (`clustermesh connect` again)",
    ),
    "unknown-authority": (
        "certificate chain",
        "etcd's certificate is signed by a CA the config does not trust: put "
        "that cluster's CA in trusted-ca-file (or a bundle of both CAs while rotating)",
    ),
    "server-name-mismatch": (
        "SAN and expiry",
        "etcd's certificate does not name the address dialled: reissue it "
        "with that name or IP among its SANs, or dial a name it carries",
    ),
    "server-certificate-expired": ("SAN and expiry", "etcd's certificate has expired: issue a new one for that etcd"),
    "client-certificate-expired": (
        "SAN and expiry",
        "this node's client certificate for that cluster has expired: "
        "`clustermesh certs issue` (or `clustermesh connect` again); no restart needed",
    ),
    "unknown-user": (
        "etcd user and role",
        "that etcd knows no user named as the certificate's CN (authentication "
        "refused): `clustermesh connect` (or `clustermesh etcd init`) creates it",
    ),
    "no-role": (
        "etcd user and role",
        "etcd grants the certificate's user (its CN) no role: the user is missing, or has no role to read the "
        "mesh's keys (etcd tells the two apart only to root); `clustermesh connect` creates the user and its role",
    ),
    "wrong-cluster": (
        "etcd user and role",
        "the etcd answers but holds another cluster's state: the config file points at the wrong endpoint",
    ),
    "refused-id-clash": (
        "cluster-config",
        "two clusters have the same cluster ID: give one a free ID (its identities change: plan it)",
    ),
    "refused-name-clash": ("cluster-config", "two clusters have the same name: rename one"),
    "refused-max-connected-mismatch": (
        "cluster-config",
        "the clusters disagree on max-connected-clusters (255 or 511): every cluster of a mesh needs the same",
    ),
    "refused-id-mismatch": ("cluster-config", "the cluster-config's ID differs from the config file's: fix the file"),
    "refused-no-cluster-config": (
        "cluster-config",
        "the cluster publishes no cluster-config: is its clustermesh-apiserver running?",
    ),
    "refused-invalid-config": (
        "cluster-config",
        "the cluster's cluster-config cannot be read: its apiserver wrote something invalid",
    ),
    "connecting": ("synced canaries", "the first session is starting: wait a moment"),
    "waiting-nodes": ("synced canaries", "the session is starting: wait a moment"),
    "listing": ("synced canaries", "the session is listing the cluster's state: wait a moment"),
    "waiting-canary": (
        "synced canaries",
        "the cluster's apiserver has not finished writing its state (no synced "
        "canary): check its clustermesh-apiserver",
    ),
    "watch-ended": ("synced canaries", "a watch ended and the session reconnects: see the cluster's etcd"),
    "heartbeat-stale": (
        "heartbeat",
        "the cluster's heartbeat is not moving: its clustermesh-apiserver is stopped or stuck",
    ),
    "datapath-unreachable": (
        "data path",
        "the nodes named do not answer through the tunnel: check the tunnel "
        "(`wg show`, IPsec SAs, VXLAN), routes and the underlay between the nodes",
    ),
    "datapath-probing": ("data path", "a node has just appeared: its probe comes within a second"),
}


@dataclass(frozen=True)
class Hop:
    name: str
    state: str  # ok | failed | not reached | skipped
    evidence: str = ""
    fix: str = ""


def _tunnel(status: AgentStatus, cluster: ClusterStatus) -> Hop:
    datapath = status.datapath
    if datapath is None or not datapath.driver:
        return Hop("tunnel peer", "skipped", "this node runs no datapath")
    nodes = cluster.health["nodes"] if cluster.health else []
    missing = [n["name"] for n in nodes if n["name"] not in datapath.peers]
    if missing:
        evidence = f"{datapath.driver}: no peer for {', '.join(missing)}" + (
            f" ({datapath.last_error})" if datapath.last_error else ""
        )
        return Hop("tunnel peer", "failed", evidence, "the datapath could not program its peers: see the agent's log")
    peers = [p for p in datapath.peers if p.startswith(f"{cluster.name}/")]
    return Hop("tunnel peer", "ok", f"{datapath.driver}: {len(peers)} peers in {cluster.name}")


def diagnose(status: AgentStatus, cluster: ClusterStatus) -> list[Hop]:
    """The hops from this node to `cluster`, in order."""
    problem = next((p for p in cluster.problems if p.code in FIXES), None)
    if problem is None and not cluster.ready and cluster.problems:
        problem = cluster.problems[0]
    failed_at = FIXES[problem.code][0] if problem is not None and problem.code in FIXES else None
    hops: list[Hop] = []
    reached = True
    for name in HOPS:
        if not reached:
            hops.append(Hop(name, "not reached"))
            continue
        if name == failed_at and problem is not None:
            evidence = problem.message + (f" ({cluster.last_error_age:.0f} s ago)" if cluster.last_error_age else "")
            hops.append(Hop(name, "failed", evidence, FIXES[problem.code][1]))
            reached = False
        elif name == "tunnel peer":
            hops.append(_tunnel(status, cluster))
            reached = hops[-1].state != "failed"
        elif name == "data path":
            if cluster.health is None:
                hops.append(Hop(name, "skipped", "this node runs no datapath (or no health checking)"))
            else:
                latency = cluster.health.get("latency_ms") or {}
                hops.append(Hop(name, "ok", f"{cluster.health['reachable']}/{cluster.health['total']} nodes answer"
                                + (f", {latency['avg']} ms" if latency else "")))  # fmt: skip
        elif name == "heartbeat" and cluster.heartbeat_age is not None:
            hops.append(Hop(name, "ok", f"last change {cluster.heartbeat_age:.0f} s ago"))
        elif name == "synced canaries" and cluster.synced:
            hops.append(Hop(name, "ok", f"{sum(cluster.synced.values())}/{len(cluster.synced)} prefixes synced"))
        else:
            hops.append(Hop(name, "ok"))
    if problem is not None and failed_at is None:  # a problem no hop explains: say it rather than claim all is well
        hops.append(Hop("other", "failed", f"{problem.code}: {problem.message}"))
    return hops


def diagnose_config_file(name: str, reason: str) -> list[Hop]:
    """A file of the config directory the agent does not use: nothing was dialled; the file itself is the hop."""
    if "local cluster" in reason:
        fix = (f"the file {name!r} has the local cluster's name (a name clash): a cluster does not join itself; "
               "remove it, or name it after the remote cluster it describes")  # fmt: skip
    else:
        fix = f"fix or remove the file {name!r} of the clustermesh config directory"
    return [Hop("cluster-config", "failed", f"config file {name!r}: {reason}", fix),
            *(Hop(hop, "not reached") for hop in HOPS[HOPS.index("cluster-config") + 1:])]  # fmt: skip
