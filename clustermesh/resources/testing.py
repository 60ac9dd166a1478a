"""The ResourceStore contract as runnable checks: `check_store(store)` runs them all against one store.

The standalone store (over MemoryBackend in unit tests, over etcd in integration tests) and the Kubernetes store
(over the stand-in API server) both pass them: one contract, two implementations, checked the same way.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable

from clustermesh.model.kinds import Kind, Object, kind_by_name
from clustermesh.resources.store import AlreadyExists, Conflict, Gone, Invalid, NotFound, ResourceStore, WatchEvent

__all__ = ["check_store", "node", "service"]

CILIUM_NODE = kind_by_name("CiliumNode")
SERVICE = kind_by_name("Service")


def node(name: str, ip: str = "192.168.0.1") -> Object:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"addresses": [{"type": "InternalIP", "ip": ip}], "ipam": {"podCIDRs": ["10.1.0.0/24"]}},
    }


def service(name: str, namespace: str | None = None) -> Object:
    metadata: dict[str, object] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


async def _next(stream: AsyncIterator[WatchEvent], timeout: float = 5.0) -> WatchEvent:
    return await asyncio.wait_for(anext(stream), timeout)


async def check_create_get_update_delete(store: ResourceStore, prefix: str) -> None:
    created = await store.create(node(f"{prefix}n1"))
    rv1 = created["metadata"]["resourceVersion"]
    assert rv1, "a created object carries its resourceVersion"
    try:
        await store.create(node(f"{prefix}n1"))
    except AlreadyExists:
        pass
    else:
        raise AssertionError("creating an existing object did not raise AlreadyExists")
    got = await store.get(CILIUM_NODE, f"{prefix}n1")
    assert got is not None and got["spec"]["addresses"][0]["ip"] == "192.168.0.1"
    assert got["metadata"]["resourceVersion"] == rv1
    changed = copy.deepcopy(got)
    changed["spec"]["addresses"][0]["ip"] = "192.168.0.2"
    updated = await store.update(changed)
    assert updated["metadata"]["resourceVersion"] != rv1
    stale = copy.deepcopy(got)  # still carries rv1
    stale["spec"]["addresses"][0]["ip"] = "192.168.0.3"
    try:
        await store.update(stale)
    except Conflict:
        pass
    else:
        raise AssertionError("an update with a stale resourceVersion did not raise Conflict")
    again = await store.get(CILIUM_NODE, f"{prefix}n1")
    assert again is not None and again["spec"]["addresses"][0]["ip"] == "192.168.0.2"
    assert again["metadata"].get("uid") == created["metadata"].get("uid")
    await store.delete(CILIUM_NODE, f"{prefix}n1")
    assert await store.get(CILIUM_NODE, f"{prefix}n1") is None
    for call in (lambda: store.delete(CILIUM_NODE, f"{prefix}n1"), lambda: store.update(again)):
        try:
            await call()
        except NotFound:
            pass
        else:
            raise AssertionError("a missing object did not raise NotFound")
    try:
        await store.delete(SERVICE, f"{prefix}absent")  # no namespace given: the default one, and the error says so
    except NotFound as exc:
        assert f"Service default/{prefix}absent" in str(exc), exc
    else:
        raise AssertionError("a missing Service did not raise NotFound")


async def check_invalid_objects_are_refused_naming_the_field(store: ResourceStore, prefix: str) -> None:
    bad = node(f"{prefix}bad", ip="10.0.0")
    try:
        await store.create(bad)
    except Invalid as exc:
        assert "spec.addresses[0].ip" in str(exc) and f"{prefix}bad" in str(exc), str(exc)
    else:
        raise AssertionError("an invalid object was accepted")
    assert await store.get(CILIUM_NODE, f"{prefix}bad") is None


async def check_list_and_watch(store: ResourceStore, prefix: str) -> None:
    await store.create(service(f"{prefix}a", "ns1"))
    await store.create(service(f"{prefix}b"))  # no namespace: "default"
    listing = await store.list(SERVICE)
    mine = {
        (item["metadata"]["namespace"], item["metadata"]["name"]): item
        for item in listing.items
        if item["metadata"]["name"].startswith(prefix)
    }
    assert set(mine) == {("ns1", f"{prefix}a"), ("default", f"{prefix}b")}
    assert all(item["kind"] == "Service" and item["apiVersion"] == "v1" for item in mine.values())
    assert all(item["metadata"].get("resourceVersion") for item in mine.values())
    stream = store.watch(SERVICE, listing.resource_version)
    try:
        await store.create(service(f"{prefix}c", "ns1"))
        current = await store.get(SERVICE, f"{prefix}a", "ns1")
        assert current is not None
        current["spec"]["selector"] = {"app": "a"}
        await store.update(current)
        await store.delete(SERVICE, f"{prefix}b", "default")
        seen = [await _next(stream) for _ in range(3)]
        assert [(e.type, e.object["metadata"]["name"]) for e in seen] == [
            ("ADDED", f"{prefix}c"),
            ("MODIFIED", f"{prefix}a"),
            ("DELETED", f"{prefix}b"),
        ], seen
        assert seen[1].object["spec"]["selector"] == {"app": "a"}
        assert seen[2].object["metadata"]["namespace"] == "default"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def check_delete_with_a_precondition(store: ResourceStore, prefix: str) -> None:
    """`delete(..., resource_version=V)` deletes only the version V: a change made meanwhile wins (Conflict)."""
    created = await store.create(node(f"{prefix}n1"))
    changed = copy.deepcopy(created)
    changed["spec"]["addresses"][0]["ip"] = "192.168.0.9"
    updated = await store.update(changed)
    try:
        await store.delete(CILIUM_NODE, f"{prefix}n1", resource_version=created["metadata"]["resourceVersion"])
    except Conflict:
        pass
    else:
        raise AssertionError("a delete of a version that changed since did not raise Conflict")
    assert await store.get(CILIUM_NODE, f"{prefix}n1") is not None, "the changed object survived"
    await store.delete(CILIUM_NODE, f"{prefix}n1", resource_version=updated["metadata"]["resourceVersion"])
    assert await store.get(CILIUM_NODE, f"{prefix}n1") is None


CHECKS: list[Callable[[ResourceStore, str], Awaitable[None]]] = [
    check_create_get_update_delete,
    check_delete_with_a_precondition,
    check_invalid_objects_are_refused_naming_the_field,
    check_list_and_watch,
]


async def check_store(store: ResourceStore, prefix: str = "check-") -> None:
    """Run every check; object names start with `prefix` (lower-case, DNS-safe)."""
    for number, check in enumerate(CHECKS):
        await check(store, f"{prefix}{number}-")


async def check_gone(store: ResourceStore, kind: Kind, old_resource_version: str) -> None:
    """A watch from a resourceVersion whose history is gone raises Gone (the caller makes it so first)."""
    stream = store.watch(kind, old_resource_version)
    try:
        await _next(stream)
    except Gone:
        return
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    raise AssertionError("a watch from a compacted resourceVersion did not raise Gone")
