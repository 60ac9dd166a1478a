"""Rendering for the CLI, in one place: tables for people (rich), JSON for programs, logs and progress to stderr.

With `-o json`, stdout carries exactly one JSON document and nothing else.
"""

from __future__ import annotations

import datetime
import enum
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["Format", "err", "out", "print_json", "print_table", "step"]

# Not a terminal (a pipe, a CI log): do not fold tables at 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"
    wide = "wide"


def _default(value: object) -> object:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise TypeError(f"cannot render {type(value).__name__}")


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None) -> None:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    out.print(table)


def step(message: str) -> None:
    """A progress line on stderr: what the command is doing now."""
    err.print(f"[bold cyan]==>[/] {message}")
