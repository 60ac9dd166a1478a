"""KubernetesStore against the stand-in API server (clustermesh/lab/standin.py): no kube-apiserver can run here.

Every wait is on an event (the next watch event, a watch being open), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes.client import Configuration

from clustermesh.lab.standin import StandinAPIServer
from clustermesh.model.kinds import Kind, kind_by_name
from clustermesh.resources.kubernetes import KubernetesStore
from clustermesh.resources.store import (
    AlreadyExists,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    ResourceError,
    Unavailable,
    WatchEvent,
)
from clustermesh.resources.testing import check_gone, check_store, node, service

CILIUM_NODE = kind_by_name("CiliumNode")
SERVICE = kind_by_name("Service")


def _watch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("k8s-watch-")]


@pytest.fixture(autouse=True)
def _no_leaked_watch_threads() -> Iterator[None]:
    yield
    assert _watch_threads() == [], "a watch thread outlived its test"


@pytest.fixture
def server() -> Iterator[StandinAPIServer]:
    with StandinAPIServer() as standin:
        yield standin


@pytest.fixture
async def store(server: StandinAPIServer) -> AsyncIterator[KubernetesStore]:
    kubernetes_store = KubernetesStore(Configuration(host=server.url))
    try:
        yield kubernetes_store
    finally:
        await kubernetes_store.close()


async def _next(stream: AsyncIterator[WatchEvent], timeout: float = 5.0) -> WatchEvent:
    return await asyncio.wait_for(anext(stream), timeout)


def _names(events: list[WatchEvent]) -> list[tuple[str, str]]:
    return [(event.type, event.object["metadata"]["name"]) for event in events]


# --- the ResourceStore conformance suite (resources/testing.py), shared with the standalone store


async def test_kubernetes_store_honours_the_contract(store: KubernetesStore) -> None:
    await check_store(store)


async def test_a_compacted_resource_version_is_gone_by_the_contract(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    old = (await store.list(CILIUM_NODE)).resource_version
    await store.create(node("n1"))
    server.compact()
    await check_gone(store, CILIUM_NODE, old)


# --- create, get, update, delete


async def test_create_get_update_delete_and_their_errors(store: KubernetesStore, server: StandinAPIServer) -> None:
    created = await store.create(node("n1"))
    assert created["apiVersion"] == "cilium.io/v2" and created["kind"] == "CiliumNode"
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    rv1 = created["metadata"]["resourceVersion"]

    with pytest.raises(AlreadyExists, match=r"CiliumNode n1.*already exists"):
        await store.create(node("n1"))

    got = await store.get(CILIUM_NODE, "n1")
    assert got == created

    changed = copy.deepcopy(got)
    changed["spec"]["addresses"][0]["ip"] = "192.168.0.2"
    updated = await store.update(changed)
    assert updated["metadata"]["resourceVersion"] != rv1
    put = [r for r in server.requests if r.method == "PUT"]
    assert [r.path for r in put] == ["/apis/cilium.io/v2/ciliumnodes/n1"]

    with pytest.raises(Conflict, match=r"CiliumNode n1: .*the object has been modified"):
        await store.update(got)  # still carries rv1

    await store.delete(CILIUM_NODE, "n1")
    assert await store.get(CILIUM_NODE, "n1") is None
    assert server.objects(CILIUM_NODE) == []
    with pytest.raises(NotFound, match=r"cannot delete CiliumNode n1: .*not found"):
        await store.delete(CILIUM_NODE, "n1")
    with pytest.raises(NotFound, match=r"cannot update CiliumNode n1"):
        await store.update(updated)


async def test_namespaced_objects_go_to_their_namespace(store: KubernetesStore, server: StandinAPIServer) -> None:
    await store.create(service("web", "shop"))
    await store.create(service("api"))  # no namespace: "default"
    assert [r.path for r in server.requests if r.method == "POST"] == [
        "/api/v1/namespaces/shop/services",
        "/api/v1/namespaces/default/services",
    ]
    assert await store.get(SERVICE, "web", "shop") is not None
    assert await store.get(SERVICE, "web", "default") is None
    with pytest.raises(NotFound, match=r"Service other/web"):
        await store.delete(SERVICE, "web", "other")


async def test_a_create_drops_a_copied_resource_version(store: KubernetesStore) -> None:
    first = await store.create(node("n1"))
    await store.delete(CILIUM_NODE, "n1")
    again = await store.create(first)  # a copy of a read object: the server refuses a resourceVersion on create
    assert again["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]


async def test_an_invalid_object_is_refused_naming_the_field_before_any_request(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    with pytest.raises(Invalid, match=r"CiliumNode 'bad': spec\.addresses\[0\]\.ip: .*not an IP address"):
        await store.create(node("bad", ip="10.0.0"))
    bad = service("web")
    bad["spec"]["ports"][0]["port"] = 70000
    with pytest.raises(Invalid, match=r"spec\.ports\[0\]\.port"):
        await store.update(bad)
    assert server.requests == []


# --- list


async def test_list_returns_every_namespace_with_api_version_and_kind(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    await store.create(service("a", "ns1"))
    await store.create(service("b", "ns2"))
    await store.create(node("n1"))
    listing = await store.list(SERVICE)
    assert listing.resource_version == server.resource_version
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listing.items] == [("ns1", "a"), ("ns2", "b")]
    assert all(i["apiVersion"] == "v1" and i["kind"] == "Service" for i in listing.items)
    assert all(i["metadata"]["resourceVersion"] for i in listing.items)


async def test_list_reads_in_pages(server: StandinAPIServer) -> None:
    store = KubernetesStore(Configuration(host=server.url), page_size=2)
    try:
        for i in range(5):
            await store.create(node(f"n{i}"))
        version = server.resource_version
        listing = await store.list(CILIUM_NODE)
        assert [i["metadata"]["name"] for i in listing.items] == [f"n{i}" for i in range(5)]
        assert listing.resource_version == version
        pages = [r for r in server.requests if r.method == "GET"]
        assert [(r.query.get("limit"), bool(r.query.get("continue"))) for r in pages] == [
            ("2", False),
            ("2", True),
            ("2", True),
        ]
    finally:
        await store.close()


async def test_list_starts_over_unpaged_when_its_continue_token_expired(server: StandinAPIServer) -> None:
    store = KubernetesStore(Configuration(host=server.url), page_size=2)
    try:
        for i in range(3):
            await store.create(node(f"n{i}"))
        server.expire_continue_tokens = True
        listing = await store.list(CILIUM_NODE)
        assert [i["metadata"]["name"] for i in listing.items] == ["n0", "n1", "n2"]
        assert [r.query.get("limit") for r in server.requests if r.method == "GET"] == ["2", "2", None]
    finally:
        await store.close()


async def test_a_kind_the_server_does_not_serve_is_named(store: KubernetesStore) -> None:
    unknown = Kind("Widget", "example.io", "v1", "widgets", False)
    with pytest.raises(NotFound, match=r"does not serve example.io/v1 widgets \(is its CRD installed\?\)"):
        await store.list(unknown)


# --- errors, translated once


@pytest.mark.parametrize(
    ("code", "reason", "error"),
    [
        (500, "InternalError", Unavailable),
        (503, "ServiceUnavailable", Unavailable),
        (429, "TooManyRequests", Unavailable),
        (409, "Conflict", Conflict),
        (409, "AlreadyExists", AlreadyExists),
        (410, "Gone", Gone),
        (422, "Invalid", Invalid),
        (403, "Forbidden", ResourceError),
    ],
)
async def test_http_statuses_become_store_errors_naming_what_and_why(
    store: KubernetesStore, server: StandinAPIServer, code: int, reason: str, error: type[ResourceError]
) -> None:
    server.fail_next(code, reason, "the server says no")
    with pytest.raises(error, match=r"cannot update CiliumNode n1: .*the server says no") as raised:
        await store.update(node("n1"))
    assert raised.value.code == (code if error is ResourceError else error.code)  # a 403 keeps its own code


async def test_a_plain_text_error_from_a_proxy_is_unavailable(store: KubernetesStore, server: StandinAPIServer) -> None:
    server.fail_next(502, message="Bad Gateway from the load balancer")
    with pytest.raises(Unavailable, match=r"cannot read Service default/web: Bad Gateway from the load balancer"):
        await store.get(SERVICE, "web")


async def test_a_missing_object_is_none_but_a_missing_route_is_named(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    assert await store.get(CILIUM_NODE, "nothing") is None
    server.fail_next(404, message="404 page not found")
    with pytest.raises(NotFound, match=r"does not serve cilium.io/v2 ciliumnodes"):
        await store.get(CILIUM_NODE, "nothing")


@pytest.mark.parametrize(("code", "reason", "error"), [(410, "Expired", Gone), (500, "InternalError", Unavailable)])
async def test_a_watch_refused_with_an_http_status_raises(
    store: KubernetesStore, server: StandinAPIServer, code: int, reason: str, error: type[ResourceError]
) -> None:
    server.fail_next(code, reason, "not from there")
    stream = store.watch(CILIUM_NODE, "1")
    try:
        with pytest.raises(error, match=r"watch of ciliumnodes: not from there"):
            await _next(stream)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


# --- watch


async def test_watch_delivers_changes_in_order_from_a_resource_version(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    await store.create(node("before"))
    since = (await store.list(CILIUM_NODE)).resource_version
    n1 = await store.create(node("n1"))
    await store.create(service("unrelated"))
    changed = copy.deepcopy(n1)
    changed["spec"]["addresses"][0]["ip"] = "192.168.0.9"
    await store.update(changed)
    stream = store.watch(CILIUM_NODE, since)
    try:
        seen = [await _next(stream), await _next(stream)]  # replayed from the history
        await store.delete(CILIUM_NODE, "n1")
        seen.append(await _next(stream))  # live
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert _names(seen) == [("ADDED", "n1"), ("MODIFIED", "n1"), ("DELETED", "n1")]
    assert seen[1].object["spec"]["addresses"][0]["ip"] == "192.168.0.9"
    assert all(e.object["kind"] == "CiliumNode" and e.object["apiVersion"] == "cilium.io/v2" for e in seen)
    versions = [int(e.object["metadata"]["resourceVersion"]) for e in seen]
    assert versions == sorted(versions) and versions[0] > int(since)
    watches = [r for r in server.requests if r.query.get("watch")]
    assert watches[0].path == "/apis/cilium.io/v2/ciliumnodes"
    assert watches[0].query["resourceVersion"] == since and watches[0].query["allowWatchBookmarks"] == "true"


async def test_a_compacted_resource_version_raises_gone(store: KubernetesStore, server: StandinAPIServer) -> None:
    old = (await store.list(CILIUM_NODE)).resource_version
    await store.create(node("n1"))
    server.compact()
    stream = store.watch(CILIUM_NODE, old)
    try:
        with pytest.raises(Gone, match=r"watch of ciliumnodes: too old resource version"):
            await _next(stream)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    # the current version is still fine to watch from
    stream = store.watch(CILIUM_NODE, server.resource_version)
    try:
        await store.create(node("n2"))
        assert _names([await _next(stream)]) == [("ADDED", "n2")]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_broken_watch_raises_unavailable(store: KubernetesStore, server: StandinAPIServer) -> None:
    stream = store.watch(CILIUM_NODE, (await store.list(CILIUM_NODE)).resource_version)
    try:
        await store.create(node("n1"))
        assert _names([await _next(stream)]) == [("ADDED", "n1")]  # the stream is open
        server.break_watches()
        with pytest.raises(Unavailable, match=r"watch of ciliumnodes"):
            await _next(stream)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_bookmarks_are_silent_and_a_watch_the_server_ends_resumes_from_the_last_one(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    stream = store.watch(CILIUM_NODE, (await store.list(CILIUM_NODE)).resource_version)
    try:
        await store.create(node("n1"))
        assert _names([await _next(stream)]) == [("ADDED", "n1")]
        await store.create(service("elsewhere"))  # moves the global resourceVersion past n1's
        bookmark = server.resource_version
        server.bookmark()
        server.end_watches()  # a clean end, as at the server's timeout
        await store.create(node("n2"))
        assert _names([await _next(stream)]) == [("ADDED", "n2")]  # the bookmark itself was never yielded
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    watches = [r.query["resourceVersion"] for r in server.requests if r.query.get("watch")]
    assert len(watches) == 2 and watches[1] == bookmark


async def test_cancelling_a_watch_ends_its_thread(store: KubernetesStore, server: StandinAPIServer) -> None:
    seen: asyncio.Queue[WatchEvent] = asyncio.Queue()

    async def consume() -> None:
        async for event in store.watch(CILIUM_NODE, server.resource_version):
            seen.put_nowait(event)

    task = asyncio.create_task(consume())
    await asyncio.to_thread(server.wait_for_watches, 1)
    await store.create(node("n1"))
    assert _names([await asyncio.wait_for(seen.get(), 5)]) == [("ADDED", "n1")]
    assert len(_watch_threads()) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _watch_threads() == []


async def test_closing_a_watch_before_its_first_event_ends_its_thread(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    stream = store.watch(CILIUM_NODE, server.resource_version)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.to_thread(server.wait_for_watches, 1)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await stream.aclose()  # type: ignore[attr-defined]
    assert _watch_threads() == []


async def test_closing_the_store_ends_its_watches_with_unavailable(server: StandinAPIServer) -> None:
    store = KubernetesStore(Configuration(host=server.url))
    stream = store.watch(CILIUM_NODE, server.resource_version)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.to_thread(server.wait_for_watches, 1)
    await store.close()
    with pytest.raises(Unavailable, match="the store was closed"):
        await asyncio.wait_for(pending, 5)
    await stream.aclose()  # type: ignore[attr-defined]


async def test_a_stopping_server_ends_the_watch_and_the_store_reports_it(server: StandinAPIServer) -> None:
    store = KubernetesStore(Configuration(host=server.url))
    try:
        stream = store.watch(CILIUM_NODE, server.resource_version)
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(server.wait_for_watches, 1)
        await asyncio.to_thread(server.stop)  # ends the open stream cleanly and returns
        with pytest.raises(Unavailable, match=r"watch of ciliumnodes"):
            await asyncio.wait_for(pending, 10)
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await store.close()


# --- objects that are not valid on the server


async def test_malformed_objects_on_the_server_are_skipped_and_named(
    store: KubernetesStore, server: StandinAPIServer
) -> None:
    await store.create(node("good-1"))
    server.put_raw({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "bad-ip"},
                    "spec": {"addresses": [{"type": "InternalIP", "ip": "10.0"}]}})  # fmt: skip
    server.put_raw({"metadata": {"name": "shapeless"}, "spec": []}, CILIUM_NODE)
    listing = await store.list(CILIUM_NODE)
    assert [i["metadata"]["name"] for i in listing.items] == ["good-1"]
    assert set(store.skipped) == {"ciliumnodes//bad-ip", "ciliumnodes//shapeless"}
    assert "spec.addresses[0].ip" in store.skipped["ciliumnodes//bad-ip"]
    assert await store.get(CILIUM_NODE, "bad-ip") is None

    stream = store.watch(CILIUM_NODE, listing.resource_version)
    try:
        server.put_raw({"metadata": {"name": "worse"}, "spec": {"addresses": "no"}}, CILIUM_NODE)
        await store.create(node("good-2"))
        await store.delete(CILIUM_NODE, "bad-ip")
        seen = [await _next(stream), await _next(stream)]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert _names(seen) == [("ADDED", "good-2"), ("DELETED", "bad-ip")]
    assert seen[1].object["kind"] == "CiliumNode" and seen[1].object["metadata"]["resourceVersion"]
    assert "ciliumnodes//worse" in store.skipped and "ciliumnodes//bad-ip" not in store.skipped


# --- connecting


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_server_is_unavailable() -> None:
    store = KubernetesStore(Configuration(host=f"http://127.0.0.1:{_free_port()}"))
    try:
        with pytest.raises(Unavailable, match=r"cannot list ciliumnodes: the API server is unreachable"):
            await store.list(CILIUM_NODE)
        with pytest.raises(Unavailable, match=r"cannot create CiliumNode n1"):
            await store.create(node("n1"))
        stream = store.watch(CILIUM_NODE, "1")
        with pytest.raises(Unavailable, match=r"watch of ciliumnodes"):
            await _next(stream)
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_from_kubeconfig_takes_the_named_context(server: StandinAPIServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters:
- {{name: standin, cluster: {{server: "{server.url}"}}}}
- {{name: nowhere, cluster: {{server: "http://127.0.0.1:{_free_port()}"}}}}
users:
- {{name: tester, user: {{token: secret-token}}}}
contexts:
- {{name: standin, context: {{cluster: standin, user: tester}}}}
- {{name: nowhere, context: {{cluster: nowhere, user: tester}}}}
current-context: nowhere
"""
    )
    store = KubernetesStore.from_kubeconfig(str(kubeconfig), "standin")
    try:
        await store.create(node("n1"))
        assert [i["metadata"]["name"] for i in (await store.list(CILIUM_NODE)).items] == ["n1"]
        assert {r.authorization for r in server.requests} == {"Bearer secret-token"}
    finally:
        await store.close()
    with pytest.raises(ResourceError, match=r"cannot load .*kubeconfig \(context missing\)"):
        KubernetesStore.from_kubeconfig(str(kubeconfig), "missing")


