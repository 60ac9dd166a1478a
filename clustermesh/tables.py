"""The columns `clustermesh get` shows for each kind (and the extra ones of `-o wide`)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from clustermesh.model.kinds import Kind, Object

__all__ = ["rows"]

Column = tuple[str, Callable[[Object], Any], bool]  # header, getter, wide only


def _meta(obj: Object) -> dict[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _age(obj: Object) -> str:
    created = _meta(obj).get("creationTimestamp")
    if not created:
        return "-"
    try:
        then = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _annotation(obj: Object, name: str, default: str) -> str:
    return str((_meta(obj).get("annotations") or {}).get(name, default))


def _ports(ports: Any) -> str:
    shown = []
    for port in ports or []:
        if isinstance(port, dict):
            name = f"{port['name']}:" if port.get("name") else ""
            shown.append(f"{name}{port.get('port')}/{port.get('protocol', 'TCP')}")
    return ",".join(shown)


def _addressing(obj: Object, family: str) -> str:
    networking = (obj.get("status") or {}).get("networking") or {}
    return ",".join(str(a[family]) for a in networking.get("addressing") or [] if a.get(family)) or "-"


COLUMNS: dict[str, list[Column]] = {
    "Namespace": [("GLOBAL", lambda o: _annotation(o, "clustermesh.cilium.io/global", "true"), False)],
    "Service": [
        ("CLUSTER-IP", lambda o: (o.get("spec") or {}).get("clusterIP", "-"), False),
        ("PORTS", lambda o: _ports((o.get("spec") or {}).get("ports")), False),
        ("GLOBAL", lambda o: _annotation(o, "service.cilium.io/global", "false"), False),
        ("SHARED", lambda o: _annotation(o, "service.cilium.io/shared", "-"), True),
        ("AFFINITY", lambda o: _annotation(o, "service.cilium.io/affinity", "-"), True),
        (
            "SELECTOR",
            lambda o: ",".join(f"{k}={v}" for k, v in ((o.get("spec") or {}).get("selector") or {}).items()),
            True,
        ),
    ],
    "EndpointSlice": [
        ("SERVICE", lambda o: (_meta(o).get("labels") or {}).get("kubernetes.io/service-name", "-"), False),
        ("ADDRESSTYPE", lambda o: o.get("addressType", "-"), False),
        ("ENDPOINTS", lambda o: ",".join(a for e in o.get("endpoints") or [] for a in e.get("addresses") or []), False),
        ("PORTS", lambda o: _ports(o.get("ports")), True),
    ],
    "CiliumNode": [
        (
            "INTERNAL-IP",
            lambda o: (
                ",".join(a["ip"] for a in (o.get("spec") or {}).get("addresses") or [] if a.get("type") == "InternalIP")
                or "-"
            ),
            False,
        ),
        ("POD-CIDRS", lambda o: ",".join(((o.get("spec") or {}).get("ipam") or {}).get("podCIDRs") or []), False),
        ("WIREGUARD-KEY", lambda o: _annotation(o, "network.cilium.io/wg-pub-key", "-"), True),
        ("BOOT-ID", lambda o: (o.get("spec") or {}).get("bootid", "-"), True),
    ],
    "CiliumEndpoint": [
        ("IDENTITY", lambda o: ((o.get("status") or {}).get("identity") or {}).get("id", "-"), False),
        ("IPV4", lambda o: _addressing(o, "ipv4"), False),
        ("IPV6", lambda o: _addressing(o, "ipv6"), True),
        ("NODE", lambda o: ((o.get("status") or {}).get("networking") or {}).get("node", "-"), False),
    ],
    "CiliumIdentity": [
        ("NAMESPACE", lambda o: (o.get("security-labels") or {}).get("k8s:io.kubernetes.pod.namespace", "-"), False),
        ("LABELS", lambda o: ",".join(f"{k}={v}" for k, v in (o.get("security-labels") or {}).items()), True),
    ],
    "ClusterMeshRemote": [
        ("CLUSTER-ID", lambda o: (o.get("spec") or {}).get("clusterID", "-"), False),
        ("ENDPOINTS", lambda o: ",".join((o.get("spec") or {}).get("endpoints") or []), False),
    ],
}


def rows(kind: Kind, objects: list[Object], *, wide: bool, namespaces: bool) -> tuple[list[str], list[list[str]]]:
    columns = [c for c in COLUMNS.get(kind.name, []) if wide or not c[2]]
    headers = (["NAMESPACE"] if kind.namespaced and namespaces else []) + ["NAME"] + [c[0] for c in columns] + ["AGE"]
    table = []
    for obj in sorted(objects, key=lambda o: (_meta(o).get("namespace") or "", _meta(o).get("name") or "")):
        row = [str(_meta(obj).get("namespace", ""))] if kind.namespaced and namespaces else []
        row.append(str(_meta(obj).get("name", "")))
        for _, getter, _wide in columns:
            try:
                row.append(str(getter(obj)))
            except (AttributeError, KeyError, TypeError):
                row.append("?")
        row.append(_age(obj))
        table.append(row)
    return headers, table
