"""Listing a large prefix of a real etcd by sub-ranges (issue 14): split at any points, or split by the store itself,
the listing equals the whole prefix read at once at the listing's revision, also while writes go on; and no request
after a range's first page is one whose remaining part etcd must count at length."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvstore import etcd
from kvstore.backend import DeleteOp, PutOp
from kvstore.ranges import cidr_key_prefixes, prefix_end
from tests.integration.conftest import EtcdCluster

COUNT = 60_000


@pytest.fixture
async def loaded(etcd_cluster: EtcdCluster, prefix: str) -> AsyncIterator[tuple[etcd.EtcdBackend, list[str]]]:
    """COUNT ipcache-shaped keys under the test's prefix (`<prefix>10.<a>.<b>.<c>`)."""
    backend = await etcd_cluster.connect()
    keys = [f"{prefix}10.{n // 65536 + 1}.{n // 256 % 256}.{n % 256}" for n in range(COUNT)]
    for start in range(0, COUNT, 128):
        await backend.commit([PutOp(key, b"v" * 40) for key in keys[start : start + 128]])
    try:
        yield backend, keys
    finally:
        await backend.delete_prefix(prefix)
        await backend.close()


async def whole(backend: etcd.EtcdBackend, prefix: str, revision: int) -> list[tuple[str, bytes]]:
    """The prefix in one unpaged request at `revision`: the truth to compare with."""
    response = await backend._kv.get(prefix.encode(), prefix_end(prefix.encode()), revision=revision, timeout=60)
    return [(kv.key.decode(), kv.value) for kv in response.kvs]


def recording(backend: etcd.EtcdBackend) -> list[tuple[int, int]]:
    """(count, keys returned) of every paged request the backend makes from now on."""
    seen: list[tuple[int, int]] = []
    original = backend._range

    async def range_(prefix: str, start: bytes, end: bytes, revision: int) -> Any:
        response = await original(prefix, start, end, revision)
        seen.append((int(response.count), len(response.kvs)))
        return response

    backend._range = range_  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("how", ["store", "cidrs", "random", "outside"])
async def test_a_split_listing_equals_the_whole_prefix_at_its_revision(
    loaded: tuple[etcd.EtcdBackend, list[str]], prefix: str, how: str
) -> None:
    backend, keys = loaded
    rng = random.Random(how)
    splits = {
        "store": [],
        "cidrs": cidr_key_prefixes(prefix, ["10.1.0.0/16", "10.1.7.0/24", "10.1.40.0/24"]),
        "random": sorted([*rng.sample(keys, 40), prefix + "10.1.3", prefix + "zz"]),
        "outside": ["a", prefix[:-1], prefix + "\xff"],
    }[how]
    requests = recording(backend)
    pages = [page async for page in backend.list_pages(prefix, splits=splits)]
    revision = pages[0].revision
    assert {page.revision for page in pages} == {revision}
    listed = [(entry.key, entry.value) for page in pages for entry in page.entries]
    assert listed == await whole(backend, prefix, revision)
    assert len(listed) == COUNT
    # A range's first request counts its whole range once; then the store splits it: no later request counts a
    # large remainder (without the split: 11 more pages, each counting all that is left)
    large = [i for i, (count, got) in enumerate(requests) if count - got > etcd.SPLIT_ABOVE]
    assert len(large) == (1 if how in ("store", "outside") else len(large)) and len(large) <= 1, (large, requests[:5])
    assert len(requests) >= COUNT // etcd.LIST_PAGE_SIZE


async def test_a_split_listing_under_concurrent_writes_is_one_snapshot(
    loaded: tuple[etcd.EtcdBackend, list[str]], prefix: str
) -> None:
    backend, keys = loaded
    stop = asyncio.Event()
    writes = 0

    async def writer() -> None:
        nonlocal writes
        rng = random.Random(7)
        while not stop.is_set():
            new = f"{prefix}10.9.{rng.randrange(256)}.{rng.randrange(256)}"
            await backend.commit([PutOp(rng.choice(keys), b"changed"), DeleteOp(rng.choice(keys)), PutOp(new, b"new")])
            writes += 1

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.2)
        for splits in ([], cidr_key_prefixes(prefix, ["10.1.0.0/24", "10.9.0.0/16"])):
            pages = [page async for page in backend.list_pages(prefix, splits=splits)]
            revision = pages[0].revision
            listed = [(entry.key, entry.value) for page in pages for entry in page.entries]
            assert listed == await whole(backend, prefix, revision), "one consistent snapshot"
    finally:
        stop.set()
        await task
    assert writes > 10, "the writes went on during the listings"
