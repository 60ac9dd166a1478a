"""Jobs that live together: the first failure stops the others, and is the error the caller sees."""

from __future__ import annotations

import asyncio

import pytest

from clustermesh.daemon.tasks import run_together, wait_while_running


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


async def test_waiting_on_a_job_that_died_says_why_instead_of_hanging() -> None:
    async def crashing() -> None:
        raise ConnectionError("etcd went away")

    running = asyncio.create_task(crashing(), name="the apiserver")
    with pytest.raises(RuntimeError, match=r"the keys: the apiserver ended first \(etcd went away\)"):
        await wait_while_running(asyncio.Event().wait(), running, timeout=5, what="the keys")


async def test_waiting_returns_when_the_awaited_comes_and_times_out_otherwise() -> None:
    running = asyncio.create_task(asyncio.Event().wait())
    ready = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, ready.set)
    try:
        await wait_while_running(ready.wait(), running, timeout=5, what="ready")
        with pytest.raises(TimeoutError, match="never: not within 0 s"):
            await wait_while_running(asyncio.Event().wait(), running, timeout=0.05, what="never")
    finally:
        running.cancel()


async def test_errors_of_tasks_that_failed_together_are_retrieved(caplog: pytest.LogCaptureFixture) -> None:
    """Watchers of one broken connection fail together; the caller reports one. The others' errors must not be
    logged later as "Task exception was never retrieved"."""
    import gc

    from clustermesh.daemon.tasks import cancel_and_wait

    async def broken(name: str) -> None:
        raise ConnectionError(f"{name}: stream removed")

    async def failing_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise ConnectionError("closing a broken stream failed")

    tasks = [asyncio.create_task(broken(name)) for name in ("nodes", "endpoints", "heartbeat")]
    tasks.append(asyncio.create_task(failing_when_cancelled()))
    await asyncio.sleep(0.01)
    await cancel_and_wait(tasks)
    del tasks
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
