"""`clustermesh-cni`: the CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION), a thin client of the node's agent.

The container runtime (kubelet, or the lab) runs it with the CNI_* environment and the network configuration on
stdin; it asks the agent, over its unix socket (`agentSocket` in the configuration), to attach the pod: the agent
makes the veth, the address and the routes, and the CiliumEndpoint with the identity of the pod's labels. The
answer is the CNI result on stdout; an error is a CNI error document on stdout and exit status 1, with a code that
tells a runtime whether to retry:

| code | when |
| --- | --- |
| 4 | a CNI_* variable is missing (spec: invalid environment variables) |
| 6 | the configuration on stdin is not JSON (spec: failed to decode content) |
| 7 | the configuration or the pod's arguments are invalid (spec: invalid network configuration) |
| 11 | try again later (spec): no agent answers, or it is still starting, or its store is unavailable |
| 100 | the agent failed to set up the pod's network (datapath) |
| 101 | no address left in this node's pod CIDR |
| 102 | CHECK found problems with the pod's network |
| 103 | the agent runs without a datapath (`--datapath none`) |
| 104 | the agent answered something this plugin does not understand, or failed otherwise |

Pod labels come from `args.labels` in the configuration, or `CNI_ARGS` `CLUSTERMESH_LABELS=app:web,tier:db`;
the pod's name and namespace from `K8S_POD_NAME` and `K8S_POD_NAMESPACE` in `CNI_ARGS`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import msgspec

from clustermesh.daemon import client
from clustermesh.model.api import ApiError

__all__ = ["CNIError", "REASON_CODES", "SUPPORTED", "main", "pod_request", "refused"]

SUPPORTED = ["0.4.0", "1.0.0"]
DEFAULT_SOCKET = "/run/clustermesh/agent.sock"


INVALID_ENVIRONMENT = 4
UNDECODABLE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
DATAPATH_FAILED = 100
NO_ADDRESS_LEFT = 101
CHECK_FAILED = 102
NO_DATAPATH = 103
AGENT_FAILED = 104

#: The agent's error reasons (`clustermesh.model.api.ApiError`) and the CNI code each becomes.
REASON_CODES = {
    "starting": TRY_AGAIN,
    "unavailable": TRY_AGAIN,
    "invalid": INVALID_CONFIG,
    "exhausted": NO_ADDRESS_LEFT,
    "datapath": DATAPATH_FAILED,
    "conflict": CHECK_FAILED,
    "no-datapath": NO_DATAPATH,
}


class CNIError(Exception):
    def __init__(self, code: int, message: str, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _cni_args(env: Mapping[str, str]) -> dict[str, str]:
    args = {}
    for part in env.get("CNI_ARGS", "").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            args[key] = value
    return args


def _labels(config: dict[str, Any], args: dict[str, str]) -> dict[str, str]:
    """The pod's labels: `args.labels` of the configuration, overridden by `CLUSTERMESH_LABELS` of CNI_ARGS."""
    conf_args = config.get("args")
    if conf_args is None:
        conf_args = {}
    if not isinstance(conf_args, dict):
        raise CNIError(INVALID_CONFIG, f"the configuration's args must be an object, not {type(conf_args).__name__}")
    conf_labels = conf_args.get("labels") or {}
    if not isinstance(conf_labels, dict) or not all(isinstance(v, str) for v in conf_labels.values()):
        raise CNIError(INVALID_CONFIG, "the configuration's args.labels must map names to strings")
    labels = {str(key): value for key, value in conf_labels.items()}
    for pair in filter(None, args.get("CLUSTERMESH_LABELS", "").split(",")):
        key, _, value = pair.partition(":")
        labels[key] = value
    return labels


