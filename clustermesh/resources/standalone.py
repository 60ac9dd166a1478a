"""The standalone ResourceStore: Kubernetes-shaped objects kept as JSON under `registry/` of the cluster's etcd.

For hosts and VMs without Kubernetes, and for the lab. The layout follows kube-apiserver's own use of etcd:

    registry/<plural>/<namespace>/<name>     namespaced kinds
    registry/<plural>/<name>                 cluster-wide kinds

`metadata.resourceVersion` is the etcd revision of the object's last change (it is not stored in the value, it is
the key's mod revision), the collection's resourceVersion is the revision of the list, and optimistic concurrency is
an etcd transaction comparing the key's mod revision. A watch from a compacted revision raises `Gone`, exactly where
Kubernetes answers 410.

An object in etcd that does not decode or validate (written by hand with etcdctl, say) is skipped by `list` and
`watch`, logged and counted in `skipped`: it never stops the others.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from clustermesh.model import keys
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Kind, Object
from clustermesh.model.serviceips import keep_cluster_ip
from clustermesh.model.validation import validate_object
from clustermesh.resources.store import (
    AlreadyExists,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    ObjectList,
    Unavailable,
    WatchEvent,
    checked,
    describe,
)
from kvstore import errors as kverrors
from kvstore.backend import Backend, Delete

__all__ = ["StandaloneStore", "registry_key"]

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


def registry_key(kind: Kind, name: str, namespace: str | None = None) -> str:
    return keys.registry_key(kind.plural, name, (namespace or "default") if kind.namespaced else None)


def _stored_object(value: bytes) -> dict[str, Any]:
    """What is stored now; {} if it is not an object at all."""
    try:
        found = _decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {}
    return found if isinstance(found, dict) else {}


def _stored_metadata(value: bytes) -> dict[str, Any]:
    """The metadata of what is stored now; {} if it is not an object at all (then it is simply replaced)."""
    try:
        metadata = _decoder.decode(value).get("metadata")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


class StandaloneStore:
    """A ResourceStore over a kvstore Backend (the cluster's own etcd)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        #: key -> reason, for stored values that are not valid objects
        self.skipped: dict[str, str] = {}

    async def close(self) -> None:
        return None

    # --- reading

    def _decode(self, kind: Kind, key: str, value: bytes, revision: int) -> Object | None:
        try:
            obj = _decoder.decode(value)
            obj.setdefault("apiVersion", kind.api_version)
            obj.setdefault("kind", kind.name)
            if obj.get("kind") != kind.name:
                raise ModelError(f"holds a {obj.get('kind')!r}, not a {kind.name}")
            validate_object(obj)
        except (msgspec.DecodeError, msgspec.ValidationError, ModelError) as exc:
            reason = f"not a valid {kind.name}: {exc}"
            if self.skipped.get(key) != reason:
                log.warning("standalone store: skipping %s: %s", key, reason)
            self.skipped[key] = reason
            return None
        self.skipped.pop(key, None)
        obj["metadata"]["resourceVersion"] = str(revision)
        return obj

    async def list(self, kind: Kind) -> ObjectList:
        try:
            listing = await self.backend.list_prefix(keys.registry_kind_prefix(kind.plural))
        except kverrors.KVStoreError as exc:  # etcd away, or refusing us for now: the informer retries and says why
            raise Unavailable(f"cannot list {kind.plural}: {exc}") from exc
        items = [
            obj
            for entry in listing.entries
            if (obj := self._decode(kind, entry.key, entry.value, entry.mod_revision)) is not None
        ]
        return ObjectList(items, str(listing.revision))

    async def watch(self, kind: Kind, resource_version: str) -> AsyncIterator[WatchEvent]:
        prefix = keys.registry_kind_prefix(kind.plural)
        try:
            async for batch in self.backend.watch(prefix, start_revision=int(resource_version) + 1):
                for event in batch:
                    if isinstance(event, Delete):
                        yield WatchEvent("DELETED", self._stub(kind, event.key, event.revision))
                        continue
                    obj = self._decode(kind, event.key, event.value, event.revision)
                    if obj is not None:
                        yield WatchEvent("ADDED" if event.version == 1 else "MODIFIED", obj)
        except kverrors.RevisionCompacted as exc:
            raise Gone(f"{kind.plural}: resourceVersion {resource_version} is too old ({exc})") from exc
        except kverrors.KVStoreError as exc:
            raise Unavailable(f"watch of {kind.plural} broke: {exc}") from exc

    def _stub(self, kind: Kind, key: str, revision: int) -> Object:
        """What a DELETED event carries: the object's identity (the value is gone with the key)."""
        self.skipped.pop(key, None)
        try:
            namespace, name = keys.parse_registry_key(kind.plural, key, namespaced=kind.namespaced)
        except ModelError:  # written by hand under a path no object lives at: say what we can
            namespace, name = None, key.rsplit("/", 1)[-1]
        metadata: dict[str, Any] = {"name": name, "resourceVersion": str(revision)}
        if namespace is not None:
            metadata["namespace"] = namespace
        return {"apiVersion": kind.api_version, "kind": kind.name, "metadata": metadata}

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Object | None:
        key = registry_key(kind, name, namespace)
        try:
            entry = await self.backend.get(key)
        except kverrors.KVStoreError as exc:
            raise Unavailable(f"cannot read {describe(kind, name, namespace)}: {exc}") from exc
        if entry is None:
            return None
        return self._decode(kind, key, entry.value, entry.mod_revision)

    # --- writing

    @staticmethod
    def _encode(obj: Object) -> bytes:
        metadata = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
        return _encoder.encode({**obj, "metadata": metadata})

    async def create(self, obj: Object) -> Object:
        kind, name, namespace = checked(obj)
        stored = {**obj, "metadata": dict(obj["metadata"])}
        stored["metadata"].setdefault("uid", str(uuid.uuid4()))
        stored["metadata"].setdefault(
            "creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        try:
            revision = await self.backend.create(registry_key(kind, name, namespace), self._encode(stored))
        except kverrors.KVStoreError as exc:
            raise Unavailable(f"cannot create {describe(kind, name, namespace)}: {exc}") from exc
        if revision == 0:
            raise AlreadyExists(f"{describe(kind, name, namespace)} already exists")
        stored["metadata"]["resourceVersion"] = str(revision)
        return stored

    async def update(self, obj: Object) -> Object:
        """Replace the object; with `metadata.resourceVersion` set, only if it is still the stored one."""
        kind, name, namespace = checked(obj)
        key = registry_key(kind, name, namespace)
        what = describe(kind, name, namespace)
        try:
            current = await self.backend.get(key)
            if current is None:
                raise NotFound(f"{what} not found")
            expected = obj["metadata"].get("resourceVersion")
            if expected not in (None, "") and str(expected) != str(current.mod_revision):
                raise Conflict(
                    f"{what} was changed since resourceVersion {expected} (now {current.mod_revision}): "
                    "read it again and retry"
                )
            stored = {**obj, "metadata": dict(obj["metadata"])}
            if kind.name == "Service":  # its ClusterIP is the server's: kept when not named, never changed
                try:
                    stored = keep_cluster_ip(_stored_object(current.value), stored)
                except ModelError as exc:
                    raise Invalid(f"{what}: {exc}") from None
            previous = _stored_metadata(current.value)
            for field in ("uid", "creationTimestamp"):
                if field in previous:
                    stored["metadata"].setdefault(field, previous[field])
            revision = await self.backend.replace(key, self._encode(stored), mod_revision=current.mod_revision)
        except kverrors.KVStoreError as exc:
            raise Unavailable(f"cannot update {what}: {exc}") from exc
        if revision == 0:
            raise Conflict(f"{what} was changed concurrently: read it again and retry")
        stored["metadata"]["resourceVersion"] = str(revision)
        return stored

    async def delete(
        self, kind: Kind, name: str, namespace: str | None = None, *, resource_version: str | None = None
    ) -> None:
        key = registry_key(kind, name, namespace)
        what = describe(kind, name, namespace)
        try:
            current = await self.backend.get(key)
            if current is None:
                raise NotFound(f"{what} not found")
            if resource_version is not None and str(resource_version) != str(current.mod_revision):
                raise Conflict(f"{what} changed since resourceVersion {resource_version} (now {current.mod_revision})")
            expected = current.mod_revision
            if not await self.backend.delete_if(key, mod_revision=expected):
                raise Conflict(f"{what} was changed concurrently: read it again and retry")
        except kverrors.KVStoreError as exc:
            raise Unavailable(f"cannot delete {what}: {exc}") from exc
