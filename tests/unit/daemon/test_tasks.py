"""Jobs that live together: the first failure stops the others, and is the error the caller sees."""

from __future__ import annotations

import asyncio

import pytest

from daemon.tasks import run_together


async def test_the_first_failure_stops_the_other_jobs_and_is_raised() -> None:
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(name)

    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("the informer gave up")

    with pytest.raises(RuntimeError, match="the informer gave up"):
        await run_together([forever("mesh"), failing(), forever("router")])
    assert sorted(stopped) == ["mesh", "router"]


async def test_a_cancelled_caller_stops_every_job() -> None:
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(name)

    runner = asyncio.create_task(run_together([forever("a"), forever("b")]))
    await asyncio.sleep(0.01)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert sorted(stopped) == ["a", "b"]
