"""Rendering the cluster's ClusterMeshRemote objects into the agent's clustermesh config directory.

`clustermesh connect` stores, in each cluster's ResourceStore, one ClusterMeshRemote per peer: its endpoints, the CA
to trust and the client certificate and key of the read-only user `remote-<this cluster>` on the peer's etcd. Every
agent of the cluster turns those into the files Cilium's agents read (one config file per peer, named after it, and
its three PEM files beside it), so a hand-written config directory and a connected one are read the same way.

Files are written atomically, PEM files first and the config last (so the directory watcher never sees a config
whose certificates are missing), and removed config first. Only files this renderer made are ever removed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import yaml

from certs.files import write_atomic
from clustermesh.model.clusters import validate_cluster_name
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import Kind, Object

__all__ = ["RemoteRenderer"]

log = logging.getLogger(__name__)

SUFFIXES = {"ca": ".etcd-client-ca.crt", "cert": ".etcd-client.crt", "key": ".etcd-client.key"}


class RemoteRenderer:
    """An informer handler for ClusterMeshRemote objects."""

    def __init__(self, directory: Path, *, local_cluster: str) -> None:
        self.directory = directory
        self.local_cluster = local_cluster
        self.rendered: set[str] = set()

    def on_upsert(self, kind: Kind, obj: Object) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        try:
            validate_cluster_name(name)
        except ModelError as exc:
            log.warning("ClusterMeshRemote %r not rendered: %s", name, exc)
            return
        if name == self.local_cluster:
            log.warning("ClusterMeshRemote %s names the local cluster: not rendered", name)
            return
        spec = obj.get("spec") or {}
        paths = {field: self.directory / f"{name}{suffix}" for field, suffix in SUFFIXES.items()}
        for field, path in paths.items():
            write_atomic(path, str(spec.get(field, "")).encode(), mode=0o600 if field == "key" else 0o644)
        config = {
            "endpoints": list(spec.get("endpoints") or []),
            "trusted-ca-file": str(paths["ca"]),
            "cert-file": str(paths["cert"]),
            "key-file": str(paths["key"]),
        }
        write_atomic(self.directory / name, yaml.safe_dump(config, sort_keys=False).encode(), mode=0o644)
        self.rendered.add(name)

    def prune(self, existing: set[str]) -> list[str]:
        """After the first list: remove rendered files of peers that no longer exist (deleted while we were down)."""
        removed = []
        for cert in self.directory.glob(f"*{SUFFIXES['cert']}") if self.directory.is_dir() else []:
            name = cert.name[: -len(SUFFIXES["cert"])]
            if name not in existing:
                self._remove(name)
                removed.append(name)
        return removed

    def _remove(self, name: str) -> None:
        for path in [self.directory / name, *(self.directory / f"{name}{s}" for s in SUFFIXES.values())]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.rendered.discard(name)

    def on_delete(self, kind: Kind, obj: Object) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        if name in self.rendered or (self.directory / f"{name}{SUFFIXES['cert']}").exists():
            self._remove(name)
