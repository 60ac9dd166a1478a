"""The layering of DESIGN section 2, enforced: import-linter's contracts (in pyproject.toml) must all hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _layer_entries() -> list[str]:
    """Every module named in the layers contract (`a | b`, `a : b`, `(optional)`)."""
    import re
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    layers = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")["layers"]
    return [name.strip("() ") for layer in layers for name in re.split(r"[|:]", layer)]


def _our_modules() -> list[str]:
    import tomllib

    roots = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
    modules = []
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.append(".".join(parts))
    return modules


def test_every_module_sits_in_a_layer() -> None:
    """A module outside every layer is free to import anything: the layering says nothing about it."""
    entries = _layer_entries()
    roots = {entry.split(".")[0] for entry in entries}
    outside = [
        module
        for module in _our_modules()
        if module not in roots  # a root package's __init__ holds no code of a layer
        and not any(module == entry or module.startswith(f"{entry}.") for entry in entries)
    ]
    assert not outside, f"modules in no layer of pyproject.toml's layers contract: {outside}"
