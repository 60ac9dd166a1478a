"""The agent's local API, on a unix socket (nothing on the network): status, and endpoints for the CNI plugin.

GET    /v1/status                    the AgentStatus as JSON; ?wait=SECONDS waits until ready (or the time is up)
GET    /v1/view                      counts and keys of the merged view (for debugging)
POST   /v1/endpoints                 {"namespace", "name", "labels", "ipv4", "ipv6"} -> the CiliumEndpoint
DELETE /v1/endpoints/<ns>/<name>
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

from agent.datapath.ipam import IPAMExhausted
from agent.datapath.netlink import DatapathError
from agent.datapath.pods import PodNetwork
from agent.endpoints import EndpointManager, EndpointRequest, InvalidRequest
from agent.mesh import Mesh
from clustermesh.daemon.http import Request, Response, Route, json_response
from clustermesh.resources.store import ResourceError

__all__ = ["routes"]


def routes(
    mesh: Mesh,
    endpoints: Callable[[], EndpointManager | None],
    *,
    pods: PodNetwork | None = None,
    supernets: list[str] | None = None,
    datapath: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Route]:
    async def status(request: Request) -> Response:
        wait = request.query.get("wait")
        if wait:
            try:
                seconds = min(float(wait), 3600.0)
            except ValueError:
                return json_response(400, {"error": f"wait={wait!r} is not a number of seconds"})
            await mesh.wait_ready(seconds)
        document = msgspec.to_builtins(mesh.status())
        if datapath is not None:
            document["datapath"] = datapath()
        return json_response(200, document)

    async def view(request: Request) -> Response:
        return json_response(
            200,
            {
                "nodes": sorted(mesh.view.nodes),
                "ipcache": sorted(mesh.view.ipcache_keys()),
                "identities": sorted(mesh.view.identities),
                "services": {
                    key: {
                        "affinity": svc.affinity,
                        "frontends": sorted(svc.frontends),
                        "backends": [f"{b.cluster}/{b.ip}" for b in svc.backends],
                    }
                    for key, svc in sorted(mesh.view.services.items())
                },
                "conflicts": {key: sorted(clusters) for key, clusters in mesh.view.conflicts.items()},
            },
        )

    async def create_endpoint(request: Request) -> Response:
        manager = endpoints()
        if manager is None:
            return json_response(503, {"error": "the agent is still starting: no ResourceStore yet"})
        try:
            wanted = EndpointRequest.parse(request.json())
            created = await manager.create(wanted)
        except (InvalidRequest, json.JSONDecodeError) as exc:
            return json_response(400, {"error": str(exc)})
        except ResourceError as exc:
            return json_response(exc.code, {"error": str(exc)})
        return json_response(201, created)

    async def delete_endpoint(request: Request) -> Response:
        manager = endpoints()
        if manager is None:
            return json_response(503, {"error": "the agent is still starting"})
        parts = request.path.removeprefix("/v1/endpoints/").split("/")
        if len(parts) != 2 or not all(parts):
            return json_response(400, {"error": "use DELETE /v1/endpoints/<namespace>/<name>"})
        try:
            found = await manager.delete(parts[0], parts[1])
        except ResourceError as exc:
            return json_response(exc.code, {"error": str(exc)})
        return json_response(200 if found else 404, {"deleted": found})

    def _pod_request(request: Request) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict) or not body.get("containerID"):
            raise InvalidRequest("containerID is required")
        return body

    async def cni_add(request: Request) -> Response:
        manager = endpoints()
        if pods is None:
            return json_response(503, {"error": "this agent runs without a datapath (--datapath none)"})
        if manager is None:
            return json_response(503, {"error": "the agent is still starting: no ResourceStore yet"})
        try:
            body = _pod_request(request)
            if not body.get("netns"):
                raise InvalidRequest("netns is required for ADD")
            attachment = await pods.add(body["containerID"], body["netns"], body.get("ifname") or "eth0")
            try:
                wanted = EndpointRequest.parse({"namespace": body.get("namespace"), "name": body.get("name"),
                                                "labels": body.get("labels") or {}, "ipv4": attachment.ip})  # fmt: skip
                created = await manager.create(wanted)
            except BaseException:
                await pods.delete(body["containerID"])
                raise
        except (InvalidRequest, json.JSONDecodeError) as exc:
            return json_response(400, {"error": str(exc)})
        except ResourceError as exc:
            return json_response(exc.code, {"error": str(exc)})
        except (DatapathError, IPAMExhausted, OSError) as exc:
            return json_response(500, {"error": f"datapath: {exc}"})
        return json_response(
            200,
            {
                "interfaces": [{"name": attachment.interface, "mac": attachment.mac, "sandbox": body["netns"]}],
                "ips": [{"address": f"{attachment.ip}/32", "gateway": attachment.gateway, "interface": 0}],
                "routes": [{"dst": supernet, "gw": attachment.gateway} for supernet in supernets or []],
                "dns": {},
                "identity": created["status"]["identity"]["id"],
            },
        )

    async def cni_del(request: Request) -> Response:
        manager = endpoints()
        if pods is None or manager is None:
            return json_response(503, {"error": "the agent is not ready for pods"})
        try:
            body = _pod_request(request)
            if body.get("name"):
                await manager.delete(str(body.get("namespace") or "default"), str(body["name"]))
            released = await pods.delete(body["containerID"])
        except (InvalidRequest, json.JSONDecodeError) as exc:
            return json_response(400, {"error": str(exc)})
        except ResourceError as exc:
            return json_response(exc.code, {"error": str(exc)})
        except DatapathError as exc:
            return json_response(500, {"error": f"datapath: {exc}"})
        return json_response(200, {"released": released})

    async def cni_check(request: Request) -> Response:
        if pods is None:
            return json_response(503, {"error": "this agent runs without a datapath"})
        try:
            body = _pod_request(request)
            problems = await pods.check(body["containerID"], body.get("netns", ""), body.get("ifname") or "eth0")
        except (InvalidRequest, json.JSONDecodeError) as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(200 if not problems else 409, {"problems": problems})

    return {
        "POST /v1/cni/add": cni_add,
        "POST /v1/cni/del": cni_del,
        "POST /v1/cni/check": cni_check,
        "/v1/status": status,
        "/v1/view": view,
        "POST /v1/endpoints": create_endpoint,
        "DELETE /v1/endpoints/*": delete_endpoint,
    }
