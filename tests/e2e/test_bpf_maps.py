"""The kernel's maps, made with bpf(2) from Python, against the contract the in-memory double also keeps."""

from __future__ import annotations

import os

import pytest

from bpf import syscall
from bpf.maps import SHAPES, RawMap
from bpf.testing import CHECKS, MapFactory

TYPES = {"endpoints": syscall.MAP_TYPE_HASH, "lpm-ipcache": syscall.MAP_TYPE_LPM_TRIE,
         "lpm-policy": syscall.MAP_TYPE_LPM_TRIE, "lb-services": syscall.MAP_TYPE_HASH,
         "lb-backends": syscall.MAP_TYPE_HASH, "lb-revnat": syscall.MAP_TYPE_HASH}  # fmt: skip


@pytest.fixture
def kernel_maps() -> object:
    made: list[syscall.MapFd] = []

    def make(kind: str, max_entries: int) -> RawMap:
        key_size, value_size, lpm = SHAPES[kind]
        fd = syscall.create_map(TYPES[kind], key_size, value_size, max_entries,
                                flags=syscall.F_NO_PREALLOC if lpm else 0, name=f"cmtest_{kind[:8]}")  # fmt: skip
        made.append(syscall.MapFd(fd))
        return made[-1]

    yield make
    for raw in made:
        raw.close()  # an unpinned map goes with its last fd


@pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root")
@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_kernels_maps_keep_the_contract(kernel_maps: MapFactory, check: object) -> None:
    check(kernel_maps)  # type: ignore[operator]
