"""Stopping tasks for good.

Cancelling a task and awaiting `asyncio.gather` on it was seen to hang for ever, rarely, with tasks that read gRPC
streams (the cancellation of the task that awaits the gather was lost). `cancel_and_wait` waits with
`asyncio.wait` and a deadline instead, and cancels again what is still running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

__all__ = ["cancel_and_wait", "run_together", "wait_while_running"]

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, patience: float = 2.0, rounds: int = 10) -> None:
    """Cancel every task and wait until all have ended; those still running after `patience` s are cancelled again.

    The error a task ended with (before or during its cancellation: watchers of one broken connection all fail
    together) is retrieved here: the caller reported the one that mattered, and asyncio would otherwise log each
    of the others as "Task exception was never retrieved" when it is garbage-collected."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    for _ in range(rounds):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    if pending:
        log.error("tasks would not stop: %s", ", ".join(getattr(t, "get_name", lambda: "?")() for t in pending))
    for task in tasks:
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("%s ended with %s: %s", getattr(task, "get_name", lambda: "a task")(), type(exc).__name__, exc)


async def run_together(jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run jobs that live as long as each other: the first to fail (or a cancellation) stops the rest, which are
    waited for, and its error is raised (alone, not in a group: a caller logs and exits on it)."""
    tasks = [asyncio.create_task(job, name=getattr(job, "__qualname__", None)) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (exc := task.exception()) is not None:
                log.error("%s failed, stopping the rest: %s", task.get_name(), exc)
                raise exc
    finally:
        await cancel_and_wait(tasks)


async def wait_while_running(
    awaitable: Coroutine[Any, Any, Any], running: asyncio.Task[Any], *, timeout: float, what: str
) -> None:
    """Wait for `awaitable` (an event, a result) that `running` is to bring about: if `running` ends first, or
    nothing comes within `timeout` seconds, say so with the cause instead of waiting for ever."""
    waiter = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait([waiter, running], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiter.done():
            await cancel_and_wait([waiter])
    if waiter in done:
        waiter.result()
        return
    if running in done:
        cause = running.exception() if not running.cancelled() else "cancelled"
        raise RuntimeError(f"{what}: {running.get_name()} ended first ({cause or 'without an error'})")
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")
