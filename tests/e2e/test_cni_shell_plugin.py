"""The CNI plugin of nodes without Python (`deploy/images/clustermesh-cni`, a shell script the agent's image puts on
the host): run as a container runtime runs a plugin, against a real agent, it attaches a pod that then reaches the
other cluster's pod, CHECKs and DELetes it, and answers CNI error documents for what goes wrong.

One lab of 2 clusters x 1 node (vxlan); the new pod's namespace carries the lab's name, so `lab down` removes it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.labtools import LabHandle, describe, in_netns, lab_owned, wait_until

LAB = "e2ecni"
PLUGIN = Path(__file__).parents[2] / "deploy" / "images" / "clustermesh-cni"
NETNS = f"{LAB}-shimpod"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with lab_owned(LAB, routing="vxlan", clusters=2, nodes=1, pods=1) as handle:
        subprocess.run(["ip", "netns", "add", NETNS], check=True)
        try:
            yield handle
        finally:
            subprocess.run(["ip", "netns", "delete", NETNS], check=False)


def plugin(lab: LabHandle, command: str, *, config: str | None = None, socket: str | None = None,
           container: str = "shimpod1") -> subprocess.CompletedProcess[str]:  # fmt: skip
    agent_socket = socket or str(Path(f"/run/clustermesh-lab/{LAB}") / "c1-node-1" / "agent.sock")
    document = (
        config
        if config is not None
        else json.dumps(
            {"cniVersion": "1.0.0", "name": "clustermesh", "type": "clustermesh-cni", "agentSocket": agent_socket}
        )
    )
    env = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/run/netns/{NETNS}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=shim-1;CLUSTERMESH_LABELS=app:shim",
    }
    return subprocess.run([str(PLUGIN)], input=document, env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_the_shell_plugin_attaches_checks_and_deletes_a_pod_through_the_agent(lab: LabHandle) -> None:
    added = plugin(lab, "ADD")
    assert added.returncode == 0, describe(added)
    result: dict[str, Any] = json.loads(added.stdout)
    assert result["cniVersion"] == "1.0.0" and result["interfaces"][0]["sandbox"] == f"/run/netns/{NETNS}"
    address = result["ips"][0]["address"].split("/")[0]
    assert address.startswith("10.1."), result
    target = lab.pod_ip("c2/pod-1-1")

    def reaches() -> tuple[bool, object]:
        ping = in_netns(NETNS, "ping", "-c", "1", "-W", "1", target)
        return ping.returncode == 0, ping.stdout[-200:]

    wait_until("the new pod reaches the other cluster's pod", reaches, timeout=20)
    checked = plugin(lab, "CHECK")
    assert checked.returncode == 0 and checked.stdout == "", describe(checked)
    deleted = plugin(lab, "DEL")
    assert deleted.returncode == 0 and deleted.stdout == "", describe(deleted)
    links = in_netns(NETNS, "ip", "-o", "link", "show")
    assert "eth0" not in links.stdout, links.stdout
    again = plugin(lab, "DEL")
    assert again.returncode == 0, "DEL of what is gone succeeds, as the spec asks"


@pytest.mark.parametrize(
    ("command", "config", "socket", "code"),
    [
        ("ADD", "not json", None, 6),
        ("ADD", None, "/run/clustermesh-lab/nowhere.sock", 11),
        ("FROB", None, None, 4),
    ],
)
def test_the_shell_plugin_answers_cni_error_documents(lab: LabHandle, command: str, config: str | None,
                                                      socket: str | None, code: int) -> None:  # fmt: skip
    result = plugin(lab, command, config=config, socket=socket, container="shimpod2")
    assert result.returncode == 1, describe(result)
    error = json.loads(result.stdout)
    assert error["code"] == code and error["msg"], error


def test_version_needs_no_agent() -> None:
    result = subprocess.run([str(PLUGIN)], env={"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"},
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0 and "1.0.0" in json.loads(result.stdout)["supportedVersions"]
