"""The etcd backend: the only module that imports the etcd client (etcd3aio) and gRPC.

It implements `kvstore.backend.Backend` over one gRPC channel with mTLS, and translates every client error into
`kvstore.errors` in one place (`_translating`), so nothing above ever sees a gRPC status or parses a message.

Known traps of the client, and what this module does about them:

- the client retries unary calls on UNAVAILABLE; a transaction may then apply twice or apply and report failure.
  Every call here is made with one attempt, and the stores decide what to retry;
- the client's watch reconnects silently and resumes from its last revision, which is wrong when etcd was wiped or
  restored (the revision went backwards). The watch here is written on the raw stub and ends with
  `BackendUnavailable` when the stream breaks, so the caller lists again;
- the client's channel only knows `ipv4:` targets: endpoints are resolved to IP addresses here, and the host name
  they were given by is kept as the TLS server name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any, NoReturn

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core logs TLS failures to stderr; we report them ourselves

import itertools

import etcd3aio
import grpc
import grpc.aio
from etcd3aio import _protobuf as pb
from etcd3aio.auth import AuthService, PermissionType
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.maintenance import MaintenanceService

from kvstore import errors, probing
from kvstore import ranges as ranges_module
from kvstore.backend import Delete, DeleteOp, Entry, Event, Listing, PutOp, Upsert, WriteOp
from kvstore.config import Endpoint, EtcdConfig

__all__ = ["EtcdBackend", "connect"]

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 5000  # measured (issue 14): 12% faster than 2,000 over 300k keys; a page is ~20 ms of work
#: a key every user of the mesh may read (root, admin-*, agent-*, remote-*): new credentials are tried on it
PROBE_KEY = "cilium/state/"
#: a range with more keys than this left after its first page is split by one keys-only pass (kvstore.ranges)
SPLIT_ABOVE = 4 * LIST_PAGE_SIZE
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# etcd's default --max-txn-ops: a transaction with more operations is refused.
MAX_TXN_OPS = 128

_PUT = 0  # mvccpb.Event.EventType
_DELETE = 1


@contextlib.contextmanager
def _translating(operation: str, *, user: str = "") -> Iterator[None]:
    """Turn etcd3aio and gRPC errors into `kvstore.errors`, keeping the original as the cause."""
    try:
        yield
    except errors.KVStoreError:
        raise
    except (etcd3aio.EtcdConnectionError, etcd3aio.EtcdTransientError) as exc:
        raise errors.BackendUnavailable(f"{operation}: etcd is unavailable: {_details(exc)}") from exc
    except (etcd3aio.EtcdPermissionDeniedError, etcd3aio.EtcdUnauthenticatedError) as exc:
        raise _permission_error(operation, user, _details(exc)) from exc
    except grpc.aio.AioRpcError as exc:
        raise _from_status(operation, user, exc.code(), exc.details() or "") from exc
    except TimeoutError as exc:
        raise errors.BackendUnavailable(f"{operation}: etcd did not answer in time") from exc


def _details(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return str(cause.details() or cause.code().name)
    return str(exc)


def _permission_error(operation: str, user: str, details: str) -> errors.PermissionDenied:
    who = f"user {user!r} (the CN of the client certificate)" if user else "the client certificate's user"
    if "user name not found" in details or "user name is empty" in details:
        return errors.UnknownUser(f"{operation}: etcd knows no {who}: create the user, or use another certificate")
    return errors.PermissionDenied(f"{operation}: etcd refused {who}: {details}")


def _from_status(operation: str, user: str, code: grpc.StatusCode, details: str) -> errors.KVStoreError:
    # INTERNAL is what a stream gets when etcd goes away under it ("Stream removed", RST_STREAM): a broken
    # connection like UNAVAILABLE, to be retried, not a bug to crash on.
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    ):
        return errors.BackendUnavailable(f"{operation}: etcd is unavailable: {details or code.name}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return _permission_error(operation, user, details)
    if "user name not found" in details or "permission denied" in details:
        return _permission_error(operation, user, details)
    if "compacted" in details:
        return errors.RevisionCompacted(0)
    if "lease not found" in details:
        return errors.LeaseLost(0)
    return errors.KVStoreError(f"{operation}: etcd answered {code.name}: {details}")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _entry(kv: Any) -> Entry:
    return Entry(kv.key.decode(), kv.value, kv.mod_revision, kv.lease, kv.version, kv.create_revision)


def _resolve(endpoint: Endpoint) -> tuple[str, str]:
    """(gRPC address, family) of an endpoint; host names are resolved here because the channel takes only IPs."""
    if endpoint.is_ip:
        return endpoint.address, "ipv6" if ":" in endpoint.host else "ipv4"
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.NameNotResolved(f"cannot resolve etcd endpoint {endpoint}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    host = str(sockaddr[0])
    if family == socket.AF_INET6:
        return f"[{host}]:{endpoint.port}", "ipv6"
    return f"{host}:{endpoint.port}", "ipv4"


def _channel(config: EtcdConfig, material: probing.TLSMaterial) -> grpc.aio.Channel:
    resolved = [_resolve(endpoint) for endpoint in config.parsed]
    family = resolved[0][1]
    target = f"{family}:{','.join(address for address, fam in resolved if fam == family)}"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
    )
    options: list[tuple[str, Any]] = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", True),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    server_name = config.server_name
    if server_name is None and (len(config.parsed) > 1 or not config.parsed[0].is_ip):
        server_name = config.parsed[0].host
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


async def connect(config: EtcdConfig, *, probe: bool = True) -> EtcdBackend:
    """Check the TLS files and the endpoints, then open the channel; errors say what to fix.

    Of several endpoints, one that answers is enough; if none does, the most telling error wins (a TLS problem is
    raised before "unreachable", because it will not go away by waiting).
    """
    material = probing.load_material(config)
    if probe:
        failures: list[errors.KVStoreError] = []
        for endpoint in config.parsed:
            try:
                await probing.probe_endpoint(config, endpoint)
            except errors.KVStoreError as exc:
                failures.append(exc)
            else:
                break
        else:
            tls = [f for f in failures if isinstance(f, errors.TLSSetupError)]
            raise (tls or failures)[0]
    backend = EtcdBackend(config, material)
    try:
        await backend.status()
    except BaseException:
        await backend.close()
        raise
    return backend


class EtcdBackend:
    """`kvstore.backend.Backend` over etcd v3 with mTLS. Build it with `connect`."""

    def __init__(self, config: EtcdConfig, material: probing.TLSMaterial) -> None:
        self.config = config
        self.user = material.client_common_name
        self.timeout = 10.0
        self._material = material
        self._watches: set[Any] = set()  # the watch calls on the current channel: moved when the channel changes
        self._moved: set[Any] = set()  # calls cancelled by a move (their watch goes on, on the new channel)
        self._retiring: set[asyncio.Task[None]] = set()
        self._old_channels: set[grpc.aio.Channel] = set()
        self._closed = False
        self._use(_channel(config, material))

    def _use(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._kv = KVService(channel, max_attempts=1)
        self._auth = AuthService(channel, max_attempts=1)
        self._maintenance = MaintenanceService(channel, max_attempts=1)
        self._kv_stub = pb.KVStub(channel)
        self._lease_stub = pb.LeaseStub(channel)
        self._watch_stub = pb.WatchStub(channel)

    async def reload_credentials(self) -> bool:
        """Take up rotated TLS files without losing a watch; True when new credentials are now in use.

        gRPC fixes a channel's credentials when it is made, so new files mean a new channel. It is tried first
        (a read that etcd authorises as the new certificate's user: every user of the mesh may read
        `cilium/state/`): files etcd refuses, or that do not load, raise and the current channel goes on. Then every
        call starts on the new channel; each open watch is moved to it and resumes right after the last revision
        it delivered, so its reader sees no gap and no error. The old channel is closed once the calls still on it
        have had time to end.
        """
        if self._closed or probing.files_unchanged(self.config, self._material):
            return False
        material = probing.load_material(self.config)
        if material.fingerprint == self._material.fingerprint:
            return False
        channel = _channel(self.config, material)
        try:
            with _translating("a read with the new credentials", user=material.client_common_name):
                await KVService(channel, max_attempts=1).get(PROBE_KEY, timeout=self.config.dial_timeout)
        except BaseException:
            await channel.close()
            raise
        if self.closed:  # the session ended meanwhile
            await channel.close()
            return False
        old_channel, old_watches = self._channel, self._watches
        self._material, self.user, self._watches = material, material.client_common_name, set()
        self._use(channel)
        for call in old_watches:
            self._moved.add(call)
            call.cancel()
        retiring = asyncio.create_task(self._retire(old_channel), name="etcd-retire-channel")
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        log.info("etcd %s: new TLS credentials in use (user %s); %d watch(es) moved",
                 self.config.describe(), self.user, len(old_watches))  # fmt: skip
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        self._old_channels.add(channel)
        try:
            await channel.close(grace=max(self.timeout, 60.0))  # the longest call (a list) may finish on it
        finally:
            self._old_channels.discard(channel)

    def __repr__(self) -> str:
        return f"<EtcdBackend {self.config.describe()} as {self.user}>"

    async def close(self) -> None:
        self._closed = True
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for channel in self._old_channels:
            await channel.close()  # no grace left: the backend is closing
        await self._channel.close()

    async def __aenter__(self) -> EtcdBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- reads

    async def status(self) -> tuple[int, int, str]:
        """(cluster ID, revision, server version): proves the endpoint answers gRPC."""
        with _translating("status", user=self.user):
            response = await self._maintenance.status(timeout=self.config.dial_timeout)
        return response.header.cluster_id, response.header.revision, response.version

    async def get(self, key: str) -> Entry | None:
        with _translating(f"get {key}", user=self.user):
            response = await self._kv.get(key, timeout=self.timeout)
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return _entry(kv)

    async def list_prefix(self, prefix: str, *, splits: Sequence[str] = ()) -> Listing:
        entries: list[Entry] = []
        revision = 0
        async for page in self.list_pages(prefix, splits=splits):
            entries.extend(page.entries)
            revision = page.revision
        return Listing(entries, revision)

    async def _range(self, prefix: str, start: bytes, end: bytes, revision: int) -> Any:
        with _translating(f"list {prefix}", user=self.user):
            return await self._kv.get(
                start, end, revision=revision, limit=LIST_PAGE_SIZE, timeout=max(self.timeout, 60.0)
            )

    async def _keys(self, prefix: str, start: bytes, end: bytes, revision: int) -> list[bytes]:
        with _translating(f"list the keys of {prefix}", user=self.user):
            response = await self._kv.get(
                start, end, revision=revision, keys_only=True, timeout=max(self.timeout, 60.0)
            )
        return [kv.key for kv in response.kvs]

    async def list_pages(self, prefix: str, *, splits: Sequence[str] = ()) -> AsyncIterator[Listing]:
        """The entries under `prefix` page by page, all at the first page's revision, in time linear in their
        number (`kvstore.ranges`): the prefix is read as sub-ranges (split at `splits`, and where a range holds much
        more than a page, at every page's worth of its keys, found by one keys-only pass), so etcd never counts a
        large remainder twice. The next page is asked for before the current one is handed out, so etcd produces
        it while the caller decodes this one."""
        ranges = deque(ranges_module.sub_ranges(prefix, splits))
        current = ranges.popleft()
        response = await self._range(prefix, current[0], current[1], 0)
        revision = int(response.header.revision)
        while True:
            if response.more and response.kvs:
                rest = response.kvs[-1].key + b"\x00"
                if response.count - len(response.kvs) > SPLIT_ABOVE:
                    keys = await self._keys(prefix, rest, current[1], revision)
                    bounds = [rest, *keys[LIST_PAGE_SIZE::LIST_PAGE_SIZE], current[1]]
                    ranges.extendleft(reversed(list(itertools.pairwise(bounds))))
                else:
                    ranges.appendleft((rest, current[1]))
            following: asyncio.Task[Any] | None = None
            if ranges:
                current = ranges.popleft()
                following = asyncio.ensure_future(self._range(prefix, current[0], current[1], revision))
                await asyncio.sleep(0)  # let the request go out now, before the caller works on this page
            try:
                yield Listing([Entry(kv.key.decode(), kv.value, kv.mod_revision, kv.lease) for kv in response.kvs],
                              revision)  # fmt: skip
            except BaseException:
                if following is not None:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                raise
            if following is None:
                return
            response = await following

    async def count_prefix(self, prefix: str) -> int:
        with _translating(f"count {prefix}", user=self.user):
            response = await self._kv.get(prefix, prefix_range_end(prefix), count_only=True, timeout=self.timeout)
        return int(response.count)

    # --- writes

    async def commit(self, ops: Sequence[WriteOp]) -> int:
        if not ops:
            raise ValueError("commit needs at least one operation")
        if len(ops) > MAX_TXN_OPS:
            raise ValueError(f"a transaction takes at most {MAX_TXN_OPS} operations, got {len(ops)}")
        request_ops = [
            KVService.txn_op_put(op.key, op.value, lease=op.lease)
            if isinstance(op, PutOp)
            else KVService.txn_op_delete(op.key)
            for op in ops
        ]
        with _translating(f"commit {len(ops)} operations", user=self.user):
            response = await self._kv.txn([], request_ops, timeout=self.timeout)
        return int(response.header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.commit([PutOp(key, value, lease)])

    async def delete(self, key: str) -> int:
        return await self.commit([DeleteOp(key)])

    async def delete_prefix(self, prefix: str) -> int:
        # An empty prefix means every key: etcd wants the range [\0, \0) for that.
        start, end = (prefix.encode(), prefix_range_end(prefix)) if prefix else (b"\0", b"\0")
        with _translating(f"delete {prefix}*", user=self.user):
            response = await self._kv.delete(start, end, timeout=self.timeout)
        return int(response.deleted)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        with _translating(f"create {key}", user=self.user):
            response = await self._kv.txn(
                [KVService.txn_compare_create_revision(key, 0)],
                [KVService.txn_op_put(key, value, lease=lease)],
                timeout=self.timeout,
            )
        return int(response.header.revision) if response.succeeded else 0

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> int:
        compare = pb.Compare(
            result=pb.Compare.EQUAL, target=pb.Compare.MOD, key=key.encode(), mod_revision=mod_revision
        )
        with _translating(f"replace {key}", user=self.user):
            response = await self._kv.txn(
                [compare], [KVService.txn_op_put(key, value, lease=lease)], timeout=self.timeout
            )
        return int(response.header.revision) if response.succeeded else 0

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        compare = pb.Compare(
            result=pb.Compare.EQUAL, target=pb.Compare.MOD, key=key.encode(), mod_revision=mod_revision
        )
        with _translating(f"delete {key}", user=self.user):
            response = await self._kv.txn([compare], [KVService.txn_op_delete(key)], timeout=self.timeout)
        return bool(response.succeeded)

    async def compact(self, revision: int) -> None:
        with _translating(f"compact to {revision}", user=self.user):
            await self._kv.compact(revision, physical=True, timeout=self.timeout)

    # --- watch

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[Event]]:
        next_revision = start_revision
        while True:
            moved = False
            async with contextlib.aclosing(self._watch_once(prefix, next_revision)) as batches:
                async for batch in batches:
                    if batch is None:
                        moved = True
                        continue
                    if isinstance(batch, int):  # a progress notification: nothing of ours up to that revision
                        next_revision = max(next_revision, batch + 1)
                        continue
                    next_revision = batch[-1].revision + 1
                    yield batch
            if not moved:
                return

    async def _watch_once(self, prefix: str, start_revision: int) -> AsyncGenerator[list[Event] | int | None, None]:
        """One watch call: batches of events; a revision (int) for each progress notification etcd sends a synced
        watcher (every ten minutes by default), so a watch moved to new credentials resumes from a revision the
        history still holds on a quiet prefix; None (and the end) when `reload_credentials` moved it."""
        create = pb.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix), start_revision=start_revision,
            progress_notify=True,
        )  # fmt: skip

        finished = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield pb.WatchRequest(create_request=create)
            await finished.wait()  # keep our side of the stream open until the watch ends

        call = self._watch_stub.Watch(requests())
        self._watches.add(call)
        try:
            with _translating(f"watch {prefix}", user=self.user):
                try:
                    async for response in call:
                        if response.compact_revision:
                            raise errors.RevisionCompacted(int(response.compact_revision))
                        if response.canceled:
                            self._raise_cancelled(prefix, response.cancel_reason)
                        if not response.events:
                            if not response.created:
                                yield int(response.header.revision)
                            continue
                        batch: list[Event] = []
                        for event in response.events:
                            kv = event.kv
                            if event.type == _DELETE:
                                batch.append(Delete(kv.key.decode(), kv.mod_revision))
                            else:
                                batch.append(
                                    Upsert(
                                        kv.key.decode(), kv.value, kv.mod_revision, kv.lease, kv.version,
                                        kv.create_revision,
                                    )
                                )  # fmt: skip
                        yield batch
                except asyncio.CancelledError:
                    if call not in self._moved or _being_cancelled():
                        raise
                    yield None
                    return
                if call in self._moved:
                    yield None
                    return
            raise errors.BackendUnavailable(f"watch {prefix}: etcd ended the stream")
        finally:
            self._watches.discard(call)
            self._moved.discard(call)
            finished.set()  # ends gRPC's task that feeds our requests into the stream
            call.cancel()

    def _raise_cancelled(self, prefix: str, reason: str) -> NoReturn:
        if "permission denied" in reason or "user" in reason:
            raise _permission_error(f"watch {prefix}", self.user, reason)
        raise errors.BackendUnavailable(f"watch {prefix}: cancelled by etcd: {reason or 'no reason given'}")

    # --- leases

    async def grant_lease(self, ttl: int) -> int:
        with _translating("grant a lease", user=self.user):
            response = await self._lease_stub.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl, ID=0), timeout=self.timeout)
        return int(response.ID)

    async def keep_alive(self, lease: int) -> int:
        async def one() -> AsyncIterator[Any]:
            yield pb.LeaseKeepAliveRequest(ID=lease)

        call = self._lease_stub.LeaseKeepAlive(one(), timeout=self.timeout)
        try:
            with _translating(f"keep lease {lease:x} alive", user=self.user):
                async for response in call:
                    if response.TTL <= 0:
                        raise errors.LeaseLost(lease)
                    return int(response.TTL)
        finally:
            call.cancel()
        raise errors.BackendUnavailable(f"keep lease {lease:x} alive: etcd ended the stream")

    async def revoke_lease(self, lease: int) -> None:
        try:
            with _translating(f"revoke lease {lease:x}", user=self.user):
                await self._lease_stub.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease), timeout=self.timeout)
        except errors.LeaseLost:
            pass

    # --- users and roles (kvstore.users drives these)

    async def auth_enabled(self) -> bool | None:
        """Whether auth is on; None when the server cannot say (etcd 3.4 has no AuthStatus call)."""
        try:
            with _translating("auth status", user=self.user):
                response = await self._auth.auth_status(timeout=self.timeout)
        except errors.KVStoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
        return bool(response.enabled)

    async def enable_auth(self) -> None:
        with _translating("enable auth", user=self.user):
            await self._auth.auth_enable(timeout=self.timeout)

    async def users(self) -> list[str]:
        with _translating("list users", user=self.user):
            response = await self._auth.user_list(timeout=self.timeout)
        return list(response.users)

    async def roles(self) -> list[str]:
        with _translating("list roles", user=self.user):
            response = await self._auth.role_list(timeout=self.timeout)
        return list(response.roles)

    async def add_user(self, name: str) -> None:
        with _translating(f"add user {name}", user=self.user):
            await self._auth.user_add(name, no_password=True, timeout=self.timeout)

    async def delete_user(self, name: str) -> None:
        with _translating(f"delete user {name}", user=self.user):
            await self._auth.user_delete(name, timeout=self.timeout)

    async def add_role(self, name: str) -> None:
        with _translating(f"add role {name}", user=self.user):
            await self._auth.role_add(name, timeout=self.timeout)

    async def delete_role(self, name: str) -> None:
        with _translating(f"delete role {name}", user=self.user):
            await self._auth.role_delete(name, timeout=self.timeout)

    async def grant_role(self, user: str, role: str) -> None:
        with _translating(f"grant role {role} to {user}", user=self.user):
            await self._auth.user_grant_role(user, role, timeout=self.timeout)

    async def grant_permission(self, role: str, key: str, *, prefix: bool, write: bool) -> None:
        perm = PermissionType.READWRITE if write else PermissionType.READ
        range_end = prefix_range_end(key) if prefix else None
        with _translating(f"grant {perm.name} on {key} to role {role}", user=self.user):
            await self._auth.role_grant_permission(role, key, range_end, perm_type=perm, timeout=self.timeout)
