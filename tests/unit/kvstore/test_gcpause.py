"""The collector is off while any list is read, on again after the last one, and never off for longer than the
pause's limit."""

from __future__ import annotations

import asyncio
import gc

from kvstore.gcpause import collector_paused


async def test_the_collector_is_off_while_any_list_reads_and_on_after_the_last() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():  # a second list, side by side
            assert not gc.isenabled()
        assert not gc.isenabled(), "the first list still reads"
    assert gc.isenabled()


async def test_a_pause_never_outlasts_its_limit() -> None:
    with collector_paused(max_pause=0.05):
        assert not gc.isenabled()
        await asyncio.sleep(0.15)
        assert gc.isenabled(), "a list held up past the limit lets the collector run again"
    assert gc.isenabled()


async def test_the_collector_left_off_by_the_process_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused(max_pause=0.01):
            await asyncio.sleep(0.05)
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_without_a_running_loop_there_is_no_deadline() -> None:
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