# --- the agent's own Node (`clustermesh-agent --pod-cidr from-node`, as the Helm chart runs it)


async def test_the_agent_waits_for_its_nodes_pod_cidrs_and_takes_them(server: StandinAPIServer, tmp_path: Path) -> None:
    from agent.main import pod_cidrs_from_node

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": server.url}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))  # fmt: skip
    waiting = asyncio.create_task(pod_cidrs_from_node(str(kubeconfig), None, "kind-worker", every=0.05))
    await asyncio.sleep(0.3)
    assert not waiting.done(), "no such Node yet: it waits"
    server.nodes["kind-worker"] = {"metadata": {"name": "kind-worker"}, "spec": {}}
    await asyncio.sleep(0.3)
    assert not waiting.done(), "a Node without a pod CIDR yet: it waits"
    server.nodes["kind-worker"] = {
        "metadata": {"name": "kind-worker"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00::/64"]},
    }
    assert await asyncio.wait_for(waiting, 5) == ["10.244.1.0/24", "fd00::/64"]
    assert any(r.path == "/api/v1/nodes/kind-worker" for r in server.requests)


async def test_an_older_node_with_only_spec_pod_cidr_is_read_too(
    server: StandinAPIServer, store: KubernetesStore
) -> None:
    server.nodes["old"] = {"metadata": {"name": "old"}, "spec": {"podCIDR": "10.1.2.0/24"}}
    assert await store.node_pod_cidrs("old") == ["10.1.2.0/24"]
    with pytest.raises(NotFound):
        await store.node_pod_cidrs("missing")


async def test_a_pods_labels_are_read_for_the_cni_which_is_told_none(
    server: StandinAPIServer, store: KubernetesStore
) -> None:
    server.pods[("shop", "web-1")] = {"metadata": {"name": "web-1", "namespace": "shop",
                                                   "labels": {"app": "web", "tier": "front"}}}  # fmt: skip
    assert await store.pod_labels("shop", "web-1") == {"app": "web", "tier": "front"}
    assert await store.pod_labels("shop", "gone") == {}, "no Pod: no labels (a runtime that is not Kubernetes')"
