"""The contracts between the mesh's processes: what the agent's local API answers, as msgspec types.

The agent encodes these, `clustermesh status`, the lab, the CNI plugin and the tests decode them: one definition,
so a field renamed on one side breaks the other at the type check, not at a user's terminal. Everything that says
why something is not well carries a short, stable `code` (for programs: scripts, the lab's retries, metrics) beside
its words (for people).

Codes of a cluster's problems (`Problem.code`):

- the cluster may not join as configured: `refused-name-clash`, `refused-id-clash`, `refused-max-connected-mismatch`,
  `refused-id-mismatch`, `refused-invalid-config`, `refused-no-cluster-config`;
- the etcd answers but refuses: `wrong-cluster` (it is another cluster's: its cluster-config is not readable with
  this name), `no-role` (it knows the user but grants it nothing: `clustermesh connect` did not run there),
  `unknown-user` (it knows no user of the client certificate's name);
- the connection failed, a kvstore error's reason: `unreachable`, `dns`, `unknown-authority`,
  `server-certificate-expired`, `server-name-mismatch`, `client-certificate-expired`, `client-certificate-rejected`,
  `bad-tls-files`, `plaintext`, `unavailable`; `connecting` before the first attempt ends;
- `heartbeat-stale`: nothing beat for longer than the heartbeat's maximum age;
- `waiting-canary`, `waiting-nodes`, `listing`: a prefix's initial sync is not complete in this session;
  `watch-ended`: its watch ended (the session is ending);
- `config-problem`: a file of the config directory is not used (a cluster the user meant to join is missing).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "AgentStatus",
    "ApiError",
    "ClusterStatus",
    "DatapathStatus",
    "PodRequest",
    "Problem",
    "decode_status",
]


class Problem(msgspec.Struct, frozen=True):
    """Why something is not ready: a stable code and the words a person reads."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class ClusterStatus(msgspec.Struct, kw_only=True):
    """What `clustermesh status` shows for one cluster of the mesh (the local one included)."""

    name: str
    local: bool = False
    configured: bool = True
    connected: bool = False
    ready: bool = False
    cluster_id: int | None = None
    refused: str | None = None
    #: Per prefix: is its initial sync complete in the current session?
    synced: dict[str, bool] = msgspec.field(default_factory=dict)
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    rejected_keys: list[tuple[str, str]] = msgspec.field(default_factory=list)
    reconnections: int = 0
    failures: int = 0
    #: The current failure (None once the cluster is ready again), its code and age in seconds.
    last_error: str | None = None
    last_error_reason: str | None = None
    last_error_age: float | None = None
    heartbeat_age: float | None = None
    #: Rotated certificate files the running session could not take up (it goes on with its own), and their code.
    credentials_error: str | None = None
    credentials_error_reason: str | None = None
    #: Rotations taken up by running sessions, with no reconnection.
    credential_reloads: int = 0
    not_ready: list[str] = msgspec.field(default_factory=list)
    #: The data path to this cluster's nodes as this node's health prober sees them (None without a datapath).
    health: dict[str, Any] | None = None
    problems: list[Problem] = msgspec.field(default_factory=list)


class DatapathStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How this node's datapath is doing: its driver, the peers it applied, and its last error."""

    driver: str = "none"
    peers: list[str] = msgspec.field(default_factory=list)
    applies: int = 0
    last_error: str | None = None
    #: What the driver tells of itself (interface, port, MTU, ...).
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class AgentStatus(msgspec.Struct, kw_only=True):
    """The answer of `GET /v1/status`: ready only when every configured cluster is, and no config problem is left."""

    cluster: str
    cluster_id: int
    node: str
    ready: bool
    not_ready: list[str]
    clusters: list[ClusterStatus]
    problems: list[Problem] = msgspec.field(default_factory=list)
    config_problems: dict[str, str] = msgspec.field(default_factory=dict)
    datapath: DatapathStatus | None = None

    def cluster_named(self, name: str) -> ClusterStatus | None:
        return next((c for c in self.clusters if c.name == name), None)


class ApiError(msgspec.Struct, frozen=True):
    """Every error the agent's API answers. `reason` is one of `starting` (retry soon), `no-datapath`, `invalid`,
    `not-found`, `conflict`, `unavailable` (retry), `exhausted` (no address left), `datapath`, `internal` (and the
    HTTP server's own `bad-request`, `no-route`)."""

    error: str
    reason: str = "internal"

    @property
    def retryable(self) -> bool:
        return self.reason in ("starting", "unavailable")


class PodRequest(msgspec.Struct, kw_only=True):
    """What the CNI plugin asks of the agent (`POST /v1/cni/add|del|check`)."""

    containerID: str
    netns: str = ""
    ifname: str = "eth0"
    namespace: str = "default"
    name: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)


_STATUS = msgspec.json.Decoder(AgentStatus)


def decode_status(data: bytes) -> AgentStatus:
    """An AgentStatus from the agent's JSON; `msgspec.DecodeError` / `ValidationError` if it is not one."""
    return _STATUS.decode(data)
