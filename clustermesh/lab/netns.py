"""Network namespaces for the lab: made and removed with iproute2, entered with setns(2), and the processes that
live in them found through /proc (so a crashed lab can still be cleaned up: nothing is kept only in memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "NETNS_DIR",
    "alive",
    "CommandFailed",
    "enter",
    "ip",
    "list_netns",
    "path",
    "processes_in",
    "run",
    "stop_processes",
]

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class CommandFailed(RuntimeError):
    pass


def run(*command: str, check: bool = True, input: bytes | None = None, timeout: float = 30) -> str:
    result = subprocess.run(command, capture_output=True, input=input, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(command)}: {result.stderr.decode().strip() or result.returncode}")
    return result.stdout.decode()


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    return run("ip", *(["-n", netns] if netns else []), *args, check=check)


def path(name: str) -> Path:
    return NETNS_DIR / name


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(entry.name for entry in NETNS_DIR.iterdir() if entry.name.startswith(prefix))


def nsenter(name: str) -> list[str]:
    """The prefix that runs a command in namespace `name` (the mount namespace stays the host's: BPF pins and
    files made there are visible from here)."""
    return ["nsenter", f"--net={path(name)}"]


def enter(name: str) -> None:
    """Move this process's main thread (and every thread it starts afterwards) into namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path(name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def _inode(name: str) -> int | None:
    try:
        return path(name).stat().st_ino
    except OSError:
        return None


def processes_in(names: Iterable[str]) -> list[int]:
    """PIDs of every process whose network namespace is one of `names`."""
    inodes = {inode for inode in (_inode(name) for name in names) if inode is not None}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "ns" / "net").stat().st_ino in inodes:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_processes(pids: Iterable[int], *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL for those still there after `grace` seconds; by PID, never by name."""
    running = set(pids)
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        running = {pid for pid in running if alive(pid)}
        time.sleep(0.05)  # other processes' ends: nothing to wait on but their PIDs
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def command_name(pid: int) -> str:
    """The process's command name (`comm`), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """A PID that runs (a zombie does not: it has ended, only its parent has not collected it). The state is the
    field after the command's closing parenthesis: a command may hold spaces."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
