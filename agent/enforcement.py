"""Policy enforcement on this node: the datapath's maps kept equal to the merged view and the cluster's policies.

- **ipcache**: every endpoint of the mesh (the view's ipcache: IP or CIDR -> identity, and the node that hosts it
  as tunnel endpoint), every node's addresses (this node's as `host`, the others' as `remote-node`) and the CIDRs
  the policies name (each its own identity, from 2^24 on, as Cilium's local CIDR identities): written at start as
  one difference, then change by change;
- **endpoints and their policy maps**: per local endpoint, whether a policy enforces each direction, and the
  entries compiled from the policies that select it (`clustermesh.model.policycompile`), written as the difference
  with what the map holds. Entries depend on identities and policies, never on pods: a pod of an identity already
  known changes the ipcache only.

Policies come from the cluster's ResourceStore (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy);
one that cannot be enforced as written is skipped, logged and counted, and the others stay enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from agent.view import Change, MergedView
from bpf.maps import EndpointMap, EndpointSettings, IpcacheEntry, IpcacheMap, PolicyKey, PolicyMap, port_prefixes
from clustermesh.model import wire
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Kind, Object, resolve_kind
from clustermesh.model.policies import ICMP, Policy, PolicyError, parse_policy
from clustermesh.model.policycompile import (
    Compiled,
    Entry,
    MapPlan,
    PolicyContext,
    cidrs_of,
    compile_endpoint,
    identity_labels,
    plan,
    pods_by_cidr,
)
from clustermesh.resources.informing import object_ref

__all__ = ["CIDR_IDENTITY_BASE", "Datapath", "Enforcer", "LocalEndpoint", "expand"]

log = logging.getLogger(__name__)

CIDR_IDENTITY_BASE = 1 << 24
FIRST_ENDPOINT_IDENTITY = 256  # below: Cilium's reserved identities
ID_HOST, ID_REMOTE_NODE = 1, 6
POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


class Datapath(Protocol):
    """What enforcement needs of the loaded datapath (`bpf.loader.Loaded`; `bpf.testing.MemoryDatapath` in tests)."""

    ipcache: IpcacheMap
    endpoints: EndpointMap

    def policy_map(self, ifindex: int) -> PolicyMap: ...

    def forget_endpoint(self, ifindex: int) -> None: ...

    def attach(self, ifname: str) -> None: ...


@dataclass
class LocalEndpoint:
    """A pod of this node, as enforcement knows it."""

    ifindex: int
    ifname: str
    ip: str
    identity: int
    labels: dict[str, str]  # its identity's labels (k8s keys -> values)
    namespace: str = ""
    name: str = ""
    netns_cookie: int = 0  # its network namespace's, as the socket load balancer's events name it


def expand(entries: dict[Entry, bool]) -> dict[PolicyKey, bool]:
    """Compiled entries as keys of the datapath's LPM policy map (port ranges as prefixes)."""
    keys: dict[PolicyKey, bool] = {}
    for entry, deny in entries.items():
        if not entry.protocol:
            keys[PolicyKey(entry.direction, entry.identity)] = deny
        elif entry.protocol == ICMP:
            if (entry.first, entry.last) == (0, 255):
                keys[PolicyKey(entry.direction, entry.identity, ICMP)] = deny
            for kind in range(entry.first, entry.last + 1) if (entry.first, entry.last) != (0, 255) else ():
                keys[PolicyKey(entry.direction, entry.identity, ICMP, kind << 8, 8)] = deny
        elif (entry.first, entry.last) == (0, 65535):
            keys[PolicyKey(entry.direction, entry.identity, entry.protocol)] = deny
        else:
            for port, bits in port_prefixes(entry.first, entry.last):
                keys[PolicyKey(entry.direction, entry.identity, entry.protocol, port, bits)] = deny
    return keys


@dataclass
class Counts:
    """Map writes, as the bench and the tests count them."""

    ipcache_writes: int = 0
    policy_writes: int = 0
    endpoint_writes: int = 0
    last_update_ms: float = 0.0  # from the last policy or identity change to every map written
    last_recompute_ms: float = 0.0  # of which recomputing and writing


