"""`netns.alive`, which `lab down` and node removal rely on to know a process has ended."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from clustermesh.lab.netns import alive


def test_a_running_process_with_a_space_in_its_name_is_alive_and_a_zombie_is_not() -> None:
    # the shell renames itself "lab agent" (its state then follows "(lab agent)" in /proc/<pid>/stat)
    process = subprocess.Popen(["sh", "-c", 'printf "lab agent" > /proc/self/comm; read line'], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{process.pid}/comm").read_text().strip() != "lab agent":
            assert time.monotonic() < deadline, "the shell did not rename itself"
            time.sleep(0.01)
        assert alive(process.pid)
        process.kill()
        deadline = time.monotonic() + 5
        while alive(process.pid):  # ended, not yet collected: a zombie, which is not alive
            assert time.monotonic() < deadline, "a killed process still counts as alive"
            time.sleep(0.01)
        assert process.poll() is not None
    finally:
        process.kill()
        process.wait()
    assert not alive(process.pid)
