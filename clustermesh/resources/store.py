"""The ResourceStore: one small interface over Kubernetes-shaped objects, with two implementations.

- `resources.standalone.StandaloneStore`: objects as JSON under `registry/` of the cluster's own etcd, for hosts
  and VMs without Kubernetes, and for the lab;
- `resources.kubernetes.KubernetesStore`: a real Kubernetes API server, through the official client.

Contract, for both:

- `list(kind)` returns every object of the kind (all namespaces) and the collection's resourceVersion;
- `watch(kind, resource_version)` yields `WatchEvent`s after that version, in order; when that version is too old
  to watch from (etcd compacted it; Kubernetes answers 410 Gone), it raises `Gone`, and the caller lists again;
  when the connection breaks it raises `Unavailable`;
- `create` fails with `AlreadyExists`; `update` is optimistic: it fails with `Conflict` unless the object's
  `metadata.resourceVersion` is the stored one; `delete` fails with `NotFound`, and with `resource_version` given,
  with `Conflict` unless that is the stored version (Kubernetes' delete preconditions);
- objects are validated on the way in (`clustermesh.model.validation`): a bad one is refused with `Invalid`,
  naming the field;
- every object returned carries `metadata.resourceVersion`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.model.validation import validate_object

__all__ = [
    "AlreadyExists",
    "Conflict",
    "Gone",
    "Invalid",
    "NotFound",
    "ObjectList",
    "ResourceError",
    "ResourceStore",
    "Unavailable",
    "WatchEvent",
    "checked",
    "describe",
]

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class ResourceError(Exception):
    """Base of the ResourceStore's errors. `code` is the HTTP status Kubernetes would answer."""

    code = 500


class NotFound(ResourceError):
    code = 404


class AlreadyExists(ResourceError):
    code = 409


class Conflict(ResourceError):
    """The object changed since it was read: read it again and retry."""

    code = 409


class Gone(ResourceError):
    """The resourceVersion is too old to watch from: list again."""

    code = 410


class Invalid(ResourceError):
    code = 422


class Unavailable(ResourceError):
    """The store cannot be reached now; retry later."""

    code = 503


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: Object


@dataclass(frozen=True)
class ObjectList:
    items: list[Object]
    resource_version: str


class ResourceStore(Protocol):
    async def list(self, kind: Kind) -> ObjectList: ...

    def watch(self, kind: Kind, resource_version: str) -> AsyncIterator[WatchEvent]: ...

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Object | None: ...

    async def create(self, obj: Object) -> Object: ...

    async def update(self, obj: Object) -> Object: ...

    async def delete(
        self, kind: Kind, name: str, namespace: str | None = None, *, resource_version: str | None = None
    ) -> None: ...

    async def close(self) -> None: ...


def checked(obj: Object) -> tuple[Kind, str, str | None]:
    """A valid object's kind, name and namespace (None for a cluster-wide kind); `Invalid`, naming the field, if
    it is not valid. Every store checks what it is given to write with it."""
    try:
        validate_object(obj)
        kind = kind_by_name(obj["kind"])
    except ModelError as exc:
        raise Invalid(str(exc)) from exc
    metadata = obj["metadata"]
    return kind, metadata["name"], metadata.get("namespace") if kind.namespaced else None


def describe(kind: Kind, name: str, namespace: str | None) -> str:
    """How errors name an object: `Service shop/echo`, `Namespace shop`."""
    return f"{kind.name} {namespace or 'default'}/{name}" if kind.namespaced else f"{kind.name} {name}"
