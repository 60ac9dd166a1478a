"""One connected cluster, from the agent's side: connect, check, sync, watch, and say truthfully how it is going.

A `RemoteCluster` runs sessions, one per connection, in a loop:

1. read its etcd config file again (so rotated certificates and changed endpoints are picked up) and connect (mTLS);
2. read `cilium/cluster-config/<name>` and check it: the name is not the local cluster's, the cluster ID is not
   the local one's nor another connected cluster's, `maxConnectedClusters` is the same as ours. A refused cluster is
   not watched at all; the reason is in its status; it is checked again later (the config may be fixed);
3. four WatchStores (nodes, ipcache, identities, services), each waiting for its synced canary, with the
   validating decoders of `clustermesh.model.admission`, and the heartbeat reader;
4. a watchdog: a heartbeat older than `heartbeat_max_age` ends the session (the cluster is not ready, and we
   reconnect).

When a session ends, nothing is removed from the view: nodes, ipcache entries and identities of a disconnected cluster
are kept (traffic to it keeps flowing); its services are drained after `cache_ttl` if it is still disconnected then
(0: never). The next session lists again and removes only what did not come back. `remove()` (its config file is
gone) drains everything. Readiness is never claimed while any watcher is stopped, the heartbeat is stale, or the
config was refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.metrics import AgentMetrics
from agent.view import Kind, MergedView
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model import keys, wire
from clustermesh.model.admission import Ownership, RemoteDecoders, decoders_for
from clustermesh.model.api import ClusterStatus, Problem
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import ModelError
from kvstore import errors
from kvstore.backend import Backend, ReloadsCredentials
from kvstore.config import EtcdConfig, load_config_file
from kvstore.heartbeat import HEARTBEAT_MAX_AGE, HeartbeatReader
from kvstore.metrics import KVStoreMetrics
from kvstore.ranges import cidr_key_prefixes
from kvstore.reconnecting import Backoff
from kvstore.watching import WatchStore

__all__ = ["AccessDenied", "ClusterRegistry", "Refused", "RemoteCluster"]

log = logging.getLogger(__name__)

Connector = Callable[[EtcdConfig], Awaitable[Backend]]
PREFIX_KINDS: dict[str, Kind] = {
    keys.NODES_PREFIX: "node",
    keys.IPCACHE_PREFIX: "ipcache",
    keys.IDENTITIES_PREFIX: "identity",
    keys.SERVICES_PREFIX: "service",
}
SHORT = {keys.NODES_PREFIX: "nodes", keys.IPCACHE_PREFIX: "endpoints", keys.IDENTITIES_PREFIX: "identities",
         keys.SERVICES_PREFIX: "services"}  # fmt: skip


class Refused(Exception):
    """This cluster may not join the mesh as configured; the message says why, `reason` is its code."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class RemoteStale(errors.BackendUnavailable):
    reason = "heartbeat-stale"


class AccessDenied(errors.PermissionDenied):
    """The etcd answers but refuses what the agent must read; `reason` says which case it is."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ClusterRegistry:
    """Which cluster holds which ID: the local one and every connected one. Two clusters never share an ID."""

    def __init__(self, local: ClusterInfo) -> None:
        self.local = local
        self._ids: dict[str, int] = {}

    def check(self, name: str, config: wire.ClusterConfig) -> ClusterInfo:
        """The remote's ClusterInfo if it may join; raise Refused with the reason otherwise."""
        if name == self.local.name:
            raise Refused(f"name clash: {name!r} is the local cluster's name", "refused-name-clash")
        remote_max = config.capabilities.maxConnectedClusters or 255
        if remote_max != self.local.max_connected_clusters:
            raise Refused(
                f"maxConnectedClusters mismatch: {name} has {remote_max}, this cluster has "
                f"{self.local.max_connected_clusters}; every cluster of a mesh must use the same value",
                "refused-max-connected-mismatch",
            )
        try:
            info = ClusterInfo(name, config.id, self.local.max_connected_clusters)
        except ModelError as exc:
            raise Refused(f"invalid cluster-config: {exc}", "refused-invalid-config") from None
        if config.id == self.local.id:
            raise Refused(
                f"cluster ID clash: {name} has ID {config.id}, the local cluster {self.local.name}'s ID",
                "refused-id-clash",
            )
        for other, other_id in self._ids.items():
            if other != name and other_id == config.id:
                raise Refused(
                    f"cluster ID clash: {name} has ID {config.id}, already used by {other}", "refused-id-clash"
                )
        return info

    def reserve(self, info: ClusterInfo) -> None:
        self._ids[info.name] = info.id

    def release(self, name: str) -> None:
        self._ids.pop(name, None)


