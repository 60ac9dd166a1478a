"""Contexts: named ways to reach a cluster's etcd, kept in one config file (like a kubeconfig).

    current-context: c1
    contexts:
      c1:
        endpoints: [https://127.0.0.1:2379]
        ca: /path/ca.crt
        cert: /path/admin-c1.crt
        key: /path/admin-c1.key
      c2:                                   # a cluster whose resources live in Kubernetes
        endpoints: [https://10.0.0.2:2379]  # its etcd all the same: remote users are etcd users
        ca: ...
        source: kubernetes
        kubeconfig: /path/kubeconfig        # optional: the default kubeconfig (or in-cluster)
        kube-context: c2                    # optional

`source` says where the cluster's ResourceStore is (as the cluster's apiserver and agents are told with their
`--source`): `standalone` (the default: `registry/` of the same etcd) or `kubernetes`. Commands that write objects
(`apply`, `delete`, `connect`) write them there, so the cluster's agents see them whatever their source.
The file is `--config FILE`, else `$CLUSTERMESH_CONFIG`, else `~/.config/clustermesh/config.yaml`. It is written
atomically (mode 0600: it points at private keys). Relative paths are kept as given and resolved against the
file's folder when used. A broken file gives an error that names the file and what is wrong, and is never
overwritten by a later `context add`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from certs.files import write_atomic
from clustermesh.resources.opening import open_resource_store
from clustermesh.resources.store import ResourceStore
from kvstore.backend import Backend
from kvstore.config import EtcdConfig

__all__ = ["SOURCES", "Context", "ContextError", "ContextFile", "default_config_path"]


class ContextError(Exception):
    """A problem with the config file or a context; the message says what to do."""


def default_config_path() -> Path:
    env = os.environ.get("CLUSTERMESH_CONFIG")
    if env:
        return Path(env)
    return Path.home() / ".config" / "clustermesh" / "config.yaml"


SOURCES = ("standalone", "kubernetes")


@dataclass
class Context:
    name: str
    endpoints: list[str]
    ca: str
    cert: str
    key: str
    source: str = "standalone"
    kubeconfig: str | None = None
    kube_context: str | None = None
    #: The unix socket of the cluster's flow relay (`clustermesh observe --context` reads it).
    relay: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ContextError(f"context {self.name}: source {self.source!r} must be one of {', '.join(SOURCES)}")

    def etcd_config(self, base: Path) -> EtcdConfig:
        def resolve(value: str) -> Path:
            path = Path(value).expanduser()
            return path if path.is_absolute() else base / path

        return EtcdConfig(self.endpoints, resolve(self.ca), resolve(self.cert), resolve(self.key))

    def open_store(self, backend: Backend) -> ResourceStore:
        """The cluster's ResourceStore, by this context's source (close it when done)."""
        return open_resource_store(self.source, backend, self.kubeconfig, self.kube_context)

    def as_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"endpoints": self.endpoints, "ca": self.ca, "cert": self.cert, "key": self.key}
        if self.source != "standalone":
            document["source"] = self.source
        if self.kubeconfig:
            document["kubeconfig"] = self.kubeconfig
        if self.kube_context:
            document["kube-context"] = self.kube_context
        if self.relay:
            document["relay"] = self.relay
        return document


@dataclass
class ContextFile:
    path: Path
    contexts: dict[str, Context] = field(default_factory=dict)
    current: str | None = None

    @classmethod
    def load(cls, path: Path) -> ContextFile:
        if not path.exists():
            return cls(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ContextError(f"{path}: not valid YAML ({exc}); fix or remove the file") from None
        except OSError as exc:
            raise ContextError(f"{path}: cannot read: {exc.strerror}") from None
        if not isinstance(data, dict):
            raise ContextError(f"{path}: expected a mapping with 'contexts'")
        contexts: dict[str, Context] = {}
        for name, entry in (data.get("contexts") or {}).items():
            if not isinstance(entry, dict):
                raise ContextError(f"{path}: context {name!r} must be a mapping")
            missing = [f for f in ("endpoints", "ca", "cert", "key") if not entry.get(f)]
            if missing:
                raise ContextError(f"{path}: context {name!r} lacks {', '.join(missing)}")
            endpoints = entry["endpoints"]
            optional = {field: entry.get(key) for field, key in (("kubeconfig", "kubeconfig"),
                                                                 ("kube_context", "kube-context"),
                                                                 ("relay", "relay"))}  # fmt: skip
            contexts[str(name)] = Context(
                str(name),
                [endpoints] if isinstance(endpoints, str) else [str(e) for e in endpoints],
                str(entry["ca"]),
                str(entry["cert"]),
                str(entry["key"]),
                source=str(entry.get("source") or "standalone"),
                **{field: str(value) if value else None for field, value in optional.items()},
            )
        current = data.get("current-context")
        return cls(path, contexts, str(current) if current else None)

    def save(self) -> None:
        data: dict[str, Any] = {"contexts": {name: c.as_dict() for name, c in sorted(self.contexts.items())}}
        if self.current:
            data["current-context"] = self.current
        write_atomic(self.path, yaml.safe_dump(data, sort_keys=False).encode(), mode=0o600)

    def add(self, context: Context) -> None:
        self.contexts[context.name] = context
        if self.current is None:
            self.current = context.name

    def get(self, name: str | None) -> Context:
        chosen = name or self.current
        if chosen is None:
            raise ContextError(
                f"no context given and none is current in {self.path}: add one with "
                "`clustermesh context add NAME --endpoints URL --ca CA --cert CERT --key KEY`"
            )
        try:
            return self.contexts[chosen]
        except KeyError:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ContextError(f"no context {chosen!r} in {self.path} (known: {known})") from None
