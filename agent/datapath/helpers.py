"""The datapath's own child processes (wireguard-go, charon): started in a session of their own, stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

__all__ = ["stop_helper"]


async def stop_helper(process: asyncio.subprocess.Process | None, *, grace: float = 5.0) -> None:
    """SIGTERM to the helper's process group, SIGKILL after `grace` seconds; nothing when it has ended already."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), grace)
    if process.returncode is None:
        process.kill()
        await process.wait()
