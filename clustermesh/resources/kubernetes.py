"""The Kubernetes ResourceStore: the only module that imports the official `kubernetes` client.

Every kind (core, discovery.k8s.io, networking.k8s.io, the cilium.io CRDs, our own clustermesh.io/v1) goes through
one code path: raw JSON on `Kind.collection_path(namespace)` and `/<name>`, through the client's `ApiClient` (which
brings kubeconfig loading, TLS and token refresh), never through its generated models: in client 37,
`param_serialize` builds a request (URL, query, auth header) and `call_api` sends it; neither raises on an error
status. HTTP statuses, urllib3's errors (imported here too, for that) and the client's are translated once, in
`_translating`, into `resources.store` errors.

The client is synchronous. Plain calls run in `asyncio.to_thread`; a watch reads its chunked stream in a thread of
its own (a long watch must not hold a worker of the default executor) and hands each decoded line to the event loop
through a queue. Closing the watch shuts the socket down, which ends the read and the thread.

Like the standalone store, objects are validated on the way out too: one that does not validate (written by another
client, or by hand) is skipped, logged and counted in `skipped`, and never stops the others.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

import msgspec
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Kind, Object
from clustermesh.model.validation import validate_object
from clustermesh.resources.store import (
    AlreadyExists,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    ObjectList,
    ResourceError,
    Unavailable,
    WatchEvent,
    checked,
    describe,
)

__all__ = ["KubernetesStore"]

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(dict[str, Any])
# The untyped corners of the client, kept Any here at the edge.
_load_kube_config: Any = k8s_config.load_kube_config
_load_incluster_config: Any = k8s_config.load_incluster_config

_Query = list[tuple[str, Any]]
_Page = dict[str, Any]
_Request = tuple[str, str, dict[str, str], str | None, list[str]]  # what ApiClient.param_serialize returns
_HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}
_AUTH = ["BearerToken"]  # the client adds the kubeconfig's token (refreshed by its hook) under this name
_READ_SIZE = 64 * 1024
# A watch stream that the server ends cleanly is resumed from its last resourceVersion (kube-apiserver ends every
# watch after its timeout); one that ends this quickly with nothing in it is a server refusing to watch.
_MIN_WATCH_SECONDS = 1.0


#: core Nodes are no kind of the mesh's; the agent only reads its own Node's pod CIDRs
_NODE = Kind("Node", "", "v1", "nodes", False, ())
_POD = Kind("Pod", "", "v1", "pods", True, ())


class _StatusError(Exception):
    """A non-2xx answer (or a watch ERROR event) before translation: its code and the server's Status, if any."""

    def __init__(self, code: int, status: dict[str, Any] | None, text: str = "") -> None:
        super().__init__(f"HTTP {code}")
        self.code = code
        self.status = status
        self.text = text


def _status_error(code: int, body: bytes) -> _StatusError:
    try:
        status = _decoder.decode(body)
    except msgspec.DecodeError:
        return _StatusError(code, None, body.decode(errors="replace").strip()[:200])
    return _StatusError(code, status if status.get("kind") == "Status" else None)


