"""Nodes in the lab: a namespace on its cluster's bridge, and its agent (with the node's tunnel) in it."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import certs
from clustermesh.daemon.tls import hubble_server_name
from clustermesh.lab import cgroups, netns
from clustermesh.lab.layout import POD_SUPERNET, WIREGUARD_PORT, NodeLayout
from clustermesh.lab.state import BIN, LabContext
from clustermesh.lab.underlay import attach

__all__ = ["add_node_namespace", "start_agent", "start_relay"]

HUBBLE_PORT = 4244  # Hubble's port: every node's flow service
AGENT_METRICS_PORT = 9962  # Cilium's agent's Prometheus port
RELAY_METRICS_PORT = 9966  # Hubble Relay's


def add_node_namespace(ctx: LabContext, node: NodeLayout) -> None:
    cluster = ctx.layout.cluster(node.cluster)
    attach(ctx, node.netns, node.world_veth, cluster.bridge, f"{node.ip}/24", cluster.gateway)
    if ctx.layout.routing == "native":  # the underlay learns pod CIDRs, as a cloud router would
        netns.ip("route", "replace", node.pod_cidr, "via", node.ip, netns=ctx.layout.world_netns)


def _issue(
    ctx: LabContext, cluster: int, paths: certs.CertPaths, issue: Callable[[certs.Issued], certs.Issued]
) -> None:
    """A certificate of the lab's CA (which every cluster shares), written where a process of the lab reads it."""
    paths.cert.parent.mkdir(parents=True, exist_ok=True)
    certs.write_issued(issue(certs.load_issued(ctx.pki(cluster).ca)), paths)


def ipsec_credentials(ctx: LabContext, node: NodeLayout) -> list[str]:
    """The node's IKE certificate (its IP is its identity)."""
    directory = ctx.node_dir(node) / "ipsec-certs"
    paths = certs.CertPaths.in_dir(directory, "node")
    _issue(ctx, node.cluster, paths,
           lambda ca: certs.issue_server(ca, f"ipsec-{node.name}", hosts=[node.ip, node.name]))  # fmt: skip
    ca_file = directory / "ca.crt"
    shutil.copyfile(ctx.pki(node.cluster).ca.cert, ca_file)
    return ["--ipsec-cert", str(paths.cert), "--ipsec-key", str(paths.key), "--ipsec-ca", str(ca_file)]


def hubble_credentials(ctx: LabContext, node: NodeLayout) -> list[str]:
    """The node's flow service: its certificate names it as Hubble's peer service does, and only clients of the lab's
    CA (the relays) may read it."""
    paths = certs.CertPaths.in_dir(ctx.node_dir(node) / "hubble-certs", "server")
    name = hubble_server_name(f"c{node.cluster}", node.name)
    _issue(ctx, node.cluster, paths, lambda ca: certs.issue_server(ca, f"hubble-{node.name}", hosts=[name, node.ip]))
    ca_file = str(ctx.pki(node.cluster).ca.cert)
    return ["--hubble-listen-address", f":{HUBBLE_PORT}", "--hubble-tls-cert-file", str(paths.cert),
            "--hubble-tls-key-file", str(paths.key), "--hubble-tls-client-ca-files", ca_file]  # fmt: skip


def start_relay(ctx: LabContext, cluster: int) -> None:
    """The cluster's relay, in its control plane's namespace: the nodes to follow come from its first node's agent
    (whose merged view names every node of every connected cluster); readers ask on `relay.sock`."""
    paths = certs.CertPaths.in_dir(ctx.state_dir / f"c{cluster}" / "relay-certs", "client")
    _issue(ctx, cluster, paths, lambda ca: certs.issue_client(ca, "hubble-relay"))
    first = min((n for n in ctx.state.node_layouts() if n.cluster == cluster), key=lambda n: n.index)
    child = ctx.child(
        f"relay-c{cluster}",
        ctx.layout.cluster(cluster).control_plane_netns,
        [
            str(BIN / "clustermesh-relay"), "--peer-service", str(ctx.socket(first)),
            "--tls-client-cert-file", str(paths.cert), "--tls-client-key-file", str(paths.key),
            "--tls-hubble-server-ca-files", str(ctx.pki(cluster).ca.cert),
            "--api-socket", str(ctx.relay_socket(cluster)), "--refresh", "2",
            "--metrics-address", f"{ctx.layout.cluster(cluster).control_plane_ip}:{RELAY_METRICS_PORT}",
        ],
        r"listening on ",
    )  # fmt: skip
    ctx.progress(f"c{cluster}: clustermesh-relay (pid {child.pid}), flows of every node at {ctx.relay_socket(cluster)}")


def _agent_source(ctx: LabContext, node: NodeLayout) -> list[str]:
    if ctx.layout.source != "kubernetes":
        return []
    return ["--source", "kubernetes", "--kubeconfig", str(ctx.kubeconfig(node.cluster, "agent"))]


def start_agent(ctx: LabContext, node: NodeLayout) -> None:
    directory = ctx.node_dir(node)
    (directory / "remotes").mkdir(parents=True, exist_ok=True)
    config = ctx.config(node.cluster, f"agent-c{node.cluster}")
    ipsec = ipsec_credentials(ctx, node) if ctx.layout.routing == "ipsec" else []
    child = ctx.child(
        f"agent-{node.name}",
        node.netns,
        [
            str(BIN / "clustermesh-agent"), "--cluster-name", f"c{node.cluster}", "--cluster-id",
            str(node.cluster), "--node-name", node.name, "--node-ip", node.ip, "--pod-cidr", node.pod_cidr,
            "--kvstore-endpoints", ctx.layout.cluster(node.cluster).etcd_url,
            "--kvstore-ca", str(config.ca_file), "--kvstore-cert", str(config.cert_file),
            "--kvstore-key", str(config.key_file),
            "--clustermesh-config", str(directory / "remotes"), "--state-dir", str(directory / "state"),
            "--api-socket", str(ctx.socket(node)), "--datapath", ctx.layout.routing,
            "--wireguard-interface", node.wireguard_interface, "--wireguard-port", str(WIREGUARD_PORT),
            "--pod-supernet", POD_SUPERNET, "--identity-gc-grace", "60", *ipsec, *hubble_credentials(ctx, node),
            "--bpf-pin-dir", str(ctx.layout.bpf_dir / node.name), *_agent_source(ctx, node),
            "--metrics-address", f"{node.ip}:{AGENT_METRICS_PORT}",
            "--cgroup-root", str(cgroups.make(cgroups.node_cgroup(ctx.layout.name, node.name))),
            *ctx.state.agent_args,
        ],
        r"listening on ",
    )  # fmt: skip
    ctx.progress(f"{node.name}: clustermesh-agent (pid {child.pid}) in {node.netns}, {node.ip}, pods {node.pod_cidr}")
