"""The loop that keeps a session with etcd going: connect, run, and on failure wait and connect again.

It is kept trivial on purpose (kopf's `infinite_watch` shape): the steps it calls (`connect`, a store's `run`) are
tested; this loop is only glue. Each failure is reported to `on_failure` with its reason, so status and metrics can
name it; the wait grows exponentially (with jitter) and resets after a session that got going.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvstore import errors
from kvstore.backend import Backend

__all__ = ["Backoff", "connect_until_up", "run_reconnecting"]

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = 0.0

    def next(self) -> float:
        delay = self._next or self.initial
        self._next = min(delay * self.factor, self.maximum)
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._next = 0.0


async def run_reconnecting(
    connect: Callable[[], Awaitable[Backend]],
    session: Callable[[Backend], Awaitable[None]],
    *,
    name: str,
    backoff: Backoff | None = None,
    on_connected: Callable[[], None] | None = None,
    on_failure: Callable[[errors.KVStoreError], None] | None = None,
) -> None:  # pragma: no cover - glue around tested steps
    backoff = backoff or Backoff()

    def cannot_connect(exc: errors.KVStoreError) -> None:
        log.warning("%s: cannot connect: %s", name, exc)
        if on_failure is not None:
            on_failure(exc)

    while True:
        backend = await connect_until_up(connect, on_failure=cannot_connect, backoff=backoff)
        try:
            if on_connected is not None:
                on_connected()
            backoff.reset()
            await session(backend)
        except errors.KVStoreError as exc:
            log.warning("%s: session ended: %s", name, exc)
            if on_failure is not None:
                on_failure(exc)
        finally:
            await backend.close()
        await asyncio.sleep(backoff.next())


async def connect_until_up(
    connect: Callable[[], Awaitable[Backend]],
    *,
    on_failure: Callable[[errors.KVStoreError], None] | None = None,
    backoff: Backoff | None = None,
) -> Backend:
    """Connect, retrying with backoff until it works; every failure is reported (status, metrics, log)."""
    backoff = backoff or Backoff(initial=0.2, maximum=5.0)
    while True:
        try:
            return await connect()
        except errors.KVStoreError as exc:
            if on_failure is not None:
                on_failure(exc)
        await asyncio.sleep(backoff.next())
