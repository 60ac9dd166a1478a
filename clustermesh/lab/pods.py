"""Pods in the lab: a namespace each, attached by the CNI plugin run in its node's namespace, as a kubelet would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from clustermesh.lab import cgroups, netns
from clustermesh.lab.layout import LabError, NodeLayout
from clustermesh.lab.services import sync_slices
from clustermesh.lab.state import BIN, LabContext, LabState

__all__ = [
    "CNI_TRY_AGAIN",
    "CNIFailed",
    "add_named_pod",
    "add_pod",
    "delete_pod",
    "find_pod",
    "parse_labels",
    "pod_command",
    "pod_key",
    "resolv_conf",
    "run_cni",
    "set_ready",
]

CNI_TRY_AGAIN = 11  # the CNI spec's "try again later" (the agent is starting)


class CNIFailed(LabError):
    """The CNI plugin answered an error; `code` is its CNI error code."""

    def __init__(self, message: str, code: object) -> None:
        super().__init__(message)
        self.code = code


def run_cni(
    ctx: LabContext,
    node: NodeLayout,
    command: str,
    pod: str,
    *,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    pod_netns: str | None = None,
) -> dict[str, Any]:
    """Run the CNI plugin in the node's namespace, as a kubelet would."""
    pod_netns = pod_netns or f"{ctx.layout.name}-c{node.cluster}-{pod}"
    env = {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod_netns,
        "CNI_NETNS": str(netns.path(pod_netns)),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(BIN),
        "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};CLUSTERMESH_LABELS="
        + ",".join(f"{k}:{v}" for k, v in (labels or {"app": "lab"}).items()),
    }
    config = {"cniVersion": "1.0.0", "name": "clustermesh", "type": "clustermesh-cni",
              "agentSocket": str(ctx.socket(node))}  # fmt: skip
    result = subprocess.run(
        [*netns.nsenter(node.netns), str(BIN / "clustermesh-cni")],
        env=env, input=json.dumps(config).encode(), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    try:
        output = json.loads(result.stdout or b"{}")
    except ValueError:
        output = {}
    if not isinstance(output, dict):
        output = {}
    if result.returncode != 0:
        message = output.get("msg") or result.stderr.decode(errors="replace")[-500:]
        raise CNIFailed(f"CNI {command} of {pod} on {node.name} failed: {message}", output.get("code"))
    return output


def resolv_conf(ctx: LabContext, node: NodeLayout, pod_netns: str, namespace: str) -> Path:
    """The pod's resolver: its node's DNS (on the node's router address), searching its namespace's Services."""
    path = ctx.state_dir / "pods" / f"{pod_netns}.resolv.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"nameserver {node.router_ip}\nsearch {namespace}.svc.cluster.local svc.cluster.local "
                    "cluster.local\noptions ndots:5 timeout:1 attempts:2\n")  # fmt: skip
    return path


def pod_command(record: dict[str, Any], command: list[str]) -> list[str]:
    """How to run `command` as one of the pod's processes: in its network namespace, with its resolver (a mount
    namespace of its own, /etc/resolv.conf bound over); the caller joins the pod's cgroup first."""
    enter = netns.nsenter(record["netns"])
    resolv = record.get("resolv")
    if not resolv or not Path(resolv).exists() or not Path("/etc/resolv.conf").exists():
        return [*enter, *command]
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return [*enter, "unshare", "--mount", "--propagation", "private", "sh", "-c", script, resolv, *command]


def add_pod(ctx: LabContext, node: NodeLayout, pod: str, *, patience: float = 30.0) -> None:
    """Make the pod's namespace and ADD it through the CNI plugin; an agent still starting (its store not
    there yet) is asked again, as a kubelet retries a sandbox, for up to `patience` seconds."""
    pod_netns = f"{ctx.layout.name}-c{node.cluster}-{pod}"
    netns.ip("netns", "add", pod_netns)
    cgroup = cgroups.make(cgroups.pod_cgroup(ctx.layout.name, node.name, pod_netns))
    deadline = time.monotonic() + patience
    while True:
        try:
            result = run_cni(ctx, node, "ADD", pod)
            break
        except CNIFailed as exc:
            if exc.code != CNI_TRY_AGAIN or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # another process getting ready: its answers are all there is to wait on
    ip = result["ips"][0]["address"].split("/")[0]
    resolv = resolv_conf(ctx, node, pod_netns, "default")
    ctx.state.pods[f"c{node.cluster}/{pod}"] = {"netns": pod_netns, "ip": ip, "node": node.name,
                                                "cgroup": str(cgroup), "resolv": str(resolv)}  # fmt: skip
    ctx.progress(f"c{node.cluster}/{pod}: {ip} on {node.name} (identity {result.get('identity')})")


#: A pod's and a namespace's name, as Kubernetes takes them (an RFC 1123 label).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as Kubernetes takes a pod's labels; an error names the pair that is not one."""
    labels: dict[str, str] = {}
    for pair in filter(None, (item.strip() for item in text.split(","))):
        key, equals, value = pair.partition("=")
        if not equals or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise LabError(f"label {pair!r}: expected key=value, a Kubernetes label (letters, digits, '-', '_', '.')")
        labels[key] = value
    return labels


