"""The labs of the e2e tier: one per routing mode, shared by every test of the session that asks for `mesh_lab`,
built side by side when the session starts, and each removed once its tests are done, even when they failed. Tests
that break their lab (a killed etcd, a crash) build one of their own with `labtools.lab_owned`.

Adding a routing mode to the tier is one entry in ROUTING_MODES: its lab's name is in LAB_NAMES, and what the underlay
may show of it in `labtools.UNDERLAYS` (both have ipsec already).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.labtools import LabBuild, LabHandle, assert_removed, wait_until

ROUTING_MODES = ["wireguard", "ipsec", "vxlan", "native"]
LAB_NAMES = {"wireguard": "e2ewg", "vxlan": "e2evx", "native": "e2ent", "ipsec": "e2eip"}
LAB_SIZE = {"clusters": 2, "nodes": 2, "pods": 1}

# Routing modes whose pod-to-pod traffic is known to break, with the reason: their datapath tests are expected to
# fail (strictly: once fixed, they pass and the entry must go).
KNOWN_DATAPATH_BUGS: dict[str, str] = {}  # e.g. {"vxlan": "why it fails"}


Builds = dict[str, tuple[LabBuild, dict[str, int]]]


def _applies(lab: LabHandle) -> dict[str, int]:
    return {name: int((s.get("datapath") or {}).get("applies") or 0) for name, s in lab.status()["nodes"].items()}


@pytest.fixture(scope="session")
def lab_builds(request: pytest.FixtureRequest) -> Iterator[Builds]:
    """Name: lab_builds. Scope: session. The shared labs of every routing mode this session's tests use, built side
    by side; per mode, the build and each agent's count of datapath rounds when it was up. Whatever was built is
    removed at the end (a lab whose tests removed it already: nothing to do)."""
    modes = sorted(
        {
            item.callspec.params["mesh_lab"]
            for item in request.session.items
            if hasattr(item, "callspec") and "mesh_lab" in item.callspec.params
        }
    )
    builds = {mode: LabBuild(LAB_NAMES[mode], routing=mode, **LAB_SIZE) for mode in modes}
    ready: Builds = {}
    try:
        for mode, build in builds.items():
            ready[mode] = (build, _applies(build.wait()))
        yield ready
    finally:
        for build in builds.values():
            build.cancel()


@pytest.fixture(scope="session", params=ROUTING_MODES)
def mesh_lab(request: pytest.FixtureRequest, lab_builds: Builds) -> Iterator[LabHandle]:
    """Name: mesh_lab. Scope: session, one per routing mode (tests may narrow the modes with
    `@pytest.mark.parametrize("mesh_lab", [...], indirect=True)`). A lab of 2 clusters x 2 nodes x 1 pod:
    c1/pod-1-1, c1/pod-2-1, c2/pod-1-1, c2/pod-2-1.

    Handed over once every agent has run at least one more datapath round than when `lab up` returned (the periodic
    resync, 10 s at most): the tests see the datapath in its steady state, not only as its first rounds left it."""
    routing: str = request.param
    build, first = lab_builds[routing]
    lab = build.lab
    try:

        def one_more_round() -> tuple[bool, object]:
            now = _applies(lab)
            return all(count > first.get(node, 0) for node, count in now.items()), now

        wait_until(f"every agent of {lab.name} runs one more datapath round than {first}", one_more_round,
                   timeout=30, every=0.5)  # fmt: skip
        yield lab
    finally:
        assert_removed(lab.name)


@pytest.fixture
def datapath_lab(mesh_lab: LabHandle, request: pytest.FixtureRequest) -> LabHandle:
    """Name: datapath_lab. `mesh_lab` for a test of pod-to-pod traffic: expected to fail (strictly) in a routing
    mode listed in KNOWN_DATAPATH_BUGS."""
    reason = KNOWN_DATAPATH_BUGS.get(mesh_lab.routing)
    if reason:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))
    return mesh_lab
