"""The mesh as one agent sees it: the local cluster and every configured remote, feeding one merged view.

The local cluster is one more `RemoteCluster` (its own etcd, read as `agent-<cluster>`); the others come and go with
the files of the clustermesh config directory: added -> connect, changed -> reconnect with the new file (the view
keeps its entries, the next list removes only what did not come back), removed -> disconnect and drain.

`status()` is the truth for `clustermesh status`: overall ready only when every configured cluster is ready.
`changed` is set on every status change, so `clustermesh status --wait` waits on events, not on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.configdir import ConfigDir, ConfigEvent
from agent.metrics import AgentMetrics
from agent.remotes import SHORT, ClusterRegistry, Connector, RemoteCluster
from agent.view import KINDS, MergedView
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model import wire
from clustermesh.model.admission import Ownership
from clustermesh.model.api import AgentStatus, Problem
from clustermesh.model.clusters import ClusterInfo
from kvstore import etcd
from kvstore.config import EtcdConfig
from kvstore.heartbeat import HEARTBEAT_MAX_AGE
from kvstore.metrics import KVStoreMetrics

__all__ = ["AgentStatus", "Mesh"]

log = logging.getLogger(__name__)


@dataclass
class Mesh:
    local: ClusterInfo
    local_config: EtcdConfig
    config_dir: Path | None = None
    node_name: str = ""
    connect: Connector = etcd.connect
    cache_ttl: float = 0.0
    heartbeat_max_age: float = HEARTBEAT_MAX_AGE
    scan_interval: float = 1.0
    refused_retry: float = 10.0
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    #: Where pods of the mesh live: a node's pod CIDRs must lie inside (DESIGN section 6).
    pod_supernets: list[str] = field(default_factory=lambda: ["10.0.0.0/8"])
    #: This node, as its settings describe it: its addresses are claimed before any etcd is read.
    own_node: wire.Node | None = None

    def __post_init__(self) -> None:
        self.view = MergedView(self.local.name)
        self.clusters = ClusterRegistry(self.local)
        self.ownership = Ownership(self.local.name, self.pod_supernets)
        if self.own_node is not None:
            self.ownership.pin_node(self.local.name, self.own_node)
        self.ownership.take_changes()
        self.ownership.on_change = self._schedule_reconcile
        self._reconcile_pending = False
        self.metrics = AgentMetrics(self.registry)
        self.kvmetrics = KVStoreMetrics(self.registry)
        self.remotes: dict[str, RemoteCluster] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._removals: dict[str, asyncio.Task[None]] = {}  # clusters whose config went, until they are drained
        self.changed = asyncio.Event()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.config_watch = (
            ConfigDir(self.config_dir, self.on_config_event, ignore={self.local.name})
            if self.config_dir is not None
            else None
        )

    def _make(self, name: str, path: Path | None, *, is_local: bool = False) -> RemoteCluster:
        return RemoteCluster(
            name=name,
            config_path=path,
            config=self.local_config if is_local else None,
            is_local=is_local,
            view=self.view,
            registry=self.clusters,
            ownership=self.ownership,
            connect=self.connect,
            metrics=self.metrics,
            kvmetrics=self.kvmetrics,
            cache_ttl=0.0 if is_local else self.cache_ttl,
            heartbeat_max_age=self.heartbeat_max_age,
            refused_retry=self.refused_retry,
        )

    def _start(self, remote: RemoteCluster) -> None:
        self.remotes[remote.name] = remote
        removing = self._removals.get(remote.name)  # the same name, removed a moment ago: its drain goes first
        self._tasks[remote.name] = asyncio.create_task(self._run(remote, after=removing), name=f"cluster-{remote.name}")
        self._watchers[remote.name] = asyncio.create_task(self._relay(remote), name=f"status-{remote.name}")
        self._touch()

    @staticmethod
    async def _run(remote: RemoteCluster, *, replacing: asyncio.Task[None] | None = None,
                   after: asyncio.Task[None] | None = None) -> None:  # fmt: skip
        """`remote`'s sessions, once the task it replaces has ended (two sessions of one cluster would share its
        stores, and the old one's clean-up would mark the new one disconnected) and a removal of its name is done
        (its drain would take the new entries with it)."""
        if replacing is not None:
            await cancel_and_wait([replacing])
        if after is not None:
            await asyncio.wait([after])
        await remote.run()

    async def _relay(self, remote: RemoteCluster) -> None:
        """Turn one cluster's status changes into the mesh's."""
        while True:
            await remote.changed.wait()
            remote.changed.clear()
            self._touch()

    def _touch(self) -> None:
        self.changed.set()
        self.metrics.clusters.set(len(self.remotes))

    # --- ownership of addresses

    def _schedule_reconcile(self) -> None:
        if not self._reconcile_pending:
            self._reconcile_pending = True
            asyncio.get_running_loop().call_soon(self.reconcile)

    def reconcile(self) -> None:
        """Ownership changed: evict the claims the local cluster took over, take back the entries of clusters that
        lost addresses, and admit held entries that fit now. Until nothing changes any more."""
        try:
            while True:
                evicted, shrunk, changed = self.ownership.take_changes()
                if not (evicted or shrunk or changed):
                    return
                for claimant, reason in evicted.items():
                    remote = self.remotes.get(claimant.cluster)
                    if remote is not None:
                        remote.evict_node(claimant.node, reason)
                for name in shrunk:
                    remote = self.remotes.get(name)
                    if remote is not None:
                        remote.recheck(entries=True)
                for remote in list(self.remotes.values()):
                    remote.recheck()
        finally:
            self._reconcile_pending = False

    def on_config_event(self, event: ConfigEvent) -> None:
        if event.action == "added":
            self._start(self._make(event.name, event.path))
        elif event.action == "changed":
            remote = self.remotes.get(event.name)
            if remote is None:
                self._start(self._make(event.name, event.path))
                return
            if remote.runs_with(event.path):
                return  # only the certificate files changed: follow_credentials takes them up, watches kept
            log.info("cluster %s: configuration changed, reconnecting", event.name)
            self._tasks[event.name] = asyncio.create_task(
                self._run(remote, replacing=self._tasks[event.name]), name=f"cluster-{event.name}"
            )
        else:
            remote = self.remotes.pop(event.name, None)
            if remote is None:
                return
            log.info("cluster %s: configuration removed, disconnecting and draining", event.name)
            task = self._tasks.pop(event.name, None)
            watcher = self._watchers.pop(event.name, None)
            if watcher is not None:
                watcher.cancel()
            removal = asyncio.create_task(remote.remove(task), name=f"remove-{event.name}")
            self._removals[event.name] = removal
            removal.add_done_callback(functools.partial(self._forget_removal, event.name))
            self._touch()

    def _forget_removal(self, name: str, removal: asyncio.Task[None]) -> None:
        if self._removals.get(name) is removal:
            del self._removals[name]

    async def run(self) -> None:
        self._start(self._make(self.local.name, None, is_local=True))
        try:
            while True:
                if self.config_watch is not None:
                    self.config_watch.scan()
                await asyncio.gather(*(remote.follow_credentials() for remote in list(self.remotes.values())))
                self.refresh_metrics()
                await asyncio.sleep(self.scan_interval)
        finally:
            await self.stop()

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._watchers.values(), *self._removals.values()]
        await cancel_and_wait(tasks)
        self._tasks.clear()
        self._watchers.clear()

    def refresh_metrics(self) -> None:
        self.metrics.config_problems.set(len(self.config_watch.problems) if self.config_watch else 0)
        for name, counts in self.view.counts.items():
            for kind in KINDS:
                self.metrics.entries.labels(name, kind).set(counts.get(kind, 0))
        for name, remote in self.remotes.items():
            for prefix, store in remote.stores.items():
                self.metrics.rejected.labels(name, SHORT[prefix]).set(len(store.rejected))  # the names status uses

    def status(self) -> AgentStatus:
        """Ready only when every configured cluster is, and every file of the config directory is used: a file
        that is not (named after the local cluster, unreadable, invalid) is a cluster the user meant to join."""
        clusters = [
            remote.status() for _, remote in sorted(self.remotes.items(), key=lambda i: (not i[1].is_local, i[0]))
        ]
        problems = [Problem(p.code, f"{c.name}: {p.message}") for c in clusters for p in c.problems]
        config_problems = dict(self.config_watch.problems) if self.config_watch else {}
        problems += [Problem("config-problem", f"config file {name}: {why}") for name, why in config_problems.items()]
        return AgentStatus(
            cluster=self.local.name,
            cluster_id=self.local.id,
            node=self.node_name,
            ready=not problems,
            not_ready=[problem.message for problem in problems],
            problems=problems,
            clusters=clusters,
            config_problems=config_problems,
        )

    async def wait_ready(self, timeout: float) -> bool:
        """Until every configured cluster is ready, or `timeout` seconds passed; whether it is ready."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.status().ready:
                    self.changed.clear()
                    await self.changed.wait()
        return self.status().ready
