"""Following a connection's TLS files: rotated certificates taken up in place (`ReloadsCredentials`), watches kept.

The apiserver and an agent's own connection to its cluster's etcd run this loop (the agent's sessions with each
cluster do the same in `agent.remotes`). Files that do not work yet (half-written, mismatched, refused by etcd, or
anything else that goes wrong reading them) are reported once each and tried again; the connection goes on with
the credentials it has. Nothing here stops: a failure to reload must never take the process down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kvstore import errors
from kvstore.backend import Backend, ReloadsCredentials

__all__ = ["follow_credentials"]

log = logging.getLogger(__name__)


async def follow_credentials(
    backend: Backend,
    *,
    what: str,
    on_result: Callable[[str], None] = lambda result: None,
    interval: float = 2.0,
) -> None:
    """Until cancelled; `on_result("ok" | "failed")` counts each outcome (a failure once per distinct error)."""
    if not isinstance(backend, ReloadsCredentials):
        return
    said: str | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            if await backend.reload_credentials():
                on_result("ok")
                log.info("%s: rotated certificates taken up, watches kept", what)
            said = None
        except Exception as exc:
            text = str(exc) if isinstance(exc, errors.KVStoreError) else f"{type(exc).__name__}: {exc}"
            if text != said:
                on_result("failed")
                log.warning("%s: the rotated certificate files are not taken up yet (going on with the current "
                            "ones): %s", what, text)  # fmt: skip
            said = text
