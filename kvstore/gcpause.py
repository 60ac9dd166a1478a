"""The cyclic garbage collector held off while a large list is read.

Measured for issue 14 (bench/agent.py): during an initial sync the agent allocates a few short-lived container
objects per entry (pages, the changes it announces to subscribers) that survive a young collection before they are
dropped; full collections then walk more of them the larger the list, and the agent's own cost per entry grows with
the list (4.4 µs at 100k, 5.2 µs at 300k with the collector on; 3.4 and 3.4 µs with it off). Reference counting
frees all of it either way: only cycles wait for the collector, and a list makes none. So while any list is being
read the collector is off, and one collection runs when the last list is done. A pause never lasts longer than
`MAX_PAUSE` seconds (a list held up by a slow etcd, or lists that keep overlapping): then the collector is on again
until every list has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

__all__ = ["MAX_PAUSE", "collector_paused"]

#: a 1M-entry list takes about 13 s here
MAX_PAUSE = 60.0

_holders = 0
_was_enabled = False
_deadline: asyncio.TimerHandle | None = None


def _resume() -> None:
    """The pause has lasted long enough: the collector runs again (as it was before the pause)."""
    global _deadline
    _deadline = None
    if _was_enabled:
        gc.enable()


@contextlib.contextmanager
def collector_paused(max_pause: float = MAX_PAUSE) -> Iterator[None]:
    """The collector off for as long as any caller holds this (lists run side by side), as it was after; at most
    `max_pause` seconds when called from a running event loop."""
    global _holders, _was_enabled, _deadline
    if _holders == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
        with contextlib.suppress(RuntimeError):  # no running loop: no deadline
            _deadline = asyncio.get_running_loop().call_later(max_pause, _resume)
    _holders += 1
    try:
        yield
    finally:
        _holders -= 1
        if _holders == 0:
            if _deadline is not None:
                _deadline.cancel()
                _deadline = None
            if _was_enabled:
                gc.enable()
                gc.collect(1)  # what the young generations gathered meanwhile; the full collection keeps its schedule