@dataclass
class RemoteCluster:
    name: str
    config_path: Path | None
    view: MergedView
    registry: ClusterRegistry
    ownership: Ownership
    connect: Connector
    metrics: AgentMetrics | None = None
    kvmetrics: KVStoreMetrics | None = None
    is_local: bool = False
    config: EtcdConfig | None = None  # used instead of config_path (the local cluster's own etcd)
    cache_ttl: float = 0.0
    heartbeat_max_age: float = HEARTBEAT_MAX_AGE
    refused_retry: float = 10.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.2, maximum=10.0))
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.info: ClusterInfo | None = None
        self.decoders: RemoteDecoders | None = None
        self.stores: dict[str, WatchStore[Any]] = {}
        self.heartbeat = HeartbeatReader(clock=self.clock, max_age=self.heartbeat_max_age)
        self.connected = False
        self.refused: Refused | None = None
        self.sessions = 0
        self.failures = 0
        self.last_failure_time = 0.0  # wall clock, for Cilium's last_failure_ts
        self.cache_revocations = 0
        self.last_error: errors.KVStoreError | Refused | None = None
        self.last_error_at: float | None = None
        self.changed = asyncio.Event()  # set on every status change
        self._drain_task: asyncio.Task[None] | None = None
        self.backend: Backend | None = None  # the session's, while one runs
        self.credential_reloads = 0
        self.credentials_error: errors.KVStoreError | None = None

    # --- status

    def _set_changed(self) -> None:
        self.changed.set()
        ready = self.ready()
        if ready and self.last_error is not None:  # recovered: a failure to come must not show this one's words
            self.last_error = None
            self.last_error_at = None
        if self.metrics is not None:
            self.metrics.ready.labels(self.name).set(1 if ready else 0)

    def problems(self) -> list[Problem]:
        """Why this cluster is not ready, most fundamental first; none when it is."""
        found: list[Problem] = []
        if self.refused is not None:
            found.append(Problem(self.refused.reason, f"refused: {self.refused}"))
        if not self.connected:
            if self.last_error is None:
                found.append(Problem("connecting", "not connected yet"))
            elif self.refused is None:
                found.append(Problem(self.last_error.reason, f"not connected: {self.last_error}"))
            return found
        if not self.stores:
            found.append(Problem("connecting", "connected; reading its cluster-config"))
        for prefix, store in self.stores.items():
            if store.phase == "watching":
                continue
            what = SHORT[prefix]
            if store.phase == "waiting-canary":
                waiting = f"{what}: waiting for the synced canary {store.synced_canary}"
                found.append(Problem("waiting-canary", f"{waiting} (has its apiserver finished its initial sync?)"))
            elif store.phase == "listing":
                found.append(Problem("listing", f"{what}: listing"))
            elif (
                prefix in (keys.IPCACHE_PREFIX, keys.SERVICES_PREFIX)
                and not self.stores[keys.NODES_PREFIX].live.is_set()
            ):
                found.append(Problem("waiting-nodes", f"{what}: waiting for the nodes to be listed"))
            else:
                found.append(Problem("watch-ended", f"{what}: the watch ended"))
        if self.heartbeat.stale():
            age = f"not changed for {self.heartbeat.age():.0f} s (more than {self.heartbeat_max_age:.0f})"
            found.append(Problem("heartbeat-stale", f"heartbeat stale: {age}: is its clustermesh-apiserver alive?"))
        return found

    def not_ready(self) -> list[str]:
        return [problem.message for problem in self.problems()]

    def ready(self) -> bool:
        return not self.problems()

    def rejected_reasons(self) -> list[tuple[str, str]]:
        """Every key of this cluster whose value is rejected or held, with the reason, sorted by key."""
        return sorted(item for store in self.stores.values() for item in store.rejected.items())

    def status(self) -> ClusterStatus:
        rejected: dict[str, int] = {}
        rejected_keys: list[tuple[str, str]] = []
        for prefix, store in self.stores.items():
            if store.rejected:
                rejected[SHORT[prefix]] = len(store.rejected)
                rejected_keys.extend(sorted(store.rejected.items())[:5])
        counts = self.view.counts.get(self.name, {})
        problems = self.problems()
        if not problems and self.last_error is not None:  # ready again (some ways back need no status change)
            self.last_error = self.last_error_at = None
        return ClusterStatus(
            name=self.name,
            local=self.is_local,
            connected=self.connected,
            ready=not problems,
            cluster_id=self.info.id if self.info else None,
            refused=str(self.refused) if self.refused is not None else None,
            synced={SHORT[p]: self.connected and s.phase == "watching" for p, s in self.stores.items()},
            counts={
                "nodes": counts.get("node", 0),
                "endpoints": counts.get("ipcache", 0),
                "identities": counts.get("identity", 0),
                "services": counts.get("service", 0),
            },
            rejected=rejected,
            rejected_keys=rejected_keys[:10],
            reconnections=max(self.sessions - 1, 0),
            failures=self.failures,
            last_error=str(self.last_error) if self.last_error else None,
            last_error_reason=self.last_error.reason if self.last_error else None,
            last_error_age=round(self.clock() - self.last_error_at, 1) if self.last_error_at else None,
            heartbeat_age=round(age, 1) if (age := self.heartbeat.age()) is not None else None,
            credentials_error=str(self.credentials_error) if self.credentials_error else None,
            credentials_error_reason=self.credentials_error.reason if self.credentials_error else None,
            credential_reloads=self.credential_reloads,
            not_ready=[problem.message for problem in problems],
            problems=problems,
        )

    # --- the loop

    def _failure(self, exc: errors.KVStoreError | Refused) -> None:
        self.failures += 1
        self.last_error = exc
        self.last_error_at = self.clock()
        self.last_failure_time = time.time()
        if self.metrics is not None:
            self.metrics.failures.labels(self.name).inc()
            self.metrics.last_failure.labels(self.name).set(time.time())
        self._set_changed()

    async def run(self) -> None:
        """Sessions until cancelled; a refused cluster is tried again after `refused_retry`, a failure after the
        backoff."""
        try:
            while True:
                delay = None
                try:
                    await self.session()
                except Refused:
                    delay = self.refused_retry
                except Exception:  # said and recorded by the session: try again
                    pass
                await asyncio.sleep(delay if delay is not None else self.backoff.next())
        finally:
            self._cancel_drain()

    def _etcd_config(self) -> EtcdConfig:
        if self.config is not None:
            return self.config
        assert self.config_path is not None
        return load_config_file(self.config_path)

    async def session(self) -> None:
        """One connection: connect, check, watch until it breaks. Its failure is recorded before the cluster is
        shown disconnected, so status never shows a new failure with an old failure's words."""
        backend: Backend | None = None
        try:
            backend = await self.connect(self._etcd_config())
            self.backend = backend
            self.connected = True
            self._cancel_drain()
            self._set_changed()
            info = await self._check_config(backend)
            self.refused = None
            self._prepare(info)
            self.sessions += 1
            self.backoff.reset()
            await self._watch(backend)
        except Refused as exc:
            log.warning("cluster %s refused: %s", self.name, exc)
            self.refused = exc
            self._failure(exc)
            raise
        except errors.KVStoreError as exc:
            log.warning("cluster %s: %s", self.name, exc)
            self._failure(exc)
            raise
        except Exception as exc:  # a bug must not stop this cluster for good: say it, and try again
            log.exception("cluster %s: unexpected failure", self.name)
            self._failure(errors.KVStoreError(f"unexpected {type(exc).__name__}: {exc}"))
            raise
        finally:
            self.connected = False
            self.backend = None
            self.credentials_error = None  # the next session reads the files anew and says what is wrong
            self._set_changed()
            if backend is not None:
                await backend.close()
            self._schedule_drain()

    # --- certificates rotated in place

    def runs_with(self, config_path: Path) -> bool:
        """A session runs with what `config_path` says now (endpoints, files): a change of the files' contents
        only, which `follow_credentials` takes up without a new session."""
        if self.backend is None or not isinstance(self.backend, ReloadsCredentials):
            return False
        try:
            return load_config_file(config_path) == getattr(self.backend, "config", None)
        except (OSError, ValueError, errors.KVStoreError):
            return False

    async def follow_credentials(self) -> None:
        """Rotated TLS files into the running session, watches kept. New files that do not work (half-written,
        mismatched, refused by etcd) are said once, counted, and tried again on the next call, while the session
        goes on with the credentials it has."""
        backend = self.backend
        if backend is None or not isinstance(backend, ReloadsCredentials):
            return
        try:
            reloaded = await backend.reload_credentials()
        except Exception as exc:
            if not isinstance(exc, errors.KVStoreError):
                exc = errors.BadTLSFiles(f"{type(exc).__name__}: {exc}")
            if str(exc) != str(self.credentials_error):
                log.warning("cluster %s: the rotated certificate files are not taken up yet, the session goes on "
                            "with the ones it has: %s", self.name, exc)  # fmt: skip
                if self.metrics is not None:
                    self.metrics.tls_reloads.labels(self.name, "failed").inc()
            if self.credentials_error is None or str(exc) != str(self.credentials_error):
                self.credentials_error = exc
                self._set_changed()
            return
        if self.credentials_error is not None:
            self.credentials_error = None
            self._set_changed()
        if reloaded:
            self.credential_reloads += 1
            log.info("cluster %s: rotated certificates taken up, watches kept", self.name)
            if self.metrics is not None:
                self.metrics.tls_reloads.labels(self.name, "ok").inc()
            self._set_changed()

    async def _check_config(self, backend: Backend) -> ClusterInfo:
        key = keys.cluster_config_key(self.name)
        try:
            entry = await backend.get(key)
        except errors.UnknownUser:
            raise  # its words say what to do
        except errors.PermissionDenied as exc:
            raise await self._explain_denied(backend, key, exc) from None
        if entry is None:
            raise Refused(
                f"no {key} in its etcd: is its apiserver running, and is this the right etcd?",
                "refused-no-cluster-config",
            )
        try:
            config = wire.decode(wire.ClusterConfig, key, entry.value)
        except ModelError as exc:
            raise Refused(f"unreadable cluster-config: {exc}", "refused-invalid-config") from None
        if self.is_local:
            if config.id != self.registry.local.id:
                raise Refused(
                    f"the local etcd's cluster-config says ID {config.id}, this agent runs with cluster ID "
                    f"{self.registry.local.id}: check --cluster-id",
                    "refused-id-mismatch",
                )
            return self.registry.local
        info = self.registry.check(self.name, config)
        self.registry.reserve(info)
        return info

    async def _explain_denied(self, backend: Backend, key: str, denied: errors.PermissionDenied) -> errors.KVStoreError:
        """A refused read of the cluster-config means one of two things: the user has no role in this etcd at all,
        or this etcd is another cluster's (whose role grants only its own cluster-config). The heartbeat, which
        every role of the mesh may read, tells them apart."""
        where = self._etcd_config().describe()
        try:
            await backend.get(keys.HEARTBEAT_KEY)
        except errors.PermissionDenied:
            return AccessDenied(
                f"the etcd at {where} grants this certificate's user no role: was `clustermesh connect` run for "
                f"this cluster (it creates the user's role)? ({denied})",
                "no-role",
            )
        except errors.KVStoreError:
            return denied
        return AccessDenied(
            f"the etcd at {where} lets this user read the mesh's keys but not {key}: it holds another cluster's "
            f"state; is its config file's endpoint {self.name}'s etcd?",
            "wrong-cluster",
        )

    def _prepare(self, info: ClusterInfo) -> None:
        """Watch stores for `info`; a cluster whose ID changed is drained first (its identities changed too)."""
        if self.info == info and self.stores:
            return
        if self.stores:
            log.warning("cluster %s changed from ID %s to %s: dropping its old state", self.name,
                        self.info.id if self.info else "?", info.id)  # fmt: skip
            self.drain()
        self.info = info
        self.decoders = decoders_for(info)
        decode = {
            keys.NODES_PREFIX: self.decoders.node,
            keys.IPCACHE_PREFIX: self.decoders.ip,
            keys.IDENTITIES_PREFIX: self.decoders.identity,
            keys.SERVICES_PREFIX: self.decoders.service,
        }
        ownership, name = self.ownership, self.name
        admit: dict[str, Any] = {
            keys.NODES_PREFIX: functools.partial(ownership.admit_node, name),
            keys.IPCACHE_PREFIX: ownership.ip_admitter(name),
            keys.SERVICES_PREFIX: functools.partial(ownership.admit_service, name),
        }
        observers: dict[str, Any] = {prefix: self.view.observer(name, kind) for prefix, kind in PREFIX_KINDS.items()}
        observers[keys.NODES_PREFIX] = _NodeClaims(observers[keys.NODES_PREFIX], ownership, name)
        self.stores = {
            prefix: WatchStore(
                prefix=key_prefix,
                decode=decode[prefix],
                admit=admit.get(prefix),
                observer=observers[prefix],
                name=f"{self.name}/{SHORT[prefix]}",
                synced_canary=keys.synced_key(self.name, prefix),
                metrics=self.kvmetrics,
                on_batch=self.metrics.propagation.labels(self.name).observe if self.metrics else None,
                on_rejected=lambda key, reason: self._set_changed(),  # status names rejected keys
                splits=self._ipcache_splits if prefix == keys.IPCACHE_PREFIX else None,
            )
            for prefix, key_prefix in self.decoders.prefixes.items()
        }

    def _ipcache_splits(self) -> list[str]:
        """Where to split the list of this cluster's ipcache: at its nodes' pod CIDRs (read first; admission lets
        no entry outside them in), so a million endpoints list in time linear in their number."""
        cidrs = []
        for name, node in self.view.nodes.items():
            if name.startswith(f"{self.name}/"):
                cidrs += [str(cidr.network()) for cidr in (node.IPv4AllocCIDR, *(node.IPv4SecondaryAllocCIDRs or ()))
                          if cidr is not None]  # fmt: skip
        return cidr_key_prefixes(self.stores[keys.IPCACHE_PREFIX].prefix, cidrs)

    async def _run_store(self, prefix: str, store: WatchStore[Any], backend: Backend) -> None:
        """Nodes first: the other prefixes are admitted by the addresses the nodes claim (an endpoint listed before
        its node would be held, and admitted a moment later)."""
        if prefix in (keys.IPCACHE_PREFIX, keys.SERVICES_PREFIX):
            await self.stores[keys.NODES_PREFIX].live.wait()
        await store.run(backend)

    def recheck(self, *, entries: bool = False) -> None:
        """Ownership changed: admit what fits now; with `entries`, take back endpoints and services that do not."""
        for prefix, store in self.stores.items():
            if prefix in (keys.IPCACHE_PREFIX, keys.SERVICES_PREFIX):
                if entries and self.connected and not store.live.is_set():
                    store.recheck_after_list()  # a session is listing: its list brings the current values
                    store.recheck()
                else:
                    store.recheck(entries=entries)
            elif prefix == keys.NODES_PREFIX:
                store.recheck()

    def evict_node(self, node: str, reason: str) -> None:
        """The local cluster took this node's addresses: take it back from the view (held until they are free)."""
        store = self.stores.get(keys.NODES_PREFIX)
        if store is not None:
            log.warning("cluster %s: node %s evicted: %s", self.name, node, reason)
            store.evict(keys.node_key(self.name, node), reason)
            self._set_changed()

    async def _watch(self, backend: Backend) -> None:
        tasks = [asyncio.create_task(self._run_store(p, store, backend), name=f"{self.name}-{SHORT[p]}")
                 for p, store in self.stores.items()]  # fmt: skip
        tasks.append(asyncio.create_task(self.heartbeat.run(backend), name=f"{self.name}-heartbeat"))
        tasks.append(asyncio.create_task(self._watchdog(), name=f"{self.name}-watchdog"))
        live = [asyncio.create_task(s.live.wait()) for s in self.stores.values()]
        notify = asyncio.create_task(self._notify_when(live))
        everything: list[asyncio.Task[Any]] = [*tasks, *live, notify]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                finished.result()  # raises the cause
            raise errors.BackendUnavailable(f"cluster {self.name}: a watcher ended")
        finally:
            await cancel_and_wait(everything)

    async def _notify_when(self, live: list[asyncio.Task[Any]]) -> None:
        for waiter in asyncio.as_completed(live):
            await waiter
            self._set_changed()
        log.info("cluster %s: every prefix synced", self.name)

    async def _watchdog(self) -> None:
        interval = max(0.05, min(5.0, self.heartbeat_max_age / 10))
        was_stale = False
        while True:
            await asyncio.sleep(interval)
            stale = self.heartbeat.stale()
            if stale != was_stale:
                self._set_changed()
                was_stale = stale
            if stale:
                raise RemoteStale(f"cluster {self.name}: no heartbeat for {self.heartbeat.age():.0f} s")

    # --- draining

    def drain(self, prefixes: list[str] | None = None) -> None:
        for prefix, store in self.stores.items():
            if prefixes is None or prefix in prefixes:
                store.drain()
        self._set_changed()

    def _schedule_drain(self) -> None:
        if self.cache_ttl <= 0 or self._drain_task is not None:
            return

        async def drain_later() -> None:
            await asyncio.sleep(self.cache_ttl)
            log.warning("cluster %s disconnected for %.0f s: draining its services", self.name, self.cache_ttl)
            self.drain([keys.SERVICES_PREFIX])
            self.cache_revocations += 1
            self._drain_task = None

        self._drain_task = asyncio.create_task(drain_later(), name=f"{self.name}-drain")

    def _cancel_drain(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None

    async def remove(self, task: asyncio.Task[None] | None) -> None:
        """The cluster left the configuration: stop, drain everything, release its ID."""
        if task is not None:
            await cancel_and_wait([task])
        self._cancel_drain()
        self.drain()
        self.registry.release(self.name)


class _NodeClaims:
    """The view's observer of one cluster's nodes, which also gives a node's addresses back when it goes."""

    def __init__(self, view: Any, ownership: Ownership, cluster: str) -> None:
        self.view = view
        self.ownership = ownership
        self.cluster = cluster

    def on_upsert(self, key: str, node: wire.Node) -> None:
        self.view.on_upsert(key, node)

    def on_upserts(self, items: list[tuple[str, wire.Node]]) -> None:
        self.view.on_upserts(items)

    def on_delete(self, key: str, node: wire.Node) -> None:
        self.ownership.release_node(self.cluster, node.Name)
        self.view.on_delete(key, node)
