"""The clustermesh config directory: one file per remote cluster, in Cilium's format, watched for changes.

A file counts when it is a regular file (or a symlink to one, as Kubernetes mounts secrets) whose name is a valid
cluster name and whose content mentions `endpoints:` (Cilium's rule: certificate and key files live beside the
configs in the same folder). Its name is the cluster's name. The folder is scanned every `interval` seconds and
each file fingerprinted by its content and the content of the CA, certificate and key files it names: a file added,
changed or removed, or a certificate rotated in place, is reported as such, so the agent connects, reconnects or
disconnects that cluster without a restart. A file that cannot be read, or is not UTF-8 text, is reported once with
the reason and skipped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clustermesh.model.clusters import validate_cluster_name
from clustermesh.model.errors import ModelError
from kvstore.config import load_config_file
from kvstore.errors import KVStoreError

__all__ = ["ConfigDir", "ConfigEvent", "files_fingerprint", "fingerprint"]

log = logging.getLogger(__name__)


def fingerprint(path: Path, content: bytes) -> str:
    """The config file's content and the content of the TLS files it names: a certificate rotated in place (the
    config file untouched, as cert-manager or a Secret update does it) changes the fingerprint."""
    digest = hashlib.sha256(content)
    try:
        config = load_config_file(path)
    except KVStoreError:
        return digest.hexdigest()  # the session says what is wrong with it
    for tls_file in (config.ca_file, config.cert_file, config.key_file):
        try:
            digest.update(tls_file.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc.strerror}".encode())
    return digest.hexdigest()


def files_fingerprint(*paths: Path) -> str:
    """The content of some files (the local etcd's TLS files): what changes when they are rotated."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc.strerror}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ConfigEvent:
    action: str  # added, changed, removed
    name: str
    path: Path


@dataclass
class ConfigDir:
    path: Path
    on_event: Callable[[ConfigEvent], None]
    ignore: set[str] = field(default_factory=set)  # e.g. the local cluster's name
    _seen: dict[str, str] = field(default_factory=dict)  # name -> content digest
    problems: dict[str, str] = field(default_factory=dict)  # file name -> why it is not used

    def scan(self) -> list[ConfigEvent]:
        """Compare the folder with the last scan; report and return the differences."""
        found: dict[str, str] = {}
        problems: dict[str, str] = {}
        try:
            entries = sorted(self.path.iterdir()) if self.path.is_dir() else []
        except OSError as exc:
            log.warning("cannot list %s: %s", self.path, exc)
            entries = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            try:
                content = entry.read_bytes()
            except OSError as exc:
                problems[entry.name] = f"cannot read: {exc.strerror}"
                continue
            if b"endpoints:" not in content:
                continue  # a certificate, a key, or something else that lives here
            try:
                content.decode()
            except UnicodeDecodeError as exc:
                problems[entry.name] = f"not UTF-8 text (byte {exc.start}): not a clustermesh config"
                continue
            try:
                validate_cluster_name(entry.name)
            except ModelError as exc:
                problems[entry.name] = str(exc)
                continue
            if entry.name in self.ignore:
                problems[entry.name] = (
                    "named after the local cluster: a cluster is not its own peer; name it after the peer it is for"
                )
                continue
            found[entry.name] = fingerprint(entry, content)
        for name, reason in problems.items():
            if self.problems.get(name) != reason:
                log.warning("clustermesh config %s/%s not used: %s", self.path, name, reason)
        self.problems = problems
        events = [ConfigEvent("removed", n, self.path / n) for n in sorted(self._seen.keys() - found.keys())]
        for name, digest in sorted(found.items()):
            if name not in self._seen:
                events.append(ConfigEvent("added", name, self.path / name))
            elif self._seen[name] != digest:
                events.append(ConfigEvent("changed", name, self.path / name))
        self._seen = found
        for event in events:
            log.info("clustermesh config: %s %s", event.name, event.action)
            self.on_event(event)
        return events
