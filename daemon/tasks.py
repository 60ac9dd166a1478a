"""Stopping tasks for good.

Cancelling a task and awaiting `asyncio.gather` on it was seen to hang for ever, rarely, with tasks that read gRPC
streams (the cancellation of the task that awaits the gather was lost). `cancel_and_wait` waits with
`asyncio.wait` and a deadline instead, and cancels again what is still running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, patience: float = 2.0, rounds: int = 10) -> None:
    """Cancel every task and wait until all have ended; those still running after `patience` s are cancelled again."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    if pending:
        log.error("tasks would not stop: %s", ", ".join(getattr(t, "get_name", lambda: "?")() for t in pending))
