"""Faults a user meets, injected into a real lab as a user would: a cluster's etcd lost and brought back empty.

The cluster's apiserver and agents must refill it by themselves: every agent notices its own CiliumNode and the
CiliumEndpoints of the pods it hosts are gone and writes them again within seconds (before: the node after a 60 s
timer, the endpoints never, so the cluster's pods vanished from the mesh).
"""

from __future__ import annotations

import time

from tests.e2e.labtools import clustermesh, describe, lab_owned, wait_until


def test_a_wiped_cluster_etcd_is_refilled_by_its_agents() -> None:
    with lab_owned("e2ewipe", routing="vxlan", clusters=2, nodes=2, pods=1) as lab:
        c2_pods = sorted(pod for pod in lab.state.pods if pod.startswith("c2/"))
        assert len(c2_pods) == 2
        assert lab.ping("c1/pod-1-1", lab.pod_ip(c2_pods[0])).returncode == 0, "no ping to c2 before the test"

        def c2_as_c1_sees_it() -> dict[str, object]:
            clusters = lab.status()["nodes"]["c1-node-1"]["clusters"]
            return next(c for c in clusters if c["name"] == "c2")

        wiped = clustermesh("lab", "wipe-etcd", lab.name, "c2")
        assert wiped.returncode == 0, describe(wiped)
        started = time.monotonic()

        def refilled() -> tuple[bool, object]:
            c2 = c2_as_c1_sees_it()
            counts = c2["counts"]
            return c2["ready"] and counts["nodes"] == 2 and counts["endpoints"] == 2, c2  # type: ignore[index]

        wait_until("c1's agent reads c2's two nodes and two endpoints again", refilled, timeout=40)
        print(f"c2 refilled by its agents {time.monotonic() - started:.1f} s after its etcd came back empty")
        for pod in c2_pods:
            result = lab.ping("c1/pod-1-1", lab.pod_ip(pod))
            assert result.returncode == 0, f"no reply from {pod} after c2's etcd was wiped: {describe(result)}"

        def every_agent_ready() -> tuple[bool, object]:
            nodes = lab.status()["nodes"]
            waiting = {name: status.get("not_ready") for name, status in nodes.items() if not status["ready"]}
            return not waiting, waiting

        wait_until("every agent of both clusters is ready again", every_agent_ready, timeout=40)
