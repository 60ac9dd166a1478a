"""etcd users and roles of a cluster (DESIGN section 5), set up idempotently, and auth switched on.

With `--client-cert-auth`, etcd runs a request as the user named by the client certificate's CN, so each user
below has no password and exists only to carry roles:

    root           role root       everything (etcd requires it before auth can be enabled)
    admin-<c>      role root       everything: the cluster's apiserver, `clustermesh connect`
    agent-<c>      role agent-<c>  read `cilium/` and `registry/`; write its own kinds under `registry/`
    remote-<peer>  role remote     read `cilium/state/`, `cilium/cluster-config/<c>`, `cilium/synced/<c>/`
                                   and `cilium/.heartbeat`; nothing else

A remote can never write: its role grants READ only. Every step checks what exists first, so running the set-up
twice, or after a crash half-way, ends in the same state.
"""

from __future__ import annotations

from typing import Protocol

from clustermesh.model import keys

__all__ = ["UserAdmin", "agent_user", "ensure_cluster_users", "ensure_remote_user", "remote_user", "remove_remote_user"]

REMOTE_ROLE = "remote"
ROOT = "root"


class UserAdmin(Protocol):
    """The user-management part of `EtcdBackend`."""

    async def auth_enabled(self) -> bool | None: ...
    async def enable_auth(self) -> None: ...
    async def users(self) -> list[str]: ...
    async def roles(self) -> list[str]: ...
    async def add_user(self, name: str) -> None: ...
    async def delete_user(self, name: str) -> None: ...
    async def add_role(self, name: str) -> None: ...
    async def grant_role(self, user: str, role: str) -> None: ...
    async def grant_permission(self, role: str, key: str, *, prefix: bool, write: bool) -> None: ...


def admin_user(cluster: str) -> str:
    return f"admin-{cluster}"


def agent_user(cluster: str) -> str:
    return f"agent-{cluster}"


def remote_user(peer: str) -> str:
    return f"remote-{peer}"


async def _ensure_role(admin: UserAdmin, role: str, grants: list[tuple[str, bool, bool]], existing: list[str]) -> None:
    """Create `role` if missing and grant (key, prefix, write) permissions; granting twice is harmless in etcd."""
    if role not in existing:
        await admin.add_role(role)
        existing.append(role)
    for key, prefix, write in grants:
        await admin.grant_permission(role, key, prefix=prefix, write=write)


async def _ensure_user(admin: UserAdmin, user: str, role: str, existing: list[str]) -> None:
    if user not in existing:
        await admin.add_user(user)
        existing.append(user)
    await admin.grant_role(user, role)


def remote_grants(cluster: str) -> list[tuple[str, bool, bool]]:
    """What a remote cluster's agents may read in `cluster`'s etcd: (key, is prefix, write)."""
    return [
        (keys.state_key_prefix(), True, False),
        (keys.cluster_config_key(cluster), False, False),
        (keys.synced_key_prefix(cluster), True, False),
        (keys.HEARTBEAT_KEY, True, False),  # as a prefix, like Cilium: a reader lists and watches it
    ]


def agent_grants() -> list[tuple[str, bool, bool]]:
    grants = [(keys.CILIUM_PREFIX, True, False), (keys.registry_prefix(), True, False)]
    grants += [(keys.registry_kind_prefix(kind), True, True) for kind in keys.AGENT_WRITTEN_KINDS]
    return grants


async def ensure_cluster_users(admin: UserAdmin, cluster: str) -> None:
    """Create the cluster's users and roles and enable auth. Must run as `root` (or before auth is enabled)."""
    users = await admin.users()
    roles = await admin.roles()
    if ROOT not in roles:
        await admin.add_role(ROOT)  # etcd knows "root" as special but it must still be created
        roles.append(ROOT)
    await _ensure_user(admin, ROOT, ROOT, users)
    await _ensure_user(admin, admin_user(cluster), ROOT, users)
    await _ensure_role(admin, agent_user(cluster), agent_grants(), roles)
    await _ensure_user(admin, agent_user(cluster), agent_user(cluster), users)
    await _ensure_role(admin, REMOTE_ROLE, remote_grants(cluster), roles)
    if await admin.auth_enabled() is not True:
        await admin.enable_auth()  # enabling twice is accepted by etcd


async def ensure_remote_user(admin: UserAdmin, cluster: str, peer: str) -> str:
    """Create the read-only user through which `peer`'s agents read `cluster`'s etcd; return its name."""
    roles = await admin.roles()
    await _ensure_role(admin, REMOTE_ROLE, remote_grants(cluster), roles)
    user = remote_user(peer)
    await _ensure_user(admin, user, REMOTE_ROLE, await admin.users())
    return user


async def remove_remote_user(admin: UserAdmin, peer: str) -> bool:
    user = remote_user(peer)
    if user not in await admin.users():
        return False
    await admin.delete_user(user)
    return True
