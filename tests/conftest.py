"""Test tiers and their prerequisites.

- tests/unit: no root, no processes;
- tests/integration (marker `integration`): real etcd processes, started by fixtures;
- tests/privileged and tests/e2e (markers `privileged`, `e2e`): root, network namespaces, the lab.

A tier whose prerequisite is missing is skipped with the reason, except under CI=true, where a missing
prerequisite fails the run: CI must never pass by testing nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(marker: str) -> str | None:
    if marker == "integration" and shutil.which("etcd") is None and not Path("/usr/bin/etcd").exists():
        return "etcd is not installed (Debian package etcd-server; `make setup` installs it)"
    if marker in ("privileged", "e2e") and os.geteuid() != 0:
        return "needs root"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        tier = Path(str(item.fspath)).relative_to(root).parts[0]
        if tier in ("integration", "privileged", "e2e") and tier not in item.keywords:
            item.add_marker(getattr(pytest.mark, tier))
        for marker in ("integration", "privileged", "e2e"):
            if marker not in item.keywords:
                continue
            reason = _missing(marker)
            if reason is None:
                continue
            if IN_CI:
                raise pytest.UsageError(f"CI=true and a prerequisite of the {marker} tests is missing: {reason}")
            item.add_marker(pytest.mark.skip(reason=reason))
        if asyncio.iscoroutinefunction(getattr(item, "function", None)):
            item.fixturenames.insert(0, "_no_leaked_tasks")  # type: ignore[attr-defined]


@pytest.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks running: a leaked task is a store or loop nobody stopped."""
    before = asyncio.all_tasks()
    yield
    for _ in range(3):  # let tasks that were just cancelled run to their end (no time passes)
        await asyncio.sleep(0)
    current = asyncio.current_task()
    # gRPC's own helper tasks (compiled coroutines, no code object) wind down with their channel: not ours.
    leaked = [
        t
        for t in asyncio.all_tasks() - before
        if t is not current and not t.done() and isinstance(t.get_coro(), types.CoroutineType)
    ]
    if leaked:
        for task in leaked:
            task.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"the test left {len(leaked)} task(s) running: {[(t.get_name(), t.get_coro()) for t in leaked]}")
