"""`clustermesh-cni`: the CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION), a thin client of the node's agent.

The container runtime (kubelet, or the lab) runs it with the CNI_* environment and the network configuration on
stdin; it asks the agent, over its unix socket (`agentSocket` in the configuration), to attach the pod: the agent
makes the veth, the address and the routes, and the CiliumEndpoint with the identity of the pod's labels. The
answer is the CNI result on stdout; an error is a CNI error document on stdout and exit status 1.

Pod labels come from `args.labels` in the configuration, or `CNI_ARGS` `CLUSTERMESH_LABELS=app:web,tier:db`;
the pod's name and namespace from `K8S_POD_NAME` and `K8S_POD_NAMESPACE` in `CNI_ARGS`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

__all__ = ["main"]

SUPPORTED = ["0.4.0", "1.0.0"]
DEFAULT_SOCKET = "/run/clustermesh/agent.sock"


class CNIError(Exception):
    def __init__(self, code: int, message: str, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _cni_args() -> dict[str, str]:
    args = {}
    for part in os.environ.get("CNI_ARGS", "").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            args[key] = value
    return args


def _labels(config: dict[str, Any], args: dict[str, str]) -> dict[str, str]:
    labels = dict((config.get("args") or {}).get("labels") or {})
    for pair in filter(None, args.get("CLUSTERMESH_LABELS", "").split(",")):
        key, _, value = pair.partition(":")
        labels[key] = value
    return labels


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise CNIError(
            4, f"{name} is not set", "the runtime must set CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"
        )
    return value


async def _call(socket: str, method: str, path: str, body: Any) -> tuple[int, Any]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket), 10)
    except (OSError, TimeoutError) as exc:
        raise CNIError(11, f"no agent answers at {socket}", str(exc)) from None
    payload = json.dumps(body).encode()
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    try:
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 60)
    except (OSError, TimeoutError) as exc:
        raise CNIError(11, f"the agent at {socket} did not answer {method} {path}", str(exc)) from None
    finally:
        writer.close()
    head, _, content = data.partition(b"\r\n\r\n")
    try:
        return int(head.split()[1]), json.loads(content or b"null")
    except (IndexError, ValueError):
        answer = data[:200].decode(errors="replace")
        raise CNIError(11, f"the agent at {socket} gave an answer that is not JSON", answer) from None


def run(command: str, config: dict[str, Any]) -> dict[str, Any] | None:
    version = str(config.get("cniVersion", "1.0.0"))
    if command == "VERSION":
        return {"cniVersion": version, "supportedVersions": SUPPORTED}
    socket = str(config.get("agentSocket") or DEFAULT_SOCKET)
    args = _cni_args()
    request = {
        "containerID": _env("CNI_CONTAINERID"),
        "netns": os.environ.get("CNI_NETNS", ""),
        "ifname": os.environ.get("CNI_IFNAME", "eth0"),
        "namespace": args.get("K8S_POD_NAMESPACE", "default"),
        "name": args.get("K8S_POD_NAME", "") or _env("CNI_CONTAINERID")[:40].lower(),
        "labels": _labels(config, args),
    }
    if command == "ADD":
        if not request["netns"]:
            raise CNIError(4, "CNI_NETNS is not set")
        status, answer = asyncio.run(_call(socket, "POST", "/v1/cni/add", request))
        if status != 200:
            raise CNIError(11, f"the agent refused ADD: {answer.get('error') if isinstance(answer, dict) else answer}")
        if not isinstance(answer, dict):
            raise CNIError(11, "the agent answered ADD without a result object", repr(answer)[:200])
        return {"cniVersion": version, **answer}
    if command == "DEL":
        status, answer = asyncio.run(_call(socket, "POST", "/v1/cni/del", request))
        if status != 200:
            raise CNIError(11, f"the agent refused DEL: {answer}")
        return None
    if command == "CHECK":
        status, answer = asyncio.run(_call(socket, "POST", "/v1/cni/check", request))
        if status != 200:
            problems = "; ".join(answer.get("problems", [])) if isinstance(answer, dict) else str(answer)
            raise CNIError(11, f"CHECK failed: {problems}")
        return None
    raise CNIError(4, f"unknown CNI_COMMAND {command!r}; this plugin knows ADD, DEL, CHECK and VERSION")


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    result: dict[str, Any] | None = None
    error: CNIError | None = None
    try:
        raw = sys.stdin.read() if command != "VERSION" or not sys.stdin.isatty() else "{}"
        config = json.loads(raw or "{}")
        if not isinstance(config, dict):
            raise CNIError(6, "the network configuration on stdin is not a JSON object")
        result = run(command, config)
    except json.JSONDecodeError as exc:
        error = CNIError(6, f"the network configuration on stdin is not JSON: {exc}")
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
