"""`clustermesh apply / get / delete`: kubectl for the standalone store.

`apply` is create-or-update: an object that does not exist is created; one that exists is replaced by what the
file says (keeping its uid and creation time), with optimistic concurrency and a few retries on conflict; an object
whose content is already what the file says is left alone. Each object is reported (`ciliumnode/n1 created`);
an object that fails is reported with its name and the reason, and the others still go through.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.model.validation import validate_object
from clustermesh.resources.store import Invalid, NotFound, ResourceError, ResourceStore
from clustermesh.resources.writing import create_or_update

__all__ = ["Outcome", "apply_objects", "delete_objects", "load_manifests"]

_CONFLICT_RETRIES = 5
_SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields")


class ManifestError(Exception):
    """A manifest that cannot be read; the message names the file (and document)."""


@dataclass
class Outcome:
    ref: str  # kind/name or kind/namespace/name, as kubectl prints it
    action: str  # created, configured, unchanged, deleted, or failed
    error: str = ""


def _documents(text: str, source: str) -> Iterator[tuple[Any, str]]:
    try:
        for number, document in enumerate(yaml.safe_load_all(text), start=1):
            if document is None:
                continue
            if isinstance(document, dict) and document.get("kind") == "List":
                items = document.get("items")
                if items is None:
                    items = []
                if not isinstance(items, list):
                    raise ManifestError(
                        f"{source} (document {number}): a List's items must be a list of objects, "
                        f"not {type(items).__name__}"
                    )
                for index, item in enumerate(items):
                    yield item, f"{source} (document {number}, item {index})"
            else:
                yield document, f"{source} (document {number})"
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None


def load_manifests(paths: list[str]) -> list[tuple[Any, str]]:
    """Every document of the given files, folders (their *.yaml, *.yml, *.json, sorted) and `-` (stdin)."""
    found: list[tuple[Any, str]] = []
    for entry in paths:
        if entry == "-":
            try:
                text = sys.stdin.buffer.read().decode()
            except UnicodeDecodeError as exc:
                raise ManifestError(f"stdin: not UTF-8 text (byte {exc.start}): is it a manifest?") from None
            found.extend(_documents(text, "stdin"))
            continue
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
            if not files:
                raise ManifestError(f"{path}: no .yaml, .yml or .json files in this folder")
        elif path.exists():
            files = [path]
        else:
            raise ManifestError(f"{path}: no such file or folder")
        for file in files:
            try:
                text = file.read_bytes().decode()
            except OSError as exc:
                raise ManifestError(f"{file}: cannot read: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{file}: not UTF-8 text (byte {exc.start}): is it a manifest?") from None
            found.extend(_documents(text, str(file)))
    return found


def describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "object"
    kind = str(obj.get("kind") or "object").lower()
    metadata = obj.get("metadata")
    name = str(metadata.get("name") or "?") if isinstance(metadata, dict) else "?"
    return f"{kind}/{name}"


def _content(obj: Object) -> Object:
    """The object without the fields the server sets, to tell whether an update changes anything."""
    stripped = copy.deepcopy(obj)
    metadata = stripped.get("metadata") or {}
    for field in _SERVER_FIELDS:
        metadata.pop(field, None)
    for empty in ("labels", "annotations"):
        if not metadata.get(empty):
            metadata.pop(empty, None)
    return stripped


async def _apply_one(store: ResourceStore, obj: Object, kind: Kind) -> str:
    wanted = copy.deepcopy(obj)
    for field in _SERVER_FIELDS:
        wanted["metadata"].pop(field, None)
    written, _ = await create_or_update(
        store, wanted, same=lambda current, new: _content(current) == _content(new), attempts=_CONFLICT_RETRIES
    )
    return "configured" if written == "updated" else written


async def apply_objects(store: ResourceStore, documents: list[tuple[Any, str]]) -> list[Outcome]:
    outcomes = []
    for document, source in documents:
        ref = describe(document)
        try:
            obj = validate_object(copy.deepcopy(document))
            kind = kind_by_name(obj["kind"])
            outcomes.append(Outcome(ref, await _apply_one(store, obj, kind)))
        except ModelError as exc:
            outcomes.append(Outcome(ref, "failed", f"{source}: {exc}"))
        except ResourceError as exc:
            outcomes.append(Outcome(ref, "failed", str(exc)))
    return outcomes


async def delete_objects(store: ResourceStore, documents: list[tuple[Any, str]]) -> list[Outcome]:
    outcomes = []
    for document, source in documents:
        ref = describe(document)
        try:
            if not isinstance(document, dict):
                raise Invalid(f"{source}: a manifest must be a mapping")
            kind = kind_by_name(str(document.get("kind")))
            metadata = document.get("metadata") or {}
            name = metadata.get("name")
            if not name:
                raise Invalid(f"{source}: {ref} has no metadata.name")
            namespace = (metadata.get("namespace") or "default") if kind.namespaced else None
            await store.delete(kind, str(name), namespace)
            outcomes.append(Outcome(ref, "deleted"))
        except NotFound:
            outcomes.append(Outcome(ref, "failed", f"{ref} not found"))
        except (ModelError, ResourceError) as exc:
            outcomes.append(Outcome(ref, "failed", str(exc)))
    return outcomes
