"""Every error of the agent's local API is a typed document with a reason code, counted and logged: its caller may
be a CNI plugin whose output nobody reads."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from agent.api import counted, fail, respond
from agent.metrics import AgentMetrics
from clustermesh.daemon.http import Request, Response
from clustermesh.model.api import ApiError


async def starting(request: Request) -> Response:
    return fail(503, "starting", "the agent is still starting")


async def fine(request: Request) -> Response:
    return respond(200, {"ok": True})


async def plain(request: Request) -> Response:
    return 500, "text/plain", b"boom\n"


async def test_errors_are_counted_by_route_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    routes = counted({"POST /v1/cni/add": starting, "/v1/status": fine, "/v1/view": plain}, AgentMetrics(registry))
    request = Request("POST", "/v1/cni/add", {}, b"{}")
    status, _, body = await routes["POST /v1/cni/add"](request)
    assert status == 503
    assert msgspec.json.decode(body, type=ApiError) == ApiError("the agent is still starting", "starting")
    await routes["POST /v1/cni/add"](request)
    await routes["/v1/status"](Request("GET", "/v1/status", {}, b""))
    await routes["/v1/view"](Request("GET", "/v1/view", {}, b""))
    sample = registry.get_sample_value
    assert sample("clustermesh_api_errors_total", {"route": "POST /v1/cni/add", "reason": "starting"}) == 2
    assert sample("clustermesh_api_errors_total", {"route": "/v1/view", "reason": "internal"}) == 1
    assert sample("clustermesh_api_errors_total", {"route": "/v1/status", "reason": "internal"}) is None
    assert "POST /v1/cni/add: 503" in caplog.text and "still starting" in caplog.text
