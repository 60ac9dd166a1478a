"""`clustermesh connect` and `disconnect`: join two clusters, or part them, after checking that they can be joined.

Every check runs before anything is written, on either side:

- both etcds answer, with a user that may manage users (root or admin-<cluster>);
- each holds exactly one cluster-config (its apiserver runs); the names differ, the IDs differ, and both use the
  same `maxConnectedClusters`;
- the CAs: when the clusters' CAs differ, that is explained and refused unless `--allow-mismatching-ca`, which hands
  each side a bundle of both CAs (Cilium's behaviour); each side's CA key is at hand to issue the peer's certificate.

Then, for each direction A -> B: the read-only user `remote-A` on B's etcd (role `remote`), its client certificate
signed by B's CA, and a ClusterMeshRemote object named B in A's ResourceStore (B's endpoints, the CA to trust, the
certificate and key), from which A's agents render their config directory. The ResourceStore is the one the
context's `source` names (the standalone `registry/` of A's etcd, or A's Kubernetes API server): the one A's agents
read, whatever it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

import certs
from clustermesh.contexts import Context
from clustermesh.model import keys, wire
from clustermesh.model.errors import ModelError
from clustermesh.model.kinds import kind_by_name
from clustermesh.resources.store import NotFound, ResourceError, ResourceStore
from kvstore import errors, etcd, users
from kvstore.config import EtcdConfig

__all__ = ["ConnectError", "Side", "connect_clusters", "disconnect_clusters", "open_side"]

REMOTE_KIND = kind_by_name("ClusterMeshRemote")


class ConnectError(Exception):
    """A check failed; nothing was written. The message says what to do."""


@dataclass
class Side:
    context: Context
    config: EtcdConfig
    backend: etcd.EtcdBackend
    cluster: str
    cluster_config: wire.ClusterConfig
    ca_pem: bytes
    pki: certs.ClusterPKI | None
    store: ResourceStore

    async def close(self) -> None:
        await self.store.close()
        await self.backend.close()

    @property
    def endpoints(self) -> list[str]:
        return list(self.config.endpoints)

    def ca_fingerprint(self) -> bytes:
        return x509.load_pem_x509_certificates(self.ca_pem)[0].fingerprint(hashes.SHA256())


async def open_side(context: Context, base: Path, pki_dir: Path | None) -> Side:
    """Connect to one side and read what the checks need; raise ConnectError naming the context."""
    config = context.etcd_config(base)
    try:
        backend = await etcd.connect(config)
    except errors.KVStoreError as exc:
        raise ConnectError(f"context {context.name}: {exc}") from None
    try:
        listing = await backend.list_prefix(keys.cluster_configs_prefix())
        if len(listing.entries) != 1:
            found = ", ".join(e.key for e in listing.entries) or "none"
            raise ConnectError(
                f"context {context.name}: expected one cluster-config in its etcd, found {found}: "
                "is its clustermesh-apiserver running?"
            )
        entry = listing.entries[0]
        try:
            name = keys.parse_cluster_config_key(entry.key)
            cluster_config = wire.decode(wire.ClusterConfig, entry.key, entry.value)
        except ModelError as exc:
            raise ConnectError(f"context {context.name}: {exc}") from None
        try:
            await backend.users()
        except errors.PermissionDenied:
            raise ConnectError(
                f"context {context.name}: its user {backend.user!r} may not manage etcd users; use the cluster's "
                f"root or admin-{name} certificate"
            ) from None
        directory = pki_dir or config.ca_file.parent
        pki = certs.ClusterPKI(directory) if (directory / "ca.key").exists() else None
        try:
            store = context.open_store(backend)
        except ResourceError as exc:
            raise ConnectError(f"context {context.name}: its {context.source} store: {exc}") from None
        return Side(context, config, backend, name, cluster_config, config.ca_file.read_bytes(), pki, store)
    except BaseException:
        await backend.close()
        raise


def check(a: Side, b: Side, *, allow_mismatching_ca: bool) -> bytes | None:
    """Every check of a connection; the CA bundle to hand out when the CAs differ (and that is allowed)."""
    if a.cluster == b.cluster:
        raise ConnectError(f"both contexts reach cluster {a.cluster!r}: a cluster cannot be connected to itself")
    if a.cluster_config.id == b.cluster_config.id:
        raise ConnectError(
            f"cluster ID clash: {a.cluster} and {b.cluster} both have ID {a.cluster_config.id}; every cluster of a "
            "mesh needs its own ID (--cluster-id of its apiserver)"
        )
    max_a = a.cluster_config.capabilities.maxConnectedClusters or 255
    max_b = b.cluster_config.capabilities.maxConnectedClusters or 255
    if max_a != max_b:
        raise ConnectError(f"maxConnectedClusters differs: {a.cluster} has {max_a}, {b.cluster} has {max_b}")
    for side in (a, b):
        if side.pki is None:
            raise ConnectError(
                f"context {side.context.name}: no CA key (ca.key) beside {side.config.ca_file}: the peer's "
                f"certificate is signed with {side.cluster}'s CA; pass its PKI folder"
            )
    if a.ca_fingerprint() == b.ca_fingerprint():
        return None
    if not allow_mismatching_ca:
        raise ConnectError(
            f"the CAs of {a.cluster} and {b.cluster} differ: each cluster's agents would have to trust the other's "
            "CA as well as their own. Pass --allow-mismatching-ca to hand each side a bundle of both CAs, or give "
            "both clusters one CA (clustermesh certs create with a shared CA)"
        )
    return a.ca_pem.rstrip(b"\n") + b"\n" + b.ca_pem


async def _hand_over(src: Side, dst: Side, bundle: bytes | None) -> None:
    """Let `src`'s agents read `dst`: a remote user on dst, and a ClusterMeshRemote in src's store."""
    assert dst.pki is not None
    user = await users.ensure_remote_user(dst.backend, dst.cluster, src.cluster)
    paths = certs.issue_user(dst.pki, user)
    remote: dict[str, Any] = {
        "apiVersion": REMOTE_KIND.api_version,
        "kind": REMOTE_KIND.name,
        "metadata": {"name": dst.cluster},
        "spec": {
            "clusterID": dst.cluster_config.id,
            "endpoints": dst.endpoints,
            "ca": (bundle or dst.ca_pem).decode(),
            "cert": paths.cert.read_text(),
            "key": paths.key.read_text(),
        },
    }
    store = src.store
    current = await store.get(REMOTE_KIND, dst.cluster)
    if current is None:
        await store.create(remote)
    else:
        remote["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await store.update(remote)


async def connect_clusters(a: Side, b: Side, *, allow_mismatching_ca: bool) -> list[str]:
    bundle = check(a, b, allow_mismatching_ca=allow_mismatching_ca)
    await _hand_over(a, b, bundle)
    await _hand_over(b, a, bundle)
    return [
        f"{a.cluster} (ID {a.cluster_config.id}) can read {b.cluster} as remote-{a.cluster}",
        f"{b.cluster} (ID {b.cluster_config.id}) can read {a.cluster} as remote-{b.cluster}",
    ]


async def disconnect_clusters(a: Side, b: Side) -> list[str]:
    done = []
    for src, dst in ((a, b), (b, a)):
        with contextlib.suppress(NotFound):
            await src.store.delete(REMOTE_KIND, dst.cluster)
            done.append(f"{src.cluster} no longer reads {dst.cluster}")
        if await users.remove_remote_user(dst.backend, src.cluster):
            done.append(f"user remote-{src.cluster} removed from {dst.cluster}")
    return done
