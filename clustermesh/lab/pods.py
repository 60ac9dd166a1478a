"""Pods in the lab: a namespace each, attached by the CNI plugin run in its node's namespace, as a kubelet would."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from clustermesh.lab import netns
from clustermesh.lab.layout import LabError, NodeLayout
from clustermesh.lab.state import BIN, LabContext

__all__ = ["CNI_TRY_AGAIN", "CNIFailed", "add_pod", "run_cni"]

CNI_TRY_AGAIN = 11  # the CNI spec's "try again later" (the agent is starting)


class CNIFailed(LabError):
    """The CNI plugin answered an error; `code` is its CNI error code."""

    def __init__(self, message: str, code: object) -> None:
        super().__init__(message)
        self.code = code


def run_cni(
    ctx: LabContext, node: NodeLayout, command: str, pod: str, *, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run the CNI plugin in the node's namespace, as a kubelet would."""
    pod_netns = f"{ctx.layout.name}-c{node.cluster}-{pod}"
    env = {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod_netns,
        "CNI_NETNS": str(netns.path(pod_netns)),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(BIN),
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};CLUSTERMESH_LABELS="
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


def add_pod(ctx: LabContext, node: NodeLayout, pod: str, *, patience: float = 30.0) -> None:
    """Make the pod's namespace and ADD it through the CNI plugin; an agent still starting (its store not
    there yet) is asked again, as a kubelet retries a sandbox, for up to `patience` seconds."""
    pod_netns = f"{ctx.layout.name}-c{node.cluster}-{pod}"
    netns.ip("netns", "add", pod_netns)
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
    ctx.state.pods[f"c{node.cluster}/{pod}"] = {"netns": pod_netns, "ip": ip, "node": node.name}
    ctx.progress(f"c{node.cluster}/{pod}: {ip} on {node.name} (identity {result.get('identity')})")
