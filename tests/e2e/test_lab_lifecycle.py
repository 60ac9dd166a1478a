"""The lab's own life: `lab down` leaves nothing of a lab behind, also after every process of it was killed; the CLI
refuses what it cannot do with a message and exit code 1, never a traceback.

Each test here owns its lab (it takes it down itself); the leftovers are looked for by the lab's name, as `down`
does, and by the PIDs seen before.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from clustermesh.lab import netns
from clustermesh.lab.layout import STATE_ROOT
from clustermesh.lab.netns import alive
from tests.e2e.labtools import LabHandle, clustermesh, describe, host_interfaces, lab_owned, wait_until

FAILED_UP_LOGS = "/tmp/clustermesh-lab-{name}-logs"  # where a failed `lab up` copies the logs


def _assert_gone(lab: LabHandle, pids: list[int]) -> None:
    left = lab.leftovers()
    assert not left, f"lab {lab.name} left behind: {left}"
    running = [pid for pid in pids if alive(pid)]
    assert not running, f"processes of lab {lab.name} still running: {running}"
    assert not [i for i in host_interfaces() if i.startswith(lab.name)], host_interfaces()


def test_down_removes_everything() -> None:
    """After `lab down`: no namespace, no process that lived in one, no WireGuard socket, no state folder, and no
    interface of the lab in the host's namespace. What was there before is checked first, so that the test cannot
    pass by looking in the wrong place."""
    with lab_owned("e2edown", routing="wireguard", clusters=2, nodes=1, pods=1) as lab:
        pids = lab.processes()
        comms = sorted({Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids})
        assert {"etcd", "wireguard-go"} <= set(comms), f"processes of the lab: {comms}"
        assert len(lab.namespaces()) == 1 + 2 * (1 + 1 + 1), lab.namespaces()  # world; per cluster cp, node, pod
        assert len(lab.wireguard_sockets()) == 2, lab.wireguard_sockets()
        assert (STATE_ROOT / lab.name / "lab.json").exists()

        result = clustermesh("lab", "down", "--name", lab.name)
        assert result.returncode == 0, describe(result)
        assert f"lab {lab.name} removed" in result.stdout + result.stderr, describe(result)
        _assert_gone(lab, pids)


def test_down_after_a_crash_removes_everything() -> None:
    """Every process of a lab killed with SIGKILL (nothing could clean up: wireguard-go leaves its control sockets,
    the agents their state): `lab down` still finds and removes everything, by the lab's name."""
    with lab_owned("e2ecrash", routing="wireguard", clusters=2, nodes=1, pods=1) as lab:
        pids = lab.processes()
        assert pids, "the lab has no processes"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until("every process of the lab has ended", lambda: (not (a := [p for p in pids if alive(p)]), a))
        assert lab.wireguard_sockets(), "control: wireguard-go, killed, should have left its sockets"
        assert lab.namespaces() and (STATE_ROOT / lab.name).exists()

        result = clustermesh("lab", "down", lab.name)  # the name as an argument works as well as --name
        assert result.returncode == 0, describe(result)
        _assert_gone(lab, pids)


@pytest.mark.parametrize("name", ["Lab1", "1lab", "toolongname", "lab-1", "lab_1", ""])
def test_up_refuses_a_bad_name(name: str) -> None:
    """A name that cannot prefix every interface and namespace is refused before anything is made."""
    result = clustermesh("lab", "up", "--name", name, "--clusters", "1", "--nodes", "1", "--pods", "1")
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr and "invalid" in result.stderr, result.stderr
    if name:
        assert not netns.list_netns(f"{name}-") and not (STATE_ROOT / name).exists()


def test_up_refuses_an_existing_name() -> None:
    """A second `lab up` with the name of a lab that exists (here: only its state folder, as a crashed one may
    leave) fails with exit code 1 and says to take it down first."""
    name = "e2edup"
    (STATE_ROOT / name).mkdir(parents=True, exist_ok=True)
    try:
        result = clustermesh("lab", "up", "--name", name, "--clusters", "1", "--nodes", "1", "--pods", "1")
        assert result.returncode == 1, describe(result)
        assert "Traceback" not in result.stderr, result.stderr
        assert "exists already" in result.stderr and f"lab down --name {name}" in result.stderr, result.stderr
    finally:
        clustermesh("lab", "down", "--name", name)
        shutil.rmtree(FAILED_UP_LOGS.format(name=name), ignore_errors=True)
    assert not LabHandle(name, "wireguard").leftovers()


def test_up_with_an_existing_name_leaves_that_lab_alone() -> None:
    """Refusing to build a lab over a running one must not touch the running one."""
    with lab_owned("e2edup2", routing="wireguard", clusters=1, nodes=1, pods=1) as lab:
        pids, namespaces = lab.processes(), lab.namespaces()
        result = clustermesh("lab", "up", "--name", lab.name, "--clusters", "1", "--nodes", "1", "--pods", "1")
        shutil.rmtree(FAILED_UP_LOGS.format(name=lab.name), ignore_errors=True)
        assert result.returncode == 1 and "exists already" in result.stderr, describe(result)
        assert lab.namespaces() == namespaces, f"namespaces now {lab.namespaces()}; output: {describe(result)}"
        assert all(alive(pid) for pid in pids), f"processes killed: {[p for p in pids if not alive(p)]}"
        assert (STATE_ROOT / lab.name / "lab.json").exists()
