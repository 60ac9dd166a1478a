"""Every package's `__all__` names exactly what it exports, and nothing in it is missing."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["kvstore", "certs"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    missing = [symbol for symbol in exported if not hasattr(module, symbol)]
    assert missing == []


@pytest.mark.parametrize("name", PACKAGES)
def test_public_names_are_all_listed(name: str) -> None:
    module = importlib.import_module(name)
    public = {
        symbol
        for symbol, value in vars(module).items()
        if not symbol.startswith("_") and not getattr(value, "__name__", "").startswith(f"{name}.")
    }
    assert public <= set(module.__all__), public - set(module.__all__)