def pod_key(cluster: int, namespace: str, name: str) -> str:
    """How the lab's state names a pod: `c1/pod-1-1` for those `up` makes (namespace default), else `c1/NS/NAME`."""
    if namespace == "default" and re.fullmatch(r"pod-\d+-\d+", name):
        return f"c{cluster}/{name}"
    return f"c{cluster}/{namespace}/{name}"


def find_pod(state: LabState, reference: str) -> tuple[str, dict[str, Any]]:
    """`CLUSTER/NS/NAME` or `CLUSTER/POD` (a pod of namespace default) -> its key and record in the lab's state."""
    parts = reference.split("/")
    if len(parts) == 3 and parts[0].startswith("c") and parts[0][1:].isdigit():
        key = pod_key(int(parts[0][1:]), parts[1], parts[2])
    elif len(parts) == 2:
        key = reference if reference in state.pods else f"{parts[0]}/default/{parts[1]}"
    else:
        raise LabError(f"pod {reference!r}: name it CLUSTER/NAMESPACE/NAME (c1/shop/web) or CLUSTER/POD (c1/pod-1-1)")
    if key not in state.pods:
        known = ", ".join(sorted(state.pods)[:8])
        raise LabError(f"no pod {reference!r} in lab {state.name}; pods: {known}")
    return key, state.pods[key]


def add_named_pod(
    ctx: LabContext, cluster: int, name: str, *, namespace: str, labels: dict[str, str], node: NodeLayout | None = None
) -> dict[str, Any]:
    """A pod of the user's naming: its namespace and labels give its identity, as a Deployment's pod's do.
    Without `node`, the node of the cluster with the fewest pods. Returns what `lab pod add -o json` prints."""
    for what, value in (("pod name", name), ("namespace", namespace)):
        if not _NAME.match(value):
            raise LabError(f"{what} {value!r}: lower-case letters, digits and '-', at most 63 (a Kubernetes name)")
    nodes = [n for n in ctx.state.node_layouts() if n.cluster == cluster]
    if not nodes:
        raise LabError(
            f"lab {ctx.layout.name} has no cluster c{cluster} (clusters: {', '.join(sorted(ctx.state.nodes))})"
        )
    if node is None:
        load = {n.name: 0 for n in nodes}
        for record in ctx.state.pods.values():
            if record["node"] in load:
                load[record["node"]] += 1
        node = min(nodes, key=lambda n: (load[n.name], n.index))
    key = pod_key(cluster, namespace, name)
    if key in ctx.state.pods:
        raise LabError(f"pod {key} exists already in lab {ctx.layout.name}")
    pod_netns = f"{ctx.layout.name}-c{cluster}-{namespace}.{name}"
    netns.ip("netns", "add", pod_netns)
    cgroup = cgroups.make(cgroups.pod_cgroup(ctx.layout.name, node.name, pod_netns))
    try:
        result = run_cni(ctx, node, "ADD", name, labels=labels, namespace=namespace, pod_netns=pod_netns)
    except BaseException:
        netns.ip("netns", "del", pod_netns, check=False)
        cgroups.remove_tree(cgroup)
        raise
    ip = result["ips"][0]["address"].split("/")[0]
    ctx.state.pods[key] = {"netns": pod_netns, "ip": ip, "node": node.name, "namespace": namespace, "name": name,
                           "labels": labels, "cgroup": str(cgroup),
                           "resolv": str(resolv_conf(ctx, node, pod_netns, namespace))}  # fmt: skip
    ctx.state.save(ctx.state_dir)
    _resync_services(ctx, cluster)
    return {"name": name, "namespace": namespace, "cluster": f"c{cluster}", "node": node.name, "ip": ip,
            "identity": result.get("identity")}  # fmt: skip


def _resync_services(ctx: LabContext, cluster: int) -> None:
    """The EndpointSlices of the lab's Services in the cluster, after its pods changed."""
    if any(key.startswith(f"c{cluster}/") for key in ctx.state.services):
        asyncio.run(sync_slices(ctx, cluster))


def set_ready(ctx: LabContext, reference: str, ready: bool) -> str:
    """A pod made ready or not, as its readiness probe would: the EndpointSlices of the Services selecting it say
    so (no new connection goes to a pod that is not ready)."""
    key, record = find_pod(ctx.state, reference)
    record["ready"] = ready
    ctx.state.save(ctx.state_dir)
    _resync_services(ctx, int(key.split("/")[0][1:]))
    return key


def delete_pod(ctx: LabContext, reference: str) -> str:
    """The pod gone as a kubelet removes one: CNI DEL (its endpoint unpublished, its address freed), then the
    processes left running in it and its namespace. Returns its key."""
    key, record = find_pod(ctx.state, reference)
    node = next((n for n in ctx.state.node_layouts() if n.name == record["node"]), None)
    if node is not None:
        name = record.get("name") or key.rsplit("/", 1)[1]
        run_cni(ctx, node, "DEL", name, namespace=record.get("namespace", "default"), pod_netns=record["netns"])
    netns.stop_processes(netns.processes_in([record["netns"]]))
    if record.get("cgroup"):
        cgroups.remove_tree(Path(record["cgroup"]))
    netns.ip("netns", "del", record["netns"], check=False)
    del ctx.state.pods[key]
    ctx.state.save(ctx.state_dir)
    _resync_services(ctx, int(key.split("/")[0][1:]))
    return key
