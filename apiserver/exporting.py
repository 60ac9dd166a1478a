"""The exporter: turns resource events into wishes for the four SyncStores of `cilium/state/...`.

It keeps just enough of the cluster's resources to recompute what a change affects:

- a CiliumNode -> its node key;
- a CiliumEndpoint -> its ipcache keys (one per IP); a key two endpoints claim is kept while either does;
- a CiliumIdentity -> its identity key, if its namespace (from its security labels) is global;
- a Service or one of its EndpointSlices -> the service key, if the service is global and shared;
- a Namespace becoming global or not -> every endpoint, identity and service in it again.

A namespace is global unless annotated `clustermesh.cilium.io/global: "false"` (also when no Namespace object
exists); with `default_global_namespace` false (Cilium's `--clustermesh-default-global-namespace=false`), only a
namespace annotated `"true"` is. A service labelled `service.kubernetes.io/service-proxy-name` is exported only
when the label is `service_proxy_name` (Cilium's `--k8s-service-proxy-name`; empty: only unlabelled services).
An object the converters cannot handle is counted (by kind) and logged; the others go on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from clustermesh.model import converters, keys, wire
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.kinds import Kind, Object
from clustermesh.resources.informing import Ref, object_ref
from kvstore.syncing import SyncStore

__all__ = ["Exporter", "StateStores"]

log = logging.getLogger(__name__)


@dataclass
class StateStores:
    nodes: SyncStore
    ipcache: SyncStore
    identities: SyncStore
    services: SyncStore

    def all(self) -> list[SyncStore]:
        return [self.nodes, self.ipcache, self.identities, self.services]


@dataclass
class Exporter:
    cluster: ClusterInfo
    stores: StateStores
    registry: CollectorRegistry | None = None
    default_global_namespace: bool = True
    service_proxy_name: str = ""
    namespaces: dict[str, Object] = field(default_factory=dict)
    endpoints: dict[Ref, Object] = field(default_factory=dict)
    identities: dict[str, Object] = field(default_factory=dict)
    services: dict[Ref, Object] = field(default_factory=dict)
    #: EndpointSlices by the service they name ((namespace, service) -> slice ref -> slice): a service's export
    #: looks at its own slices, not at every slice of the cluster.
    slices: dict[Ref, dict[Ref, Object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._endpoint_keys: dict[Ref, dict[str, bytes]] = {}
        self._slice_service: dict[Ref, Ref] = {}  # slice ref -> the service it was filed under in `slices`
        self._ip_owners: dict[str, dict[Ref, bytes]] = defaultdict(dict)
        self.errors = Counter(
            "apiserver_conversion_errors",
            "Resources that could not be converted to the wire format, by kind",
            ["kind"],
            namespace="clustermesh",
            registry=self.registry,
        )

    # --- the informers' handler

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        self._dispatch(kind, obj, deleted=False)

    def on_delete(self, kind: Kind, obj: Object) -> None:
        self._dispatch(kind, obj, deleted=True)

    def _dispatch(self, kind: Kind, obj: Object, *, deleted: bool) -> None:
        try:
            getattr(self, f"_on_{kind.plural}")(obj, deleted)
        except (KeyError, TypeError, ValueError) as exc:
            namespace, name = object_ref(obj)
            log.warning("cannot export %s %s: %s", kind.name, f"{namespace}/{name}" if namespace else name, exc)
            self.errors.labels(kind.name).inc()

    def _on_ciliumnetworkpolicies(self, obj: Object, deleted: bool) -> None:
        """Policies are read by agents from their own cluster's store; nothing to export."""

    _on_networkpolicies = _on_ciliumnetworkpolicies
    _on_ciliumclusterwidenetworkpolicies = _on_ciliumnetworkpolicies
    _on_clustermeshremotes = _on_ciliumnetworkpolicies

    def is_global(self, namespace: str) -> bool:
        return converters.is_global_namespace(self.namespaces.get(namespace), default=self.default_global_namespace)

    # --- nodes

    def _on_ciliumnodes(self, obj: Object, deleted: bool) -> None:
        name = object_ref(obj)[1]
        if deleted:
            self.stores.nodes.delete(name)
            return
        node = converters.cilium_node_to_node(obj, self.cluster)
        self.stores.nodes.upsert(name, wire.encode(node))

    # --- endpoints

    def _on_ciliumendpoints(self, obj: Object, deleted: bool) -> None:
        ref = object_ref(obj)
        if deleted:
            self.endpoints.pop(ref, None)
        else:
            self.endpoints[ref] = obj
        self._export_endpoint(ref)

    def _export_endpoint(self, ref: Ref) -> None:
        obj = self.endpoints.get(ref)
        wanted: dict[str, bytes] = {}
        if obj is not None and self.is_global(ref[0]):
            wanted = {pair.key_name(): wire.encode(pair) for pair in converters.cilium_endpoint_to_ip_pairs(obj)}
        previous = self._endpoint_keys.pop(ref, {})
        for key in previous.keys() - wanted.keys():
            owners = self._ip_owners[key]
            owners.pop(ref, None)
            if owners:
                self.stores.ipcache.upsert(key, next(reversed(owners.values())))
            else:
                del self._ip_owners[key]
                self.stores.ipcache.delete(key)
        for key, value in wanted.items():
            self._ip_owners[key][ref] = value
            self.stores.ipcache.upsert(key, value)
        if wanted:
            self._endpoint_keys[ref] = wanted

    # --- identities

    def _on_ciliumidentities(self, obj: Object, deleted: bool) -> None:
        name = object_ref(obj)[1]
        if deleted:
            self.identities.pop(name, None)
        else:
            self.identities[name] = obj
        self._export_identity(name)

    def _export_identity(self, name: str) -> None:
        obj = self.identities.get(name)
        labels = converters.cilium_identity_to_labels(obj) if obj is not None else None
        namespace = converters.identity_namespace(obj) if obj is not None else None
        if obj is not None and labels is not None and namespace is None:
            log.info("identity %s has no namespace label: not exported (as in Cilium)", name)
        if labels is None or namespace is None or not self.is_global(namespace):
            self.stores.identities.delete(name)
        else:
            self.stores.identities.upsert(name, labels.encode())

    # --- services

    def _on_services(self, obj: Object, deleted: bool) -> None:
        ref = object_ref(obj)
        if deleted:
            self.services.pop(ref, None)
        else:
            self.services[ref] = obj
        self._export_service(ref)

    def _on_endpointslices(self, obj: Object, deleted: bool) -> None:
        ref = object_ref(obj)
        touched = []
        if (old_service := self._slice_service.pop(ref, None)) is not None:
            del self.slices[old_service][ref]
            touched.append(old_service)
        if not deleted and (name := _service_of(obj)) is not None:
            service = (ref[0], name)
            self.slices.setdefault(service, {})[ref] = obj
            self._slice_service[ref] = service
            touched.append(service)
        for service in dict.fromkeys(touched):
            self._export_service(service)
            if not self.slices.get(service, True):
                del self.slices[service]

    def _export_service(self, ref: Ref) -> None:
        namespace, name = ref
        service = self.services.get(ref)
        exported = None
        if (
            service is not None
            and self.is_global(namespace)
            and converters.service_proxy_name(service) == self.service_proxy_name
        ):
            slices = [s for s in self.slices.get(ref, {}).values() if converters.slice_belongs_to(s, namespace, name)]
            exported = converters.service_to_cluster_service(service, slices, self.cluster)
        if exported is None:
            self.stores.services.delete(keys.service_key_name(namespace, name))
        else:
            self.stores.services.upsert(keys.service_key_name(namespace, name), wire.encode(exported))

    # --- namespaces

    def _on_namespaces(self, obj: Object, deleted: bool) -> None:
        name = object_ref(obj)[1]
        was_global = self.is_global(name)
        if deleted:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = obj
        if self.is_global(name) == was_global:
            return
        log.info("namespace %s is %s global: exporting its resources again", name, "now" if not was_global else "no")
        for ref in [ref for ref in self.endpoints if ref[0] == name]:
            self._export_endpoint(ref)
        for identity, obj_ in self.identities.items():
            if converters.identity_namespace(obj_) == name:
                self._export_identity(identity)
        for ref in [ref for ref in self.services if ref[0] == name]:
            self._export_service(ref)


def _service_of(endpoint_slice: Object | None) -> str | None:
    if endpoint_slice is None:
        return None
    labels = (endpoint_slice.get("metadata") or {}).get("labels") or {}
    name = labels.get(converters.SERVICE_NAME_LABEL)
    return str(name) if name else None
