"""A stand-in Kubernetes API server for the tests: no kube-apiserver can run on this machine.

It speaks the part of the real protocol that `resources.kubernetes.KubernetesStore` uses, over HTTP/1.1 and JSON,
for every kind of `clustermesh.model.kinds.KINDS`, at `Kind.collection_path()` (cluster-wide, also for namespaced
kinds), `Kind.collection_path(namespace)` and `.../<name>`:

- GET of a collection: `<Kind>List` with `metadata.resourceVersion` and items *without* apiVersion/kind (like the
  real server); `limit` and `continue` page it (a continue token is a snapshot; `compact()` or
  `expire_continue_tokens` makes it answer 410 Expired);
- GET with `watch=true&resourceVersion=N`: a chunked stream of newline-delimited `{"type", "object"}` events after
  N, open for new ones (`resourceVersion` empty or "0": the current objects as ADDED first). A version older than
  the retained history gets one ERROR event with a 410 Expired Status, then the stream ends, as kube-apiserver
  does. `allowWatchBookmarks=true` lets `bookmark()` send BOOKMARK events; `timeoutSeconds` ends the stream
  cleanly;
- POST (201, or a 409 AlreadyExists Status), PUT (200; 409 Conflict on a resourceVersion mismatch; 404), DELETE
  (200 with the object, or a 404 Status); objects are validated with `clustermesh.model.validation` (422 Invalid),
  get a uid, a creationTimestamp and a resourceVersion from one global counter.

Also GET of one core Node (`/api/v1/nodes/<name>`) from `nodes`, and of one Pod from `pods`: dicts the test fills.
With `grants`, bearer tokens in RBAC's shape (401 for an unknown token, 403 for a write of a kind the token may not
write); with `service_ips`, Services get a ClusterIP on create as from kube-apiserver (an explicit one already
held: 422). `python -m clustermesh.lab.standin` runs one for a lab cluster (`serve_lab`).

Not implemented: other authentication, PATCH, subresources, label and field selectors, resourceVersionMatch,
deletion options, namespaces that must exist before their objects (the real server refuses an object in a missing
one).

Test controls: `compact()`, `break_watches()` (the connections drop mid-stream), `end_watches()` (the streams end
cleanly, as at the server's timeout), `bookmark()`, `fail_next(code, reason)` (answer the next request with that
Status), `put_raw(obj)` (store an object bypassing validation), `objects(kind)`, `open_watches()` /
`wait_for_watches(n)`, and `requests`, the log of what was asked.

    with StandinAPIServer() as server:
        store = KubernetesStore(Configuration(host=server.url))
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import KINDS, Kind, Object, kind_by_name
from clustermesh.model.serviceips import (
    PoolExhausted,
    ServiceIPPool,
    cluster_ip,
    keep_cluster_ip,
    needs_cluster_ip,
)
from clustermesh.model.validation import InvalidObject, validate_object

__all__ = ["StandinAPIServer", "StandinRequest"]

Key = tuple[str, str]  # (namespace or "", name)


@dataclass(frozen=True)
class Grant:
    """What one service account may do: read everything, write the kinds named (None: every kind)."""

    user: str
    writes: frozenset[str] | None = None


@dataclass(frozen=True)
class StandinRequest:
    method: str
    path: str
    query: dict[str, str]
    authorization: str = ""  # the Authorization header, if any (the stand-in accepts anyone)


@dataclass
class _Watcher:
    kind: Kind
    namespace: str | None
    bookmarks: bool
    connection: socket.socket
    pending: list[bytes] = field(default_factory=list)
    ended: bool = False
    broken: bool = False


class _Reply(Exception):
    """An answer other than success, raised from deep in a handler."""

    def __init__(self, code: int, body: Object | None = None, text: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.body = body
        self.text = text


def _status(code: int, reason: str, message: str, details: Object | None = None) -> _Reply:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }
    return _Reply(code, body)


def _resource(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def _line(event_type: str, obj: Object) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread: a clean stop
    standin: StandinAPIServer

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.standin._cond:
            self.standin._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.standin._cond:
            self.standin._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer: nothing to report


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.standin._serve(self, "GET")

    def do_POST(self) -> None:
        self.server.standin._serve(self, "POST")

    def do_PUT(self) -> None:
        self.server.standin._serve(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.standin._serve(self, "DELETE")

    def send_json(self, code: int, body: Object) -> None:
        self.send_bytes(code, json.dumps(body, separators=(",", ":")).encode(), "application/json")

    def send_bytes(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StandinAPIServer:
    """An in-memory Kubernetes API server on 127.0.0.1 (a free port), run in background threads.

    Use it as a context manager (or `start()` / `stop()`); `url` is its address. `history_limit` is how many
    changes a watch can resume from (older versions are answered 410 Gone).
    """

    def __init__(self, *, history_limit: int = 10_000) -> None:
        self.history_limit = history_limit
        #: every request, in order
        self.requests: list[StandinRequest] = []
        #: core Nodes by name, for GET /api/v1/nodes/<name> only (the agent's `--pod-cidr from-node`)
        self.nodes: dict[str, Object] = {}
        #: core Pods by (namespace, name), for GET of one only (the agent reads a new pod's labels)
        self.pods: dict[tuple[str, str], Object] = {}
        #: when True, every `continue` token is answered 410 Expired (as after a compaction between pages)
        self.expire_continue_tokens = False
        self._cond = threading.Condition()
        self._objects: dict[str, dict[Key, Object]] = {kind.name: {} for kind in KINDS}
        self._revision = 1
        self._history: list[tuple[int, Kind, str, bytes, str]] = []  # (revision, kind, type, line, namespace)
        self._compacted = 1  # the history holds every change after this revision
        self._continues: dict[str, tuple[str, list[Object]]] = {}
        self._failures: list[_Reply] = []
        self._watchers: list[_Watcher] = []
        self._connections: set[socket.socket] = set()
        self._stopping = False
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._more: list[tuple[_HTTPServer, threading.Thread]] = []  # listeners besides the first (`listen_also`)
        #: bearer token -> what its holder may do; None: everyone may do everything (the tests' default)
        self.grants: dict[str, Grant] | None = None
        #: with a service CIDR, Services get a ClusterIP when created, as from kube-apiserver (None: they do not)
        self.service_ips: ServiceIPPool | None = None
        # "/api/v1", "/apis/cilium.io/v2", ...: the collection path without its plural
        self._kinds = {(kind.collection_path().rpartition("/")[0], kind.plural): kind for kind in KINDS}
        self._prefixes = {prefix for prefix, _ in self._kinds}

    # --- lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the stand-in is not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> StandinAPIServer:
        self._httpd, self._thread = self._listen(host, port)
        return self

    def listen_also(self, host: str, port: int) -> tuple[str, int]:
        """One more listener on the same objects (the lab's: the host's loopback and its cluster's address)."""
        httpd, thread = self._listen(host, port)
        self._more.append((httpd, thread))
        address = httpd.server_address
        return str(address[0]), int(address[1])

    def _listen(self, host: str, port: int) -> tuple[_HTTPServer, threading.Thread]:
        httpd = _HTTPServer((host, port), _Handler)
        httpd.standin = self
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="k8s-standin", daemon=True
        )
        thread.start()
        return httpd, thread

    def stop(self) -> None:
        """End the open watches cleanly, close every connection, and wait for every thread."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        for httpd, _ in self._more:
            httpd.shutdown()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._watchers, timeout=5.0)
            connections = list(self._connections)
        for connection in connections:  # idle keep-alive connections: their handlers wait for a request
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        for httpd, thread in self._more:
            httpd.server_close()
            thread.join()
        self._more.clear()
        self._httpd = None

    def __enter__(self) -> StandinAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._revision)

    def compact(self) -> None:
        """Forget the history: a watch from any older resourceVersion gets 410, as do list continue tokens."""
        with self._cond:
            self._history.clear()
            self._compacted = self._revision
            self._continues.clear()

    def break_watches(self) -> None:
        """Drop the connection of every open watch mid-stream, without ending the chunked answer."""
        with self._cond:
            for watcher in self._watchers:
                watcher.broken = True
                with contextlib.suppress(OSError):
                    watcher.connection.shutdown(socket.SHUT_RDWR)
            self._cond.notify_all()

    def end_watches(self) -> None:
        """End every open watch cleanly, as the real server does at the watch's timeout."""
        with self._cond:
            for watcher in self._watchers:
                watcher.ended = True
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current resourceVersion to every watch that allows them."""
        with self._cond:
            for watcher in self._watchers:
                if watcher.bookmarks and not watcher.ended:
                    kind = watcher.kind
                    metadata = {"resourceVersion": str(self._revision)}
                    obj = {"apiVersion": kind.api_version, "kind": kind.name, "metadata": metadata}
                    watcher.pending.append(_line("BOOKMARK", obj))
            self._cond.notify_all()

    def fail_next(self, code: int, reason: str = "", message: str = "") -> None:
        """Answer the next request with this Status (`reason` empty: a plain-text body, as from a proxy)."""
        with self._cond:
            failure = _status(code, reason, message or f"injected {code}") if reason else _Reply(code, text=message)
            self._failures.append(failure)

    def put_raw(self, obj: Any, kind: Kind | None = None) -> Object:
        """Store `obj` as it is, unvalidated (it needs a metadata.name); watchers see it ADDED or MODIFIED."""
        kind = kind or kind_by_name(obj["kind"])
        metadata = obj["metadata"]
        namespace = str(metadata.get("namespace") or "") if kind.namespaced else ""
        with self._cond:
            key = (namespace, str(metadata["name"]))
            event_type = "MODIFIED" if key in self._objects[kind.name] else "ADDED"
            stored = copy.deepcopy(obj)
            self._commit(kind, key, stored, event_type)
            return copy.deepcopy(stored)

    def objects(self, kind: Kind) -> list[Object]:
        """Copies of the stored objects of `kind`, sorted by namespace and name."""
        with self._cond:
            objects = self._objects[kind.name]
            return [copy.deepcopy(objects[key]) for key in sorted(objects)]

    def open_watches(self) -> int:
        with self._cond:
            return len(self._watchers)

    def wait_for_watches(self, count: int, timeout: float = 5.0) -> None:
        """Block until at least `count` watches are open (call it through asyncio.to_thread from a test)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._watchers) >= count, timeout):
                raise TimeoutError(f"{len(self._watchers)} watch(es) open, not {count}, after {timeout} s")

    # --- the store

    def _commit(self, kind: Kind, key: Key, obj: Object | None, event_type: str, deleted: Object | None = None) -> int:
        """Store (or delete) under a new revision, record the change and hand it to the open watches."""
        self._revision += 1
        revision = self._revision
        if obj is not None:
            obj["metadata"]["resourceVersion"] = str(revision)
            self._objects[kind.name][key] = obj
            shown = obj
        else:
            assert deleted is not None
            deleted["metadata"]["resourceVersion"] = str(revision)
            shown = deleted
        line = _line(event_type, shown)
        self._history.append((revision, kind, event_type, line, key[0]))
        if len(self._history) > self.history_limit:
            self._compacted = self._history.pop(0)[0]
        for watcher in self._watchers:
            if watcher.kind == kind and watcher.namespace in (None, key[0]) and not watcher.ended:
                watcher.pending.append(line)
        self._cond.notify_all()
        return revision

    # --- HTTP

    def _authorize(self, handler: _Handler, method: str, path: str) -> None:
        """With `grants`: a bearer token must name a grant (401), and a write must be one of its kinds (403)."""
        if self.grants is None:
            return
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        grant = self.grants.get(token)
        if grant is None:
            raise _status(401, "Unauthorized", "Unauthorized")
        if method == "GET" or grant.writes is None:
            return
        kind = self._route(path)[0]
        if kind.name not in grant.writes:
            verb = {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(method, method.lower())
            raise _status(
                403,
                "Forbidden",
                f'{kind.plural} is forbidden: User "{grant.user}" cannot {verb} resource '
                f'"{kind.plural}" in API group "{kind.group}"',
                {"kind": kind.plural},
            )

    def _node(self, name: str) -> Object:
        """GET of a core Node (the agent reads its own pod CIDRs): the ones `nodes` holds."""
        with self._cond:
            found = self.nodes.get(name)
        if found is None:
            raise _status(404, "NotFound", f'nodes "{name}" not found', {"name": name, "kind": "nodes"})
        return copy.deepcopy(found)

    def _pod(self, namespace: str, name: str) -> Object:
        with self._cond:
            found = self.pods.get((namespace, name))
        if found is None:
            raise _status(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        return copy.deepcopy(found)

    def _route(self, path: str) -> tuple[Kind, str | None, str | None]:
        """(kind, namespace or None, name or None) of a path, or a plain-text 404 like the real server's."""
        for prefix in self._prefixes:
            if not path.startswith(prefix + "/"):
                continue
            parts = [unquote(part) for part in path[len(prefix) + 1 :].split("/")]
            if len(parts) in (3, 4) and parts[0] == "namespaces":
                kind = self._kinds.get((prefix, parts[2]))
                if kind is not None and kind.namespaced and parts[1]:
                    return kind, parts[1], parts[3] if len(parts) == 4 else None
            if len(parts) in (1, 2):
                kind = self._kinds.get((prefix, parts[0]))
                if kind is not None and (len(parts) == 1 or not kind.namespaced):
                    return kind, None, parts[1] if len(parts) == 2 else None
        raise _Reply(404, text="404 page not found\n")

    def _serve(self, handler: _Handler, method: str) -> None:
        url = urlsplit(handler.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        with self._cond:
            self.requests.append(StandinRequest(method, url.path, query, handler.headers.get("Authorization") or ""))
            failure = self._failures.pop(0) if self._failures else None
        try:
            has_body = method in ("POST", "PUT") or int(handler.headers.get("Content-Length") or 0) > 0
            body = self._body(handler) if has_body else None  # read first: the connection goes on
            if failure is not None:
                raise failure
            self._authorize(handler, method, url.path)
            if method == "GET" and url.path.startswith("/api/v1/nodes/"):
                handler.send_json(200, self._node(unquote(url.path.removeprefix("/api/v1/nodes/"))))
                return
            pod = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)", url.path)
            if method == "GET" and pod is not None:
                handler.send_json(200, self._pod(unquote(pod[1]), unquote(pod[2])))
                return
            kind, namespace, name = self._route(url.path)
            if method == "GET" and name is None and query.get("watch") in ("true", "1"):
                self._watch(handler, kind, namespace, query)
                return
            code, answer = self._answer(method, kind, namespace, name, query, body)
        except _Reply as reply:
            if reply.body is not None:
                handler.send_json(reply.code, reply.body)
            else:
                handler.send_bytes(reply.code, reply.text.encode(), "text/plain; charset=utf-8")
            return
        handler.send_json(code, answer)

    @staticmethod
    def _body(handler: _Handler) -> Object:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _status(400, "BadRequest", f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _status(400, "BadRequest", "the body is not an object")
        return body

    def _answer(
        self, method: str, kind: Kind, namespace: str | None, name: str | None, query: dict[str, str], body: Any
    ) -> tuple[int, Object]:
        with self._cond:
            if method == "GET" and name is None:
                return 200, self._list(kind, namespace, query)
            if method == "POST" and name is None:
                return 201, self._create(kind, namespace, body)
            if name is None:
                raise _status(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            key = (namespace or "", name)
            current = self._objects[kind.name].get(key)
            if current is None:
                raise _status(
                    404,
                    "NotFound",
                    f'{_resource(kind)} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural},
                )
            if method == "GET":
                return 200, copy.deepcopy(current)
            if method == "PUT":
                return 200, self._update(kind, key, current, body)
            if method == "DELETE":
                wanted = ((body or {}).get("preconditions") or {}).get("resourceVersion")
                if wanted is not None and str(wanted) != current["metadata"]["resourceVersion"]:
                    raise _status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {_resource(kind)} "{name}": the ResourceVersion in the '
                        f"precondition ({wanted}) does not match the ResourceVersion in record "
                        f"({current['metadata']['resourceVersion']}). The object might have been modified",
                    )
                del self._objects[kind.name][key]
                if kind.name == "Service" and self.service_ips is not None:
                    self.service_ips.release(f"{key[0]}/{key[1]}")
                deleted = copy.deepcopy(current)
                self._commit(kind, key, None, "DELETED", deleted)
                return 200, deleted
        raise _status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _list(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> Object:
        token = query.get("continue", "")
        if token:
            snapshot = None if self.expire_continue_tokens else self._continues.pop(token, None)
            if snapshot is None:
                raise _status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. "
                    "You can start a new list without the continue parameter.",
                )
            version, items = snapshot
        else:
            version = str(self._revision)
            objects = self._objects[kind.name]
            items = []
            for key in sorted(objects):
                if namespace is None or key[0] == namespace:
                    item = copy.deepcopy(objects[key])
                    item.pop("apiVersion", None)  # list items carry neither, like the real server's
                    item.pop("kind", None)
                    items.append(item)
        metadata: Object = {"resourceVersion": version}
        limit = int(query.get("limit") or 0)
        if limit and len(items) > limit:
            items, rest = items[:limit], items[limit:]
            token = uuid.uuid4().hex
            self._continues[token] = (version, rest)
            metadata.update({"continue": token, "remainingItemCount": len(rest)})
        return {"apiVersion": kind.api_version, "kind": f"{kind.name}List", "metadata": metadata, "items": items}

    def _checked(self, kind: Kind, namespace: str | None, body: Object, name: str | None = None) -> Object:
        if body.get("kind") != kind.name or body.get("apiVersion") != kind.api_version:
            message = (
                f"the object is a {body.get('apiVersion')} {body.get('kind')}, not a {kind.api_version} {kind.name}"
            )
            raise _status(400, "BadRequest", message)
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            raise _status(400, "BadRequest", "the object has no metadata")
        if kind.namespaced:
            if not namespace:
                raise _status(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            if metadata.get("namespace") not in (None, "", namespace):
                raise _status(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            metadata["namespace"] = namespace
        if name is not None and metadata.get("name") != name:
            message = f"the name of the object ({metadata.get('name')}) does not match the name on the URL ({name})"
            raise _status(400, "BadRequest", message)
        try:
            validate_object(body)
        except InvalidObject as exc:
            details = {"name": exc.name, "group": kind.group, "kind": kind.name, "causes": [{"field": exc.field}]}
            raise _status(422, "Invalid", str(exc), details) from None
        except ModelError as exc:
            raise _status(422, "Invalid", str(exc)) from None
        return body

    def _create(self, kind: Kind, namespace: str | None, body: Object) -> Object:
        obj = self._checked(kind, namespace, body)
        metadata = obj["metadata"]
        if metadata.get("resourceVersion"):
            raise _status(500, "InternalError", "resourceVersion should not be set on objects to be created")
        key = (str(metadata.get("namespace") or ""), str(metadata["name"]))
        if key in self._objects[kind.name]:
            raise _status(
                409,
                "AlreadyExists",
                f'{_resource(kind)} "{key[1]}" already exists',
                {"name": key[1], "group": kind.group, "kind": kind.plural},
            )
        if kind.name == "Service" and self.service_ips is not None:
            owner = f"{key[0]}/{key[1]}"
            asked = cluster_ip(obj)
            if needs_cluster_ip(obj):
                try:  # as kube-apiserver does: the next free address of its --service-cluster-ip-range
                    address = self.service_ips.allocate(owner)
                except PoolExhausted as exc:
                    raise _status(422, "Invalid", str(exc)) from None
                obj.setdefault("spec", {}).update({"clusterIP": address, "clusterIPs": [address]})
            elif asked is not None and asked in self.service_ips:
                holder = self.service_ips.holders.get(asked)
                if holder is not None and holder != owner:
                    raise _status(422, "Invalid", f"spec.clusterIP: Invalid value: {asked!r}: provided IP is already "
                                                  f"allocated (to {holder})")  # fmt: skip
                self.service_ips.note(owner, asked)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._commit(kind, key, obj, "ADDED")
        return copy.deepcopy(obj)

    def _update(self, kind: Kind, key: Key, current: Object, body: Object) -> Object:
        obj = self._checked(kind, key[0] or None, body, key[1])
        metadata = obj["metadata"]
        expected = metadata.get("resourceVersion")
        if expected and str(expected) != current["metadata"]["resourceVersion"]:
            raise _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {_resource(kind)} "{key[1]}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": key[1], "group": kind.group, "kind": kind.plural},
            )
        for field_name in ("uid", "creationTimestamp"):
            if field_name in current["metadata"]:
                metadata[field_name] = current["metadata"][field_name]
        if kind.name == "Service" and self.service_ips is not None:
            try:
                obj = keep_cluster_ip(current, obj)
            except ModelError as exc:
                raise _status(422, "Invalid", str(exc)) from None
            metadata = obj["metadata"]
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        if obj == current:  # nothing changed: no new revision, no event (as the real server)
            return copy.deepcopy(current)
        self._commit(kind, key, obj, "MODIFIED")
        return copy.deepcopy(obj)

    # --- watch

    def _watch(self, handler: _Handler, kind: Kind, namespace: str | None, query: dict[str, str]) -> None:
        since = query.get("resourceVersion", "")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        watcher = _Watcher(kind, namespace, query.get("allowWatchBookmarks") in ("true", "1"), handler.connection)
        handler.close_connection = True
        with self._cond:
            if since in ("", "0"):
                for key, obj in sorted(self._objects[kind.name].items()):
                    if namespace is None or key[0] == namespace:
                        watcher.pending.append(_line("ADDED", obj))
            elif not since.isdigit():
                raise _status(400, "BadRequest", f"invalid resourceVersion {since!r}")
            elif int(since) < self._compacted:
                message = f"too old resource version: {since} ({self._compacted})"
                watcher.pending.append(_line("ERROR", _status(410, "Expired", message).body or {}))
                watcher.ended = True
            else:
                for revision, event_kind, _type, line, event_namespace in self._history:
                    if revision > int(since) and event_kind == kind and namespace in (None, event_namespace):
                        watcher.pending.append(line)
            self._watchers.append(watcher)
            self._cond.notify_all()
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            handler.wfile.flush()
            self._stream(handler, watcher, timeout)
        except OSError:
            pass  # the client went away
        finally:
            with self._cond:
                self._watchers.remove(watcher)
                self._cond.notify_all()

    def _stream(self, handler: _Handler, watcher: _Watcher, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not (watcher.pending or watcher.ended or watcher.broken or self._stopping):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        watcher.ended = True
                        break
                    self._cond.wait(remaining)
                lines, watcher.pending = watcher.pending, []
                broken, ended = watcher.broken, watcher.ended or self._stopping
            if broken:
                return  # break_watches() already shut the connection down
            for line in lines:
                handler.wfile.write(_chunk(line))
            handler.wfile.flush()
            if ended:
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
                return


# --- a lab cluster's API server: `python -m clustermesh.lab.standin ...`

STANDIN_PORT = 6443


def serve_lab(argv: list[str] | None = None) -> None:
    """One lab cluster's stand-in: listens on the host's loopback first (the lab's commands on the host reach it
    there, never a lab address), then moves into the cluster's control-plane namespace and listens on its address
    (its apiserver and agents reach it there). Grants come from a JSON file {token: {"user", "writes"}}; the host
    port goes to --state as JSON. Until SIGTERM."""
    import argparse
    import signal

    from clustermesh.lab import netns

    parser = argparse.ArgumentParser(prog="python -m clustermesh.lab.standin")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--address", required=True, help="IP:PORT in the namespace")
    parser.add_argument("--grants", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--service-cluster-ip-range", default=None)
    args = parser.parse_args(argv)
    grants = json.loads(Path(args.grants).read_text())
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # before any thread: all inherit it
    standin = StandinAPIServer()
    standin.grants = {token: Grant(str(g["user"]), None if g.get("writes") is None else frozenset(g["writes"]))
                      for token, g in grants.items()}  # fmt: skip
    if args.service_cluster_ip_range:
        standin.service_ips = ServiceIPPool(args.service_cluster_ip_range)
    standin.start("127.0.0.1", 0)
    host_port = int(standin.url.rsplit(":", 1)[1])
    netns.enter(args.namespace)
    ip, _, port = args.address.rpartition(":")
    standin.listen_also(ip, int(port))
    Path(args.state).write_text(json.dumps({"pid": os.getpid(), "host_port": host_port}))
    print(f"listening on http://{args.address} and http://127.0.0.1:{host_port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    standin.stop()


if __name__ == "__main__":  # pragma: no cover
    serve_lab()
