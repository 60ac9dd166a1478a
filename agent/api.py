"""The agent's local API, on a unix socket (nothing on the network): status, and endpoints for the CNI plugin.

GET    /v1/status                    the AgentStatus as JSON; ?wait=SECONDS waits until ready (or the time is up)
GET    /v1/view                      counts and keys of the merged view (for debugging)
POST   /v1/endpoints                 {"namespace", "name", "labels", "ipv4", "ipv6"} -> the CiliumEndpoint
DELETE /v1/endpoints/<ns>/<name>
"""

from __future__ import annotations

import json
from collections.abc import Callable

import msgspec

from agent.endpoints import EndpointManager, EndpointRequest, InvalidRequest
from agent.mesh import Mesh
from daemon.http import Request, Response, Route, json_response
from resources.store import ResourceError

__all__ = ["routes"]


def routes(mesh: Mesh, endpoints: Callable[[], EndpointManager | None]) -> dict[str, Route]:
    async def status(request: Request) -> Response:
        wait = request.query.get("wait")
        if wait:
            try:
                seconds = min(float(wait), 3600.0)
            except ValueError:
                return json_response(400, {"error": f"wait={wait!r} is not a number of seconds"})
            await mesh.wait_ready(seconds)
        return 200, "application/json", msgspec.json.encode(mesh.status()) + b"\n"

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

    return {
        "/v1/status": status,
        "/v1/view": view,
        "POST /v1/endpoints": create_endpoint,
        "DELETE /v1/endpoints/*": delete_endpoint,
    }
