"""The in-memory double of the datapath's maps passes the same checks as the kernel's (tests/e2e/test_bpf_maps.py)."""

from __future__ import annotations

import pytest

from bpf.maps import memory_map
from bpf.testing import CHECKS, MapFactory


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_double_keeps_the_maps_contract(check: object) -> None:
    factory: MapFactory = memory_map
    check(factory)  # type: ignore[operator]