@dataclass
class Enforcer:
    view: MergedView
    datapath: Datapath
    cluster: str
    node: str  # this node's name in the view's terms: <cluster>/<node>
    host_addresses: list[str] = field(default_factory=list)  # this node's own addresses (router IP included)
    default_local_cluster: bool = True
    state_file: Path | None = None
    registry: CollectorRegistry | None = None
    #: Set once every policy kind is listed: before, no endpoint's policy map is rewritten (after a restart the maps
    #: hold the policies of before, which an empty list must not wipe). None: from the start.
    synced: asyncio.Event | None = None
    #: the objects the cluster's store skipped (they do not decode or validate): key -> why
    skipped: Callable[[], Mapping[str, str]] | None = None

    def __post_init__(self) -> None:
        self.objects: dict[tuple[str, str, str], list[Policy]] = {}  # (kind, namespace, name) -> its policies
        self.problems: dict[str, str] = {}  # "kind ns/name" -> why it is not enforced
        self.endpoints: dict[int, LocalEndpoint] = {}
        self.compiled: dict[int, Compiled] = {}
        self._written: dict[int, dict[PolicyKey, bool]] = {}
        self._settings: dict[int, EndpointSettings] = {}
        self._ipcache: dict[str, IpcacheEntry] = {}  # what this enforcer wrote, by CIDR
        self._node_cidrs: dict[str, list[str]] = {}  # node -> the /32s written for its addresses
        self.cidr_identities: dict[str, int] = {}
        self.counts = Counts()
        self._dirty = asyncio.Event()
        self._changed_at: float | None = None
        if self.registry is None:
            self.registry = CollectorRegistry()
        self.policy_changes = Counter("cilium_policy_change", "Policy objects added, changed or removed",
                                      ["outcome"], registry=self.registry)  # fmt: skip
        self.update_seconds = Histogram(
            "clustermesh_policy_update_seconds", "From a policy or identity change to every map written",
            registry=self.registry, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
        )  # fmt: skip
        self._load_endpoints()

    # --- policies (an informer Handler of the policy kinds)

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        namespace, name = object_ref(obj)
        key = (kind.name, namespace, name)
        label = f"{kind.name} {namespace + '/' if namespace else ''}{name}"
        try:
            self.objects[key] = parse_policy(obj)
        except PolicyError as exc:  # refused by apply; written around it: skip it, say why, keep the others
            self.objects.pop(key, None)
            self.problems[label] = str(exc)
            log.error("%s is not enforced: %s", label, exc)
            self.policy_changes.labels("refused").inc()
        else:
            self.problems.pop(label, None)
            self.policy_changes.labels("success").inc()
        self._touch()

    def on_delete(self, kind: Kind, obj: Object) -> None:
        namespace, name = object_ref(obj)
        self.objects.pop((kind.name, namespace, name), None)
        self.problems.pop(f"{kind.name} {namespace + '/' if namespace else ''}{name}", None)
        self.policy_changes.labels("success").inc()
        self._touch()

    def not_enforced(self) -> dict[str, str]:
        """Every policy object that is not enforced, and why: refused here, or skipped by the store (written around
        `apply`, so malformed that it is not even a policy object)."""
        found = dict(self.problems)
        for key, reason in (self.skipped() if self.skipped is not None else {}).items():
            parts = key.split("/")  # registry/<plural>/[<namespace>/]<name>, or <plural>/<namespace>/<name>
            for at in (-3, -2):
                with contextlib.suppress(ModelError, IndexError):
                    kind = resolve_kind(parts[at])
                    if kind.name in POLICY_KINDS and kind.namespaced == (at == -3):
                        found[f"{kind.name} {'/'.join(p for p in parts[at + 1 :] if p)}"] = reason
                    break
        return found

    def policies(self) -> list[Policy]:
        return [policy for _, found in sorted(self.objects.items()) for policy in found]

    def _touch(self) -> None:
        if self._changed_at is None:
            self._changed_at = time.perf_counter()
        self._dirty.set()

    # --- endpoints

    def add_endpoint(self, endpoint: LocalEndpoint) -> None:
        """A new pod of this node: its maps written before its programs are attached (no packet is judged with
        half its policy)."""
        self.endpoints[endpoint.ifindex] = endpoint
        self._save_endpoints()
        self._apply_endpoint(endpoint, self._context())
        self.datapath.attach(endpoint.ifname)

    def remove_endpoint(self, ifindex: int) -> None:
        if self.endpoints.pop(ifindex, None) is None:
            return
        self._save_endpoints()
        self.compiled.pop(ifindex, None)
        self._written.pop(ifindex, None)
        self._settings.pop(ifindex, None)
        self.datapath.forget_endpoint(ifindex)

    def endpoint_by_ip(self, ip: str) -> LocalEndpoint | None:
        return next((e for e in self.endpoints.values() if e.ip == ip), None)

    def endpoint_by_netns(self, cookie: int) -> LocalEndpoint | None:
        if not cookie:
            return None
        return next((e for e in self.endpoints.values() if e.netns_cookie == cookie), None)

    def _load_endpoints(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            for document in json.loads(self.state_file.read_bytes()):
                endpoint = LocalEndpoint(**document)
                self.endpoints[endpoint.ifindex] = endpoint
        except (OSError, ValueError, TypeError) as exc:
            log.error("%s is unreadable (%s): this node's endpoints are enforced again as their pods come back",
                      self.state_file, exc)  # fmt: skip
            self.endpoints.clear()

    def _save_endpoints(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(json.dumps([asdict(e) for e in self.endpoints.values()], indent=1))
        partial.replace(self.state_file)

    # --- compiling and writing

    def _context(self) -> PolicyContext:
        identities = {number: identity_labels(entry.labels) for number, entry in self.view.identities.items()}
        for endpoint in self.endpoints.values():  # a local identity the view does not hold yet
            identities.setdefault(endpoint.identity, endpoint.labels)
        addresses: dict[int, list[str]] = {}
        if pods_by_cidr(self.policies()):
            for key in self.view.ipcache_keys():
                pair = self.view.ipcache(key)
                if pair is not None and FIRST_ENDPOINT_IDENTITY <= pair.ID < CIDR_IDENTITY_BASE and ":" not in pair.IP:
                    addresses.setdefault(pair.ID, []).append(pair.IP)
        return PolicyContext(self.cluster, identities, self.cidr_identities, self.default_local_cluster, addresses)

    def _apply_endpoint(self, endpoint: LocalEndpoint, context: PolicyContext) -> None:
        compiled = compile_endpoint(endpoint.labels, self.policies(), context)
        self.compiled[endpoint.ifindex] = compiled
        policy_map = self.datapath.policy_map(endpoint.ifindex)
        if endpoint.ifindex not in self._written:
            self._written[endpoint.ifindex] = policy_map.items()  # after a restart: what the map holds
        desired = expand(compiled.entries)
        changes = plan(desired, self._written[endpoint.ifindex])
        apply(changes, policy_map)
        self.counts.policy_writes += len(changes)
        self._written[endpoint.ifindex] = desired
        settings = EndpointSettings(endpoint.identity, compiled.enforce_ingress, compiled.enforce_egress)
        if self._settings.get(endpoint.ifindex) != settings:
            self.datapath.endpoints.set(endpoint.ifindex, settings)
            self._settings[endpoint.ifindex] = settings
            self.counts.endpoint_writes += 1

    def recompute(self) -> None:
        """Every local endpoint's maps, as the policies and identities are now; CIDR identities first."""
        started = time.perf_counter()
        self._sync_cidrs()
        context = self._context()
        for endpoint in list(self.endpoints.values()):
            try:
                self._apply_endpoint(endpoint, context)
            except OSError as exc:  # its veth went (a pod deleted under us): the next DEL forgets it
                log.warning("endpoint %s (%s): maps not written: %s", endpoint.name, endpoint.ifname, exc)
        done = time.perf_counter()
        self.counts.last_recompute_ms = round(1000 * (done - started), 2)
        if self._changed_at is not None:
            self.update_seconds.observe(done - self._changed_at)
            self.counts.last_update_ms = round(1000 * (done - self._changed_at), 2)
            self._changed_at = None

    def _sync_cidrs(self) -> None:
        """An identity per CIDR the policies name. An address the mesh knows (an endpoint, a node, this host)
        keeps its own identity in the ipcache even when a CIDR names it exactly: a CIDR identity only fills
        prefixes nothing else holds, and gives them back when its policy goes."""
        wanted = cidrs_of(self.policies())
        added = sorted(wanted - self.cidr_identities.keys())
        gone = [cidr for cidr in self.cidr_identities if cidr not in wanted]
        if not added and not gone:
            return
        for cidr in added:
            used = set(self.cidr_identities.values())
            self.cidr_identities[cidr] = next(
                n for n in range(CIDR_IDENTITY_BASE, CIDR_IDENTITY_BASE * 2) if n not in used
            )
        for cidr in gone:
            del self.cidr_identities[cidr]
        full = self.full_ipcache()
        self._write_ipcache({cidr: full[cidr] for cidr in [*added, *gone] if cidr in full},
                            [cidr for cidr in gone if cidr not in full])  # fmt: skip

    # --- the ipcache

    def _write_ipcache(self, entries: dict[str, IpcacheEntry], removed: Iterable[str] = ()) -> None:
        changed = {cidr: entry for cidr, entry in entries.items() if self._ipcache.get(cidr) != entry}
        if changed:
            self.datapath.ipcache.write(changed)
            self._ipcache.update(changed)
        gone = [cidr for cidr in removed if self._ipcache.pop(cidr, None) is not None]
        if gone:
            self.datapath.ipcache.remove(gone)
        self.counts.ipcache_writes += len(changed) + len(gone)

    def _node_entries(self, key: str, node: wire.Node) -> dict[str, IpcacheEntry]:
        identity = ID_HOST if key == self.node else ID_REMOTE_NODE
        addresses = [a.IP for a in node.IPAddresses or () if ":" not in a.IP]
        return {f"{ip}/32": IpcacheEntry(identity, "") for ip in addresses}

    def full_ipcache(self) -> dict[str, IpcacheEntry]:
        """What the ipcache map must hold now, from the view, the nodes and the policies' CIDRs."""
        wanted = {cidr: IpcacheEntry(number, "") for cidr, number in self.cidr_identities.items()}
        for key, node in self.view.nodes.items():
            wanted.update(self._node_entries(key, node))
        wanted.update({f"{ip}/32": IpcacheEntry(ID_HOST, "") for ip in self.host_addresses})
        for key in self.view.ipcache_keys():
            pair = self.view.ipcache(key)
            if pair is not None and ":" not in pair.IP:
                wanted[_cidr(key)] = _entry(pair)
        return wanted

    def resync_ipcache(self) -> None:
        """Make the map equal to `full_ipcache()`: what it holds from before (a restart) that is not wanted goes."""
        wanted = self.full_ipcache()
        present = self.datapath.ipcache.items()
        self._ipcache = dict(present)
        self._write_ipcache(wanted, [cidr for cidr in present if cidr not in wanted])
        self._node_cidrs = {key: list(self._node_entries(key, node)) for key, node in self.view.nodes.items()}

    def on_changes(self, changes: list[Change]) -> None:
        """A batch of the view's changes: ipcache and node entries written; identities make policies recompute."""
        entries: dict[str, IpcacheEntry] = {}
        removed: list[str] = []
        for change in changes:
            if change.kind == "ipcache":
                cidr = _cidr(change.key)
                if change.op == "upsert" and ":" not in change.value.IP:
                    entries[cidr] = IpcacheEntry(
                        change.value.ID, change.value.HostIP if ":" not in change.value.HostIP else ""
                    )
                    with contextlib.suppress(ValueError):
                        removed.remove(cidr)
                elif change.op == "delete":
                    entries.pop(cidr, None)
                    removed.append(cidr)
            elif change.kind == "node":
                old = self._node_cidrs.pop(change.key, [])
                new = self._node_entries(change.key, change.value) if change.op == "upsert" else {}
                entries.update(new)
                removed.extend(c for c in old if c not in new)
                if new:
                    self._node_cidrs[change.key] = list(new)
            elif change.kind == "identity":
                self._touch()

        if any(change.kind == "ipcache" for change in changes) and pods_by_cidr(self.policies()):
            self._touch()  # an ipBlock selects pods by address: a pod's address changes what it allows
        protected = {f"{ip}/32" for ip in self.host_addresses}
        # a CIDR identity takes back a prefix an endpoint or a node held
        entries.update({c: IpcacheEntry(self.cidr_identities[c], "") for c in removed if c in self.cidr_identities})
        self._write_ipcache(entries, [c for c in removed if c not in protected and c not in entries])

    async def run(self) -> None:
        """Keep the maps in step with the view and the policies, until cancelled."""
        subscription = self.view.subscribe()
        try:
            self.resync_ipcache()
            for endpoint in list(self.endpoints.values()):  # after a restart: a new object may have new programs
                try:
                    self.datapath.attach(endpoint.ifname)
                except Exception as exc:
                    log.info("endpoint %s (%s) is gone: %s", endpoint.name, endpoint.ifname, exc)
                    self.remove_endpoint(endpoint.ifindex)
            if self.synced is not None:
                watching_early = asyncio.create_task(self._follow(subscription), name="enforcer-view")
                try:
                    await self.synced.wait()
                finally:
                    watching_early.cancel()
                    await asyncio.gather(watching_early, return_exceptions=True)
            self.recompute()
            watching = asyncio.create_task(self._follow(subscription), name="enforcer-view")
            try:
                while True:
                    await self._dirty.wait()
                    self._dirty.clear()
                    await asyncio.sleep(0)  # let a burst of changes in before computing once
                    self.recompute()
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
        finally:
            subscription.close()

    async def _follow(self, subscription: Any) -> None:
        while True:
            self.on_changes(await subscription.drain())


def apply(changes: MapPlan[PolicyKey, bool], policy_map: PolicyMap) -> None:
    """One batch of writes, then one of deletes: the map never lacks an entry that stays."""
    if changes.writes:
        policy_map.write(changes.writes)
    if changes.deletes:
        policy_map.remove(changes.deletes)


def _entry(pair: wire.IPIdentityPair) -> IpcacheEntry:
    """An endpoint's ipcache entry: its identity, and its node as tunnel endpoint (IPv4 only)."""
    return IpcacheEntry(pair.ID, pair.HostIP if pair.HostIP and ":" not in pair.HostIP else "")


def _cidr(key: str) -> str:
    return key if "/" in key else f"{key}/32"