@contextlib.contextmanager
def _translating(what: str, kind: Kind) -> Iterator[None]:
    """Turn HTTP statuses, urllib3 and client errors into `resources.store` errors, keeping the cause."""
    try:
        yield
    except ResourceError:
        raise
    except _StatusError as exc:
        raise _from_status(what, kind, exc) from exc
    except ApiException as exc:  # the client's own: TLS failures (status 0)
        raise Unavailable(f"{what}: the API server is unreachable: {exc.reason}") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unavailable(f"{what}: the API server is unreachable: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise Unavailable(f"{what}: the API server answered something that is not JSON: {exc}") from exc


def _from_status(what: str, kind: Kind, exc: _StatusError) -> ResourceError:
    status = exc.status or {}
    message = str(status.get("message") or exc.text or f"HTTP {exc.code}")
    reason = status.get("reason")
    text = f"{what}: {message}"
    if exc.code == 404:
        if exc.status is None:
            served = f"{kind.api_version} {kind.plural}"
            return NotFound(f"{what}: the API server does not serve {served} (is its CRD installed?): {message}")
        return NotFound(text)
    if exc.code == 409:
        return AlreadyExists(text) if reason == "AlreadyExists" else Conflict(text)
    if exc.code == 410:
        return Gone(text)
    if exc.code in (400, 422):
        return Invalid(text)
    if exc.code == 429 or exc.code >= 500:
        return Unavailable(text)
    error = ResourceError(f"{what}: HTTP {exc.code}{f' {reason}' if reason else ''}: {message}")
    error.code = exc.code
    return error


def _object_path(kind: Kind, name: str, namespace: str | None) -> str:
    namespace = (namespace or "default") if kind.namespaced else None
    return f"{kind.collection_path(quote(namespace, safe='') if namespace else None)}/{quote(name, safe='')}"


class _WatchStream:
    """One HTTP watch request, read line by line in a thread of its own; the lines arrive on an asyncio queue.

    The thread ends when the stream ends, breaks, or `close()` shuts the socket down. Its last item on the queue is
    `_END` (the server ended the stream), `_CLOSED` (we closed it) or the exception that ended it.
    """

    _END = object()
    _CLOSED = object()

    def __init__(self, open_stream: Callable[[], urllib3.BaseHTTPResponse], name: str) -> None:
        self._open = open_stream
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self.stopped = False
        self.closed_under_us = False  # close() came from elsewhere (the store closing) while we were reading
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def next(self) -> dict[str, Any] | None:
        """The next event as decoded JSON; None when the server ended the stream (or we closed it)."""
        item = await self._queue.get()
        if item is self._CLOSED:
            self.closed_under_us = True
            return None
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, dict)
        return item

    async def close(self, wait: float = 5.0) -> None:
        with self._lock:
            self.stopped = True
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()  # wakes the thread's blocking read
        # Until the answer's headers arrive the thread cannot be interrupted: it ends by itself once they do.
        await asyncio.wait([self._done], timeout=wait)
        if self._done.done():
            self._thread.join()

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _finished(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _run(self) -> None:
        terminal: object = self._END
        response: urllib3.BaseHTTPResponse | None = None
        try:
            response = self._open()
            with self._lock:
                self._response = response
                if self.stopped:
                    return
            if response.status != 200:
                raise _status_error(response.status, response.read())
            buffer = bytearray()
            for chunk in self._chunks(response):
                start = len(buffer)
                buffer += chunk
                while (end := buffer.find(b"\n", start)) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    start = 0
                    if line.strip():
                        self._put(_decoder.decode(line))
            if bytes(buffer).strip():
                self._put(_decoder.decode(bytes(buffer)))
        except Exception as exc:
            terminal = exc
        finally:
            if self.stopped:
                terminal = self._CLOSED
            if response is not None:
                with contextlib.suppress(Exception):
                    response.close()
            self._put(terminal)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._finished)

    @staticmethod
    def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        if response.chunked:
            yield from response.stream(amt=None)  # one piece per HTTP chunk, as soon as it arrives
            return
        while chunk := response.read1(_READ_SIZE):
            yield chunk


