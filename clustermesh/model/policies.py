"""Network policies, read into one model: Kubernetes' NetworkPolicy and Cilium's CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy become `Policy` values of `Rule`s, each a direction, allow or deny, the peers it is
about and the ports. `clustermesh.model.policycompile` turns them into an endpoint's map entries.

Reading is strict: a field this model does not know, a selector or CIDR that does not parse, or a feature it does
not enforce (L7 rules, FQDNs, services, named ports, ...) raises `PolicyError` naming the field, so `clustermesh
apply` refuses the object with the reason and an agent that meets one in its store skips it, saying why.

Semantics, as Kubernetes and Cilium define them:

- NetworkPolicy: `podSelector` picks pods of the policy's namespace; `policyTypes` (default: Ingress, and Egress if
  `egress` is given) isolates them in those directions; a rule without `from`/`to` allows every peer, without
  `ports` every port; a peer is a `podSelector` (pods of the policy's namespace), a `namespaceSelector` (pods of the
  namespaces it picks), both (AND), or an `ipBlock` (a CIDR, with `except`);
- CiliumNetworkPolicy (namespaced) and CiliumClusterwideNetworkPolicy: `endpointSelector` picks endpoints (of the
  policy's namespace, for the namespaced kind); a direction is enforced when a rule of it (allow or deny) exists,
  or `enableDefaultDeny` says so; `fromEndpoints`/`toEndpoints` selectors of a namespaced policy that do not name
  `io.kubernetes.pod.namespace` pick endpoints of the policy's namespace; peers of one rule are alternatives (OR),
  and `toPorts`/`icmps` restrict them (AND); a rule with ports and no peer is about every peer; an empty rule allows
  nothing (it only enforces the direction); a deny rule wins over every allow.
- Across clusters (Cilium's `policy-default-local-cluster`): a peer selector that does not name
  `io.cilium.k8s.policy.cluster` picks only the local cluster's endpoints (`Peer.local_only`); the compiler can be
  told to read it as any cluster instead.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from clustermesh.model.labels import CLUSTER_LABEL, NAMESPACE_LABEL
from clustermesh.model.selectors import LabelSelector, PolicyError

__all__ = [
    "EGRESS",
    "ENTITIES",
    "INGRESS",
    "Peer",
    "Policy",
    "PolicyError",
    "PortRange",
    "Rule",
    "parse_policy",
]

INGRESS, EGRESS = 0, 1
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1
PROTOCOLS = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
PROTOCOL_NAMES = {0: "ANY", TCP: "TCP", UDP: "UDP", SCTP: "SCTP", ICMP: "ICMP"}
ENTITIES = ("world", "cluster", "host", "remote-node", "health", "all", "init", "unmanaged")
#: ICMP message types by the names Cilium takes besides their numbers.
ICMP_TYPES = {"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "EchoRequest": 8, "TimeExceeded": 11}


@dataclass(frozen=True)
class PortRange:
    """A protocol (0: any) and a range of ports (0..0 with a protocol: any port). For ICMP, `first` is the type."""

    protocol: int = 0
    first: int = 0
    last: int = 0

    def __str__(self) -> str:
        name = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        if self.protocol == ICMP:
            return f"ICMP type {self.first}"
        if not self.protocol or not self.last:
            return name
        return f"{name}/{self.first}" + (f"-{self.last}" if self.last != self.first else "")


@dataclass(frozen=True)
class Peer:
    """One peer clause. An endpoint peer matches an identity's labels; `namespaces` matches the labels of the
    identity's namespace; `namespace` pins the namespace; `local_only` pins the local cluster (the selector did not
    name one). An entity or a CIDR (with exceptions) peer stands alone."""

    endpoints: LabelSelector | None = None
    namespaces: LabelSelector | None = None
    namespace: str | None = None
    local_only: bool = True
    entity: str | None = None
    cidr: str | None = None
    excepts: tuple[str, ...] = ()
    #: a NetworkPolicy's ipBlock also selects the pods whose addresses are in it (Kubernetes' network policy e2e
    #: suite expects so); Cilium's fromCIDR/toCIDR select only addresses outside the mesh's endpoints
    cidr_selects_pods: bool = False

    def __str__(self) -> str:
        if self.entity is not None:
            return f"entity {self.entity}"
        if self.cidr is not None:
            return f"cidr {self.cidr}" + (f" except {','.join(self.excepts)}" if self.excepts else "")
        parts = []
        if self.namespace is not None:
            parts.append(f"namespace {self.namespace}")
        if self.namespaces is not None:
            parts.append(f"namespaces {self.namespaces}")
        if self.endpoints is not None:
            parts.append(f"endpoints {self.endpoints}")
        return " and ".join(parts) or "every endpoint"


@dataclass(frozen=True)
class Rule:
    direction: int
    deny: bool
    peers: tuple[Peer, ...] | None  # None: every peer, the world included
    ports: tuple[PortRange, ...] = ()  # empty: every protocol and port


@dataclass(frozen=True)
class Policy:
    kind: str
    namespace: str | None  # None: cluster-wide
    name: str
    subject: LabelSelector
    enforces: frozenset[int]
    rules: tuple[Rule, ...]

    @property
    def ref(self) -> str:
        short = {"NetworkPolicy": "netpol", "CiliumNetworkPolicy": "cnp", "CiliumClusterwideNetworkPolicy": "ccnp"}
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{short.get(self.kind, self.kind)} {where}{self.name}"

    def selects(self, labels: dict[str, str]) -> bool:
        """Whether an endpoint with these (identity) labels is one this policy applies to."""
        if self.namespace is not None and labels.get(NAMESPACE_LABEL) != self.namespace:
            return False
        return self.subject.matches(labels)


# --- reading


def _mapping(value: Any, field: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(field, f"must be a mapping, not {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PolicyError(f"{field}.{unknown[0]}" if field else unknown[0], "unknown field")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(field, f"must be a list, not {type(value).__name__}")
    return value


def _cidr(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(field, f"a CIDR must be a string, not {type(value).__name__}")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise PolicyError(field, f"{value!r} is not a CIDR") from None
    if network.version != 4:
        raise PolicyError(field, f"{value!r}: IPv6 CIDRs are not enforced (the datapath is IPv4)")
    return str(network)


def _port_number(value: Any, field: str, *, named: str) -> int:
    if isinstance(value, bool):
        raise PolicyError(field, f"{value!r} is not a port")
    if isinstance(value, str):
        if not value.isdigit():
            raise PolicyError(field, f"named ports ({value!r}) are not supported: {named}")
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= 65535:
        raise PolicyError(field, f"{value!r} is not a port (1..65535)")
    return value


def _port_range(first: int, end: Any, field: str) -> tuple[int, int]:
    if end is None:
        return first, first
    if isinstance(end, bool) or not isinstance(end, int) or not first <= end <= 65535:
        raise PolicyError(field, f"endPort {end!r} must be a port no lower than port {first}")
    if not first:
        raise PolicyError(field, "endPort needs port")
    return first, end


# --- Kubernetes NetworkPolicy


def _np_peer(document: Any, field: str, namespace: str) -> Peer:
    peer = _mapping(document, field, {"podSelector", "namespaceSelector", "ipBlock"})
    if "ipBlock" in peer:
        if len(peer) > 1:
            raise PolicyError(field, "ipBlock stands alone: it cannot be combined with a selector")
        block = _mapping(peer["ipBlock"], f"{field}.ipBlock", {"cidr", "except"})
        if "cidr" not in block:
            raise PolicyError(f"{field}.ipBlock.cidr", "is required")
        cidr = _cidr(block["cidr"], f"{field}.ipBlock.cidr")
        listed = _list(block.get("except"), f"{field}.ipBlock.except")
        excepts = tuple(_cidr(e, f"{field}.ipBlock.except[{i}]") for i, e in enumerate(listed))
        for i, item in enumerate(excepts):
            if not ipaddress.ip_network(item).subnet_of(ipaddress.ip_network(cidr)):  # type: ignore[arg-type]
                raise PolicyError(f"{field}.ipBlock.except[{i}]", f"{item} is not inside {cidr}")
        return Peer(cidr=cidr, excepts=excepts, cidr_selects_pods=True)
    if not peer:
        raise PolicyError(field, "a peer needs podSelector, namespaceSelector or ipBlock")
    pods = LabelSelector.parse(peer["podSelector"], f"{field}.podSelector") if "podSelector" in peer else None
    if "namespaceSelector" in peer:
        namespaces = LabelSelector.parse(peer["namespaceSelector"], f"{field}.namespaceSelector")
        return Peer(endpoints=pods, namespaces=namespaces, local_only=not _names_cluster(pods))
    return Peer(endpoints=pods, namespace=namespace, local_only=not _names_cluster(pods))


def _names_cluster(selector: LabelSelector | None) -> bool:
    return selector is not None and selector.mentions(CLUSTER_LABEL)


def _np_ports(documents: Any, field: str) -> tuple[PortRange, ...]:
    ports = []
    for i, item in enumerate(_list(documents, field)):
        path = f"{field}[{i}]"
        port = _mapping(item, path, {"protocol", "port", "endPort"})
        protocol = port.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            raise PolicyError(f"{path}.protocol", f"{protocol!r} must be TCP, UDP or SCTP")
        if "port" not in port or port["port"] is None:
            if "endPort" in port:
                raise PolicyError(f"{path}.endPort", "endPort needs port")
            ports.append(PortRange(PROTOCOLS[protocol]))
            continue
        first = _port_number(port["port"], f"{path}.port", named="give the port's number")
        if not first:
            raise PolicyError(f"{path}.port", "0 is not a port (1..65535)")
        low, high = _port_range(first, port.get("endPort"), f"{path}.endPort")
        ports.append(PortRange(PROTOCOLS[protocol], low, high))
    return tuple(ports)


def _network_policy(obj: dict[str, Any], name: str, namespace: str) -> Policy:
    spec = _mapping(obj.get("spec"), "spec", {"podSelector", "policyTypes", "ingress", "egress"})
    if "podSelector" not in spec:
        raise PolicyError("spec.podSelector", "is required ({} selects every pod of the namespace)")
    subject = LabelSelector.parse(spec["podSelector"], "spec.podSelector")
    types = _list(spec.get("policyTypes"), "spec.policyTypes")
    for i, value in enumerate(types):
        if value not in ("Ingress", "Egress"):
            raise PolicyError(f"spec.policyTypes[{i}]", f"{value!r} must be Ingress or Egress")
    if not types:
        types = ["Ingress", *(["Egress"] if "egress" in spec else [])]
    enforces = frozenset(INGRESS if value == "Ingress" else EGRESS for value in types)
    rules: list[Rule] = []
    for key, direction, peers_key in (("ingress", INGRESS, "from"), ("egress", EGRESS, "to")):
        for i, item in enumerate(_list(spec.get(key), f"spec.{key}")):
            path = f"spec.{key}[{i}]"
            rule = _mapping(item, path, {peers_key, "ports"})
            listed = _list(rule.get(peers_key), f"{path}.{peers_key}")
            peers = [_np_peer(p, f"{path}.{peers_key}[{j}]", namespace) for j, p in enumerate(listed)]
            rules.append(Rule(direction, False, tuple(peers) or None, _np_ports(rule.get("ports"), f"{path}.ports")))
    return Policy("NetworkPolicy", namespace, name, subject, enforces, tuple(rules))


# --- Cilium's policies


_INGRESS_FIELDS = {"fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet", "toPorts", "icmps"}
_EGRESS_FIELDS = {"toEndpoints", "toEntities", "toCIDR", "toCIDRSet", "toPorts", "icmps"}
_UNSUPPORTED = {
    "fromRequires": "fromRequires is deprecated in Cilium and not supported",
    "toRequires": "toRequires is deprecated in Cilium and not supported",
    "fromGroups": "cloud groups are not supported",
    "toGroups": "cloud groups are not supported",
    "fromNodes": "node selectors are not supported",
    "toNodes": "node selectors are not supported",
    "toServices": "service selectors are not supported (select the backends' labels)",
    "toFQDNs": "DNS-based rules are not supported",
    "authentication": "mutual authentication is not supported",
}


def _cilium_ports(rule: dict[str, Any], field: str) -> tuple[PortRange, ...]:
    ports: list[PortRange] = []
    for i, item in enumerate(_list(rule.get("toPorts"), f"{field}.toPorts")):
        path = f"{field}.toPorts[{i}]"
        block = _mapping(item, path, {"ports", "rules", "serverNames", "listener", "originatingTLS",
                                      "terminatingTLS"})  # fmt: skip
        for unsupported in ("rules", "serverNames", "listener", "originatingTLS", "terminatingTLS"):
            if block.get(unsupported):
                raise PolicyError(f"{path}.{unsupported}", "L7 rules are not supported (only L3/L4)")
        listed = _list(block.get("ports"), f"{path}.ports")
        if not listed:
            raise PolicyError(f"{path}.ports", "needs at least one port")
        for j, entry in enumerate(listed):
            where = f"{path}.ports[{j}]"
            port = _mapping(entry, where, {"port", "endPort", "protocol"})
            protocol = port.get("protocol", "ANY")
            if protocol not in (*PROTOCOLS, "ANY"):
                raise PolicyError(f"{where}.protocol", f"{protocol!r} must be TCP, UDP, SCTP or ANY")
            number = _port_number(port.get("port", 0), f"{where}.port", named="give the port's number")
            low, high = _port_range(number, port.get("endPort"), f"{where}.endPort") if number else (0, 0)
            if protocol == "ANY" and number:
                ports.extend(PortRange(p, low, high) for p in (TCP, UDP, SCTP))
            else:
                ports.append(PortRange(PROTOCOLS.get(protocol, 0), low, high))
    for i, item in enumerate(_list(rule.get("icmps"), f"{field}.icmps")):
        path = f"{field}.icmps[{i}]"
        block = _mapping(item, path, {"fields"})
        for j, entry in enumerate(_list(block.get("fields"), f"{path}.fields")):
            where = f"{path}.fields[{j}]"
            icmp = _mapping(entry, where, {"type", "family"})
            if icmp.get("family", "IPv4") != "IPv4":
                raise PolicyError(f"{where}.family", "only IPv4 ICMP is enforced")
            kind = icmp.get("type")
            icmp_type: Any = ICMP_TYPES.get(kind) if isinstance(kind, str) else kind
            if isinstance(icmp_type, bool) or not isinstance(icmp_type, int) or not 0 <= icmp_type <= 255:
                raise PolicyError(
                    f"{where}.type", f"{kind!r} is not an ICMP type (a number, or {', '.join(ICMP_TYPES)})"
                )
            ports.append(PortRange(ICMP, icmp_type, icmp_type))
    return tuple(ports)


def _cilium_peers(rule: dict[str, Any], field: str, direction: int, namespace: str | None) -> list[Peer]:
    prefix = "from" if direction == INGRESS else "to"
    peers: list[Peer] = []
    for i, item in enumerate(_list(rule.get(f"{prefix}Endpoints"), f"{field}.{prefix}Endpoints")):
        selector = LabelSelector.parse(item, f"{field}.{prefix}Endpoints[{i}]")
        pinned = namespace if namespace is not None and not selector.mentions(NAMESPACE_LABEL) else None
        peers.append(Peer(endpoints=selector, namespace=pinned, local_only=not selector.mentions(CLUSTER_LABEL)))
    for i, entity in enumerate(_list(rule.get(f"{prefix}Entities"), f"{field}.{prefix}Entities")):
        if entity not in ENTITIES:
            raise PolicyError(f"{field}.{prefix}Entities[{i}]", f"{entity!r} is not an entity ({', '.join(ENTITIES)})")
        peers.append(Peer(entity=entity))
    for i, cidr in enumerate(_list(rule.get(f"{prefix}CIDR"), f"{field}.{prefix}CIDR")):
        peers.append(Peer(cidr=_cidr(cidr, f"{field}.{prefix}CIDR[{i}]")))
    for i, item in enumerate(_list(rule.get(f"{prefix}CIDRSet"), f"{field}.{prefix}CIDRSet")):
        path = f"{field}.{prefix}CIDRSet[{i}]"
        block = _mapping(item, path, {"cidr", "except", "cidrGroupRef"})
        if "cidrGroupRef" in block:
            raise PolicyError(f"{path}.cidrGroupRef", "CIDR groups are not supported")
        if "cidr" not in block:
            raise PolicyError(f"{path}.cidr", "is required")
        cidr = _cidr(block["cidr"], f"{path}.cidr")
        listed = _list(block.get("except"), f"{path}.except")
        excepts = tuple(_cidr(e, f"{path}.except[{j}]") for j, e in enumerate(listed))
        peers.append(Peer(cidr=cidr, excepts=excepts))
    return peers


def _cilium_rules(spec: dict[str, Any], field: str, namespace: str | None) -> tuple[list[Rule], set[int]]:
    rules: list[Rule] = []
    enforces: set[int] = set()
    for key, direction, deny in (("ingress", INGRESS, False), ("ingressDeny", INGRESS, True),
                                 ("egress", EGRESS, False), ("egressDeny", EGRESS, True)):  # fmt: skip
        items = _list(spec.get(key), f"{field}.{key}")
        if items:
            enforces.add(direction)
        allowed = _INGRESS_FIELDS if direction == INGRESS else _EGRESS_FIELDS
        for i, item in enumerate(items):
            path = f"{field}.{key}[{i}]"
            if isinstance(item, dict):
                for unsupported, why in _UNSUPPORTED.items():
                    if unsupported in item:
                        raise PolicyError(f"{path}.{unsupported}", why)
            rule = _mapping(item, path, allowed)
            peers = _cilium_peers(rule, path, direction, namespace)
            ports = _cilium_ports(rule, path)
            if not peers and not ports:
                continue  # an empty rule: it enforces the direction, and allows nothing
            rules.append(Rule(direction, deny, tuple(peers) or None, ports))
    default_deny = _mapping(spec.get("enableDefaultDeny"), f"{field}.enableDefaultDeny", {"ingress", "egress"})
    for key, direction in (("ingress", INGRESS), ("egress", EGRESS)):
        value: Any = default_deny.get(key)
        if value is False:
            enforces.discard(direction)
        elif value is True:
            enforces.add(direction)
        elif value is not None:
            raise PolicyError(f"{field}.enableDefaultDeny.{key}", "must be true or false")
    return rules, enforces


def _cilium_policies(obj: dict[str, Any], kind: str, name: str, namespace: str | None) -> list[Policy]:
    """One Policy per spec (a Cilium policy may hold several, in `specs`); they share the name."""
    specs: list[tuple[str, Any]] = []
    if obj.get("spec") is not None:
        specs.append(("spec", obj["spec"]))
    specs += [(f"specs[{i}]", s) for i, s in enumerate(_list(obj.get("specs"), "specs"))]
    if not specs:
        raise PolicyError("spec", f"a {kind} needs spec (or specs)")
    policies = []
    fields = {"endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress", "egressDeny", "description",
              "labels", "enableDefaultDeny"}  # fmt: skip
    for field, document in specs:
        spec = _mapping(document, field, fields)
        if "nodeSelector" in spec:
            raise PolicyError(f"{field}.nodeSelector", "host policies (nodeSelector) are not supported")
        if "endpointSelector" not in spec:
            raise PolicyError(f"{field}.endpointSelector", "is required ({} selects every endpoint)")
        subject = LabelSelector.parse(spec["endpointSelector"], f"{field}.endpointSelector")
        rules, enforces = _cilium_rules(spec, field, namespace)
        policies.append(Policy(kind, namespace, name, subject, frozenset(enforces), tuple(rules)))
    return policies


def parse_policy(obj: Any) -> list[Policy]:
    """The policies of a NetworkPolicy, CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object; `PolicyError`
    naming the field if it cannot be enforced as written."""
    if not isinstance(obj, dict):
        raise PolicyError("", "a policy must be a mapping")
    kind = obj.get("kind")
    metadata: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    name = str(metadata.get("name", ""))
    namespace = str(metadata.get("namespace") or "default")
    if kind == "NetworkPolicy":
        return [_network_policy(obj, name, namespace)]
    if kind == "CiliumNetworkPolicy":
        return _cilium_policies(obj, kind, name, namespace)
    if kind == "CiliumClusterwideNetworkPolicy":
        return _cilium_policies(obj, kind, name, None)
    raise PolicyError("kind", f"{kind!r} is not a policy kind")
