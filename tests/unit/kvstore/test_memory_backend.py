"""The in-memory double obeys the same contract as etcd (the integration tests run the same checks on etcd)."""

from __future__ import annotations

from kvstore.memory import MemoryBackend
from kvstore.testing import check_backend


async def test_memory_backend_honours_the_backend_contract() -> None:
    await check_backend(MemoryBackend(), "contract/")
