"""Sub-ranges of a prefix (kvstore.ranges): whatever the split points, they cover exactly the prefix's keys, in key
order, with nothing twice; the agent's split points for ipcache keys; the memory backend lists by them."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.backend import PutOp
from kvstore.memory import MemoryBackend
from kvstore.ranges import cidr_key_prefixes, prefix_end, sub_ranges

PREFIX = "cilium/state/ip/v1/default/"
keys_in_prefix = st.lists(st.text(alphabet=string.digits + "./:abf", min_size=1, max_size=12), max_size=60)


@settings(max_examples=200, deadline=None)
@given(suffixes=keys_in_prefix, splits=st.lists(st.text(alphabet=string.digits + "./:abf\xff", max_size=10),
                                                   max_size=12), outside=st.booleans())  # fmt: skip
def test_sub_ranges_cover_every_key_of_the_prefix_once_in_order(suffixes: list[str], splits: list[str],
                                                                  outside: bool) -> None:  # fmt: skip
    keys = sorted({(PREFIX + s).encode() for s in suffixes})
    points = [PREFIX + s for s in splits] + (["cilium/state/ip/v0", "zzz", ""] if outside else [])
    ranges = sub_ranges(PREFIX, points)
    assert ranges[0][0] == PREFIX.encode() and ranges[-1][1] == prefix_end(PREFIX.encode())
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    listed = [key for start, end in ranges for key in keys if start <= key < end]
    assert listed == keys


def test_prefix_end_is_the_first_key_after_the_prefix() -> None:
    assert prefix_end(b"a/b/") == b"a/b0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == b"\x00"


def test_split_points_of_pod_cidrs_are_their_octet_aligned_key_prefixes() -> None:
    points = cidr_key_prefixes(PREFIX, ["10.2.1.0/24", "10.3.0.0/16", "10.4.16.0/20", "fd00::/64", "junk", "0.0.0.0/0"])
    assert points == sorted([PREFIX + "10.2.1.", PREFIX + "10.2.1/", PREFIX + "10.3.", PREFIX + "10.3/",
                             PREFIX + "10.4.", PREFIX + "10.4/"])  # fmt: skip


async def test_the_memory_backend_lists_by_sub_ranges_what_it_lists_at_once() -> None:
    backend = MemoryBackend()
    keys = [f"{PREFIX}10.{a}.{b}.{c}" for a in (1, 2, 3) for b in (0, 7, 19) for c in (1, 5, 250)]
    await backend.commit([PutOp(key, b"v") for key in keys[:100]])
    await backend.commit([PutOp("cilium/state/ip/v1/other", b"x"), PutOp("cilium/state/ip/v1/default0", b"x")])
    whole = await backend.list_prefix(PREFIX)
    pages = [page async for page in backend.list_pages(PREFIX, splits=cidr_key_prefixes(PREFIX, ["10.2.7.0/24"]))]
    assert [e.key for page in pages for e in page.entries] == [e.key for e in whole.entries] == sorted(keys)
    assert len(pages) == 3 and {page.revision for page in pages} == {whole.revision}