async def _call(socket: str, path: str, body: Any) -> tuple[int, Any]:
    """POST to the agent; (status, decoded JSON). Only answers that are not JSON at all are errors here."""
    try:
        answer = await client.request(socket, "POST", path, body, connect_timeout=10, timeout=60)
    except client.SocketUnreachable as exc:
        raise CNIError(TRY_AGAIN, f"no agent answers at {socket}", str(exc)) from None
    except client.BadAnswer as exc:
        raise CNIError(AGENT_FAILED, f"the agent at {socket} gave an answer that is not HTTP", str(exc)) from None
    try:
        return answer.status, json.loads(answer.body or b"null")
    except ValueError:
        raise CNIError(AGENT_FAILED, f"the agent at {socket} gave an answer that is not JSON",
                       answer.body[:200].decode(errors="replace")) from None  # fmt: skip


def refused(command: str, status: int, answer: Any) -> CNIError:
    """The agent's error as a CNI error, with the code of its reason (11 for what may pass: retry)."""
    try:
        error = msgspec.convert(answer, ApiError)
    except msgspec.ValidationError:
        return CNIError(AGENT_FAILED, f"the agent refused {command} ({status})", json.dumps(answer)[:200])
    code = REASON_CODES.get(error.reason, TRY_AGAIN if status in (502, 503, 504) else AGENT_FAILED)
    return CNIError(code, f"the agent refused {command}: {error.error}", error.reason)


def pod_request(config: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """What the agent is asked, from the CNI environment and configuration: the plugin and the agent's
    `/v1/cni/exec` (the plugin of hosts without Python) build it alike. Raises CNIError."""
    args = _cni_args(env)
    container = env.get("CNI_CONTAINERID", "")
    if not container:
        raise CNIError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set",
                       "the runtime must set CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME")  # fmt: skip
    return {
        "containerID": container,
        "netns": env.get("CNI_NETNS", ""),
        "ifname": env.get("CNI_IFNAME", "") or "eth0",
        "namespace": args.get("K8S_POD_NAMESPACE", "default"),
        "name": args.get("K8S_POD_NAME", "") or container[:40].lower(),
        "labels": _labels(config, args),
    }


def run(command: str, config: dict[str, Any]) -> dict[str, Any] | None:
    version = str(config.get("cniVersion", "1.0.0"))
    if command == "VERSION":
        return {"cniVersion": version, "supportedVersions": SUPPORTED}
    socket = str(config.get("agentSocket") or DEFAULT_SOCKET)
    request = pod_request(config, os.environ)
    if command == "ADD":
        if not request["netns"]:
            raise CNIError(INVALID_ENVIRONMENT, "CNI_NETNS is not set")
        status, answer = asyncio.run(_call(socket, "/v1/cni/add", request))
        if status != 200:
            raise refused("ADD", status, answer)
        if not isinstance(answer, dict):
            raise CNIError(AGENT_FAILED, "the agent answered ADD without a result object", repr(answer)[:200])
        return {"cniVersion": version, **answer}
    if command == "DEL":
        status, answer = asyncio.run(_call(socket, "/v1/cni/del", request))
        if status != 200:
            raise refused("DEL", status, answer)
        return None
    if command == "CHECK":
        status, answer = asyncio.run(_call(socket, "/v1/cni/check", request))
        if status != 200:
            raise refused("CHECK", status, answer)
        return None
    raise CNIError(
        INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}; this plugin knows ADD, DEL, CHECK and VERSION"
    )


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    result: dict[str, Any] | None = None
    error: CNIError | None = None
    try:
        raw = sys.stdin.read() if command != "VERSION" or not sys.stdin.isatty() else "{}"
        config = json.loads(raw or "{}")
        if not isinstance(config, dict):
            raise CNIError(UNDECODABLE, "the network configuration on stdin is not a JSON object")
        result = run(command, config)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        error = CNIError(UNDECODABLE, f"the network configuration on stdin is not JSON: {exc}")
    except CNIError as exc:
        error = exc
    if error is not None:
        json.dump({"cniVersion": "1.0.0", "code": error.code, "msg": str(error), "details": error.details}, sys.stdout)
        sys.stdout.write("\n")
        raise SystemExit(1)
    if result is not None:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main()
