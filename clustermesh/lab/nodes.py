"""Nodes in the lab: a namespace on its cluster's bridge, and its agent (with the node's tunnel) in it."""

from __future__ import annotations

import shutil

import certs
from clustermesh.lab import cgroups, netns
from clustermesh.lab.layout import POD_SUPERNET, WIREGUARD_PORT, NodeLayout
from clustermesh.lab.state import BIN, LabContext
from clustermesh.lab.underlay import attach

__all__ = ["add_node_namespace", "start_agent"]


def add_node_namespace(ctx: LabContext, node: NodeLayout) -> None:
    cluster = ctx.layout.cluster(node.cluster)
    attach(ctx, node.netns, node.world_veth, cluster.bridge, f"{node.ip}/24", cluster.gateway)
    if ctx.layout.routing == "native":  # the underlay learns pod CIDRs, as a cloud router would
        netns.ip("route", "replace", node.pod_cidr, "via", node.ip, netns=ctx.layout.world_netns)


def ipsec_credentials(ctx: LabContext, node: NodeLayout) -> list[str]:
    """The node's IKE certificate (its IP is its identity) from the lab's CA, which every cluster shares."""
    directory = ctx.node_dir(node) / "ipsec-certs"
    ca = certs.load_issued(ctx.pki(node.cluster).ca)
    paths = certs.CertPaths.in_dir(directory, "node")
    directory.mkdir(parents=True, exist_ok=True)
    certs.write_issued(certs.issue_server(ca, f"ipsec-{node.name}", hosts=[node.ip, node.name]), paths)
    ca_file = directory / "ca.crt"
    shutil.copyfile(ctx.pki(node.cluster).ca.cert, ca_file)
    return ["--ipsec-cert", str(paths.cert), "--ipsec-key", str(paths.key), "--ipsec-ca", str(ca_file)]


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
            "--pod-supernet", POD_SUPERNET, "--identity-gc-grace", "60", *ipsec,
            "--bpf-pin-dir", str(ctx.layout.bpf_dir / node.name),
            "--cgroup-root", str(cgroups.make(cgroups.node_cgroup(ctx.layout.name, node.name))),
            *ctx.state.agent_args,
        ],
        r"listening on ",
    )  # fmt: skip
    ctx.progress(f"{node.name}: clustermesh-agent (pid {child.pid}) in {node.netns}, {node.ip}, pods {node.pod_cidr}")
