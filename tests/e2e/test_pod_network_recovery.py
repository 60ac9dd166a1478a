"""A node's pod network when its IPAM state is lost: real namespaces, real veths and routes, no lab.

The node is a namespace of the test's own (`cmtpn-node`), a pod another (`cmtpn-pod`); the code runs in a child
process entered into the node namespace, as the agent does, so nothing touches the host's namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.labtools import describe

NODE, POD = "cmtpn-node", "cmtpn-pod"
ROOT = Path(__file__).resolve().parents[2]

# Runs inside the node namespace: set the node up, attach the pod, lose the IPAM file, start again (the routes tell
# the new PodNetwork what is in use), then DEL the pod by its container ID; prints what the IPAM held at each step.
SCRIPT = """
import asyncio, json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from agent.datapath.pods import PodNetwork

STATE = Path({state!r})

def network():
    return PodNetwork(pod_cidr="10.77.1.0/24", router_ip="10.77.1.1", supernets=["10.77.0.0/16"], state_dir=STATE,
                      mtu=1400)

async def main():
    first = network()
    await first.setup_node()
    attached = await first.add("container-1", "/run/netns/{pod}", "eth0")
    (STATE / "ipam.json").write_text("{{not json")  # the state is lost
    second = network()
    await second.setup_node()
    recovered = dict(second.ipam.allocated)
    released = await second.delete("container-1")
    print(json.dumps({{"ip": attached.ip, "recovered": recovered, "released": released,
                       "after": second.ipam.allocated}}))

asyncio.run(main())
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=False, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[None]:
    for name in (NODE, POD):
        ip("netns", "del", name)
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield
    finally:
        for name in (NODE, POD):
            ip("netns", "del", name)


def test_a_pod_attached_before_the_ipam_state_was_lost_is_freed_by_its_delete(namespaces: None, tmp_path: Path) -> None:
    script = SCRIPT.format(root=str(ROOT), state=str(tmp_path), pod=POD)
    result = subprocess.run(
        ["ip", "netns", "exec", NODE, sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, describe(result)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["ip"] == "10.77.1.10"
    # found again from the node's route to the pod, under the pod's node-side interface
    assert list(outcome["recovered"].values()) == ["10.77.1.10"]
    assert next(iter(outcome["recovered"])).startswith("recovered-lxc")
    assert outcome["released"] == "10.77.1.10"
    assert outcome["after"] == {}
    assert (tmp_path / "ipam.json.corrupt").exists(), "the unreadable state is kept for a human"
    links = subprocess.run(["ip", "-n", NODE, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "lxc" not in links, "the pod's veth is gone with its delete"