class KubernetesStore:
    """A ResourceStore over a Kubernetes API server.

    `page_size` bounds each page of a list (lists are read in pages, like client-go's reflector); `watch_timeout`
    is the `timeoutSeconds` asked of each watch request (the watch resumes by itself after it); `request_timeout`
    bounds every other call.
    """

    def __init__(
        self,
        configuration: k8s_client.Configuration,
        *,
        page_size: int = 500,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        watch_timeout: int = 300,
    ) -> None:
        self._api = k8s_client.ApiClient(configuration)
        self.host = str(configuration.host)
        self.page_size = page_size
        self._timeout = (connect_timeout, request_timeout)
        self.watch_timeout = watch_timeout
        # A silent watch past its own timeout (and the bookmark that would have come) is a dead connection.
        self._watch_read_timeout = (connect_timeout, float(watch_timeout) + 30.0)
        self._streams: set[_WatchStream] = set()
        #: "plural/namespace/name" -> reason, for objects the server holds that are not valid ones
        self.skipped: dict[str, str] = {}

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None, **options: Any) -> KubernetesStore:
        """A store for a kubeconfig's context (default: its current one).

        With no path: $KUBECONFIG or ~/.kube/config, and inside a pod without either, the pod's service account
        (as client-go does).
        """
        configuration = k8s_client.Configuration()
        try:
            in_pod = "KUBERNETES_SERVICE_HOST" in os.environ and "KUBECONFIG" not in os.environ
            if path is None and in_pod and not os.path.exists(os.path.expanduser("~/.kube/config")):
                _load_incluster_config(client_configuration=configuration)
            else:
                _load_kube_config(
                    config_file=path, context=context, client_configuration=configuration, persist_config=False
                )
        except (k8s_config.ConfigException, OSError, ValueError, TypeError) as exc:
            where = path or "the default kubeconfig"
            raise ResourceError(f"cannot load {where}{f' (context {context})' if context else ''}: {exc}") from exc
        return cls(configuration, **options)

    async def node_pod_cidrs(self, node: str) -> list[str]:
        """The pod CIDRs Kubernetes gave a Node (`spec.podCIDRs`, or the older `spec.podCIDR`): empty until its
        controller manager assigned them. Raises `NotFound` for a Node that does not exist."""
        with _translating(f"read Node {node}", _NODE):
            document = await self._request("GET", f"/api/v1/nodes/{node}")
        spec = document.get("spec") or {}
        cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        return [str(cidr) for cidr in cidrs]

    async def pod_labels(self, namespace: str, name: str) -> dict[str, str]:
        """A Pod's labels (a CNI plugin is told none: the agent asks for them, as Cilium's does). A Pod that is not
        there (a runtime that is not Kubernetes') has none."""
        try:
            with _translating(f"read Pod {namespace}/{name}", _POD):
                document = await self._request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        except NotFound:
            return {}
        labels = (document.get("metadata") or {}).get("labels") or {}
        return {str(key): str(value) for key, value in labels.items()}

    async def close(self) -> None:
        """Close the open watches (they raise Unavailable) and the connection pool."""
        streams = list(self._streams)
        await asyncio.gather(*(stream.close() for stream in streams))
        await asyncio.to_thread(self._api.close)

    # --- the one HTTP path

    def _serialize(self, method: str, path: str, query: _Query | None = None, body: Object | None = None) -> _Request:
        return self._api.param_serialize(
            method, path, query_params=query or [], header_params=dict(_HEADERS), body=body, auth_settings=_AUTH
        )

    def _call(self, method: str, path: str, query: _Query | None = None, body: Object | None = None) -> dict[str, Any]:
        """One request, in a worker thread: the decoded JSON answer, or `_StatusError`."""
        response = self._api.call_api(*self._serialize(method, path, query, body), _request_timeout=self._timeout)
        raw = response.response
        try:
            data = raw.read()
        finally:
            raw.release_conn()
        if not 200 <= response.status <= 299:
            raise _status_error(response.status, data)
        return _decoder.decode(data)

    def _open_watch(self, kind: Kind, query: _Query) -> urllib3.BaseHTTPResponse:
        """The watch request, in the stream's thread (a token refresh may run a kubeconfig's exec plugin)."""
        request = self._serialize("GET", kind.collection_path(), query)
        answer = self._api.call_api(*request, _request_timeout=self._watch_read_timeout)
        response: urllib3.BaseHTTPResponse = answer.response
        return response

    async def _request(
        self, method: str, path: str, query: _Query | None = None, body: Object | None = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, method, path, query, body)

    # --- reading

    def _decode(self, kind: Kind, obj: Any, *, quiet: bool = False) -> Object | None:
        """`obj` with apiVersion and kind filled in, if it is a valid one of `kind`; else None, logged."""
        if not isinstance(obj, dict):
            return None
        metadata = obj.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        key = "/".join(str(part) for part in (kind.plural, metadata.get("namespace") or "", metadata.get("name", "")))
        try:
            obj.setdefault("apiVersion", kind.api_version)
            obj.setdefault("kind", kind.name)
            if obj.get("kind") != kind.name:
                raise ModelError(f"holds a {obj.get('kind')!r}, not a {kind.name}")
            validate_object(obj)
            if not obj["metadata"].get("resourceVersion"):
                raise ModelError("metadata.resourceVersion is missing")
        except ModelError as exc:
            if quiet:
                return None
            reason = f"not a valid {kind.name}: {exc}"
            if self.skipped.get(key) != reason:
                log.warning("kubernetes store (%s): skipping %s: %s", self.host, key, reason)
            self.skipped[key] = reason
            return None
        self.skipped.pop(key, None)
        return obj

    def _deleted(self, kind: Kind, obj: Any) -> Object | None:
        """What a DELETED event carries: the object, or its identity when it is not a valid one."""
        decoded = self._decode(kind, obj, quiet=True)
        if decoded is not None or not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            return decoded
        metadata = obj["metadata"]
        if not isinstance(metadata.get("name"), str):
            return None
        stub = {key: metadata[key] for key in ("name", "namespace", "resourceVersion", "uid") if key in metadata}
        self.skipped.pop("/".join((kind.plural, str(metadata.get("namespace") or ""), metadata["name"])), None)
        return {"apiVersion": kind.api_version, "kind": kind.name, "metadata": stub}

    async def list(self, kind: Kind) -> ObjectList:
        what = f"cannot list {kind.plural}"
        with _translating(what, kind):
            pages = await self._list_pages(kind, what)
        items = [
            obj for page in pages for raw in page.get("items") or [] if (obj := self._decode(kind, raw)) is not None
        ]
        version = str((pages[0].get("metadata") or {}).get("resourceVersion") or "")
        if not version:
            raise Unavailable(f"{what}: the API server's list carries no resourceVersion")
        return ObjectList(items, version)

    async def _list_pages(self, kind: Kind, what: str) -> builtins.list[_Page]:
        """The pages of one consistent list (they all share the first page's resourceVersion)."""
        pages: builtins.list[_Page] = []
        token = ""
        while True:
            query: _Query = [("limit", self.page_size)] if self.page_size else []
            if token:
                query.append(("continue", token))
            try:
                page = await self._request("GET", kind.collection_path(), query)
            except _StatusError as exc:
                if exc.code != 410 or not token:
                    raise
                # The continue token expired between pages (etcd compacted meanwhile): one unpaged list instead.
                log.info("kubernetes store (%s): %s: the list expired between pages; listing at once", self.host, what)
                return [await self._request("GET", kind.collection_path())]
            pages.append(page)
            token = str((page.get("metadata") or {}).get("continue") or "")
            if not token:
                return pages

    async def watch(self, kind: Kind, resource_version: str) -> AsyncIterator[WatchEvent]:
        what = f"watch of {kind.plural}"
        version = resource_version
        while True:
            query = [
                ("watch", True),
                ("resourceVersion", version),
                ("allowWatchBookmarks", True),
                ("timeoutSeconds", self.watch_timeout),
            ]
            stream = _WatchStream(functools.partial(self._open_watch, kind, query), f"k8s-watch-{kind.plural}")
            self._streams.add(stream)
            opened = time.monotonic()
            delivered = False
            try:
                with _translating(what, kind):
                    while (event := await stream.next()) is not None:
                        delivered = True
                        event_type, obj = event.get("type"), event.get("object")
                        if event_type == "ERROR":
                            status = obj if isinstance(obj, dict) else {}
                            raise _StatusError(int(status.get("code") or 500), status)
                        metadata = obj.get("metadata") if isinstance(obj, dict) else None
                        if isinstance(metadata, dict) and metadata.get("resourceVersion"):
                            version = str(metadata["resourceVersion"])
                        if event_type == "BOOKMARK":
                            continue
                        if event_type == "DELETED":
                            decoded = self._deleted(kind, obj)
                        elif event_type in ("ADDED", "MODIFIED"):
                            decoded = self._decode(kind, obj)
                        else:
                            log.warning("kubernetes store (%s): %s: unknown event type %r", self.host, what, event_type)
                            continue
                        if decoded is not None:
                            yield WatchEvent(event_type, decoded)
            finally:
                self._streams.discard(stream)
                await stream.close()
            if stream.closed_under_us:
                raise Unavailable(f"{what}: the store was closed")
            if not delivered and time.monotonic() - opened < _MIN_WATCH_SECONDS:
                raise Unavailable(f"{what}: the API server ended the watch at once")
            log.debug("kubernetes store (%s): %s ended; resuming from resourceVersion %s", self.host, what, version)

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Object | None:
        with _translating(f"cannot read {describe(kind, name, namespace)}", kind):
            try:
                obj = await self._request("GET", _object_path(kind, name, namespace))
            except _StatusError as exc:
                if exc.code == 404 and exc.status is not None:
                    return None
                raise
        return self._decode(kind, obj)

    # --- writing

    def _answer(self, kind: Kind, obj: dict[str, Any]) -> Object:
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.name)
        return obj

    async def create(self, obj: Object) -> Object:
        kind, name, namespace = checked(obj)
        # The API server refuses a create that carries a resourceVersion (a copy of a read object, say).
        body = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}
        with _translating(f"cannot create {describe(kind, name, namespace)}", kind):
            created = await self._request("POST", kind.collection_path(namespace), body=body)
        return self._answer(kind, created)

    async def update(self, obj: Object) -> Object:
        """Replace the object (PUT); with `metadata.resourceVersion` set, only if it is still the stored one."""
        kind, name, namespace = checked(obj)
        with _translating(f"cannot update {describe(kind, name, namespace)}", kind):
            updated = await self._request("PUT", _object_path(kind, name, namespace), body=obj)
        return self._answer(kind, updated)

    async def delete(
        self, kind: Kind, name: str, namespace: str | None = None, *, resource_version: str | None = None
    ) -> None:
        options = None
        if resource_version is not None:
            options = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "preconditions": {"resourceVersion": resource_version},
            }
        with _translating(f"cannot delete {describe(kind, name, namespace)}", kind):
            await self._request("DELETE", _object_path(kind, name, namespace), body=options)
