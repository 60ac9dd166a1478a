"""The agent's local API, on a unix socket (nothing on the network): status, and endpoints for the CNI plugin.

GET    /v1/status                    the AgentStatus (`clustermesh.model.api`); ?wait=SECONDS waits until ready
GET    /v1/view                      counts and keys of the merged view (for debugging)
POST   /v1/endpoints                 {"namespace", "name", "labels", "ipv4", "ipv6"} -> the CiliumEndpoint
DELETE /v1/endpoints/<ns>/<name>
POST   /v1/cni/add|del|check         a PodRequest -> the CNI result, or an error
POST   /v1/cni/exec                  ?command=&containerid=&netns=&ifname=&args=&config=: the CNI request as the shell
                                     plugin of nodes without Python hands it over -> the CNI result or error document
GET    /v1/flows                     ?since=N&last=N&wait=S: the flows numbered after N (Hubble's shape)
GET    /v1/policy                    per local endpoint: its compiled rules and the policies they came from
GET    /v1/services                  the load balancer's frontends and backends

The flow service (`--hubble-listen-address`, mutual TLS with the mesh's CA) serves `/v1/flows` and `/v1/peers` (every
node of every cluster in the merged view, with its flow service's address) to relays.

Every error is an `ApiError` document with a reason code: `starting` (the agent's store is not there yet: retry),
`no-datapath`, `invalid`, `not-found`, `conflict`, `unavailable` (retry), `exhausted`, `datapath`, `internal`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from agent import cni
from agent.datapath.ipam import IPAMExhausted
from agent.datapath.netlink import DatapathError
from agent.datapath.pods import PodAttachment, PodNetwork, host_veth
from agent.endpoints import EndpointManager, EndpointRequest, InvalidRequest
from agent.enforcement import CIDR_IDENTITY_BASE, Enforcer, LocalEndpoint
from agent.flows import FlowLog
from agent.health import HealthProber
from agent.identities import IdentityAllocator
from agent.mesh import Mesh
from agent.metrics import AgentMetrics
from agent.services import LoadBalancer
from clustermesh.daemon.http import Request, Response, Route
from clustermesh.daemon.tls import hubble_server_name
from clustermesh.model.api import ApiError, DatapathStatus, PodRequest, Problem
from clustermesh.resources.store import Conflict, NotFound, ResourceError, Unavailable

__all__ = ["flows_route", "peers_route", "routes"]

_ENCODER = msgspec.json.Encoder()
_POD_REQUEST = msgspec.json.Decoder(PodRequest)
_API_ERROR = msgspec.json.Decoder(ApiError)

log = logging.getLogger(__name__)


def respond(status: int, document: Any) -> Response:
    return status, "application/json", _ENCODER.encode(document) + b"\n"


def fail(status: int, reason: str, message: str) -> Response:
    return respond(status, ApiError(message, reason))


def counted(routes: dict[str, Route], metrics: AgentMetrics) -> dict[str, Route]:
    """Every route, with each error it answers counted by route and reason (and logged: the caller may be a CNI
    plugin whose stdout nobody reads)."""

    def count(pattern: str, route: Route) -> Route:
        async def answer(request: Request) -> Response:
            response = await route(request)
            status, _, body = response
            if status >= 400:
                try:
                    reason = _API_ERROR.decode(body).reason
                except (msgspec.DecodeError, msgspec.ValidationError):
                    reason = "internal"
                metrics.api_errors.labels(pattern, reason).inc()
                log.warning("%s %s: %d %s", request.method, request.path, status, body.decode(errors="replace").strip())
            return response

        return answer

    return {pattern: count(pattern, route) for pattern, route in routes.items()}


def _store_error(exc: ResourceError) -> Response:
    reason = (
        "not-found"
        if isinstance(exc, NotFound)
        else "conflict"
        if isinstance(exc, Conflict)
        else "unavailable"
        if isinstance(exc, Unavailable)
        else "invalid"
        if exc.code == 422
        else "internal"
    )
    return fail(exc.code, reason, str(exc))


def _cni_error(status: int, code: int, message: str, details: str = "") -> Response:
    return respond(status, {"cniVersion": "1.0.0", "code": code, "msg": message, "details": details})


def local_endpoint(
    attachment: PodAttachment, identity: int, wanted: EndpointRequest, allocator: IdentityAllocator | None
) -> LocalEndpoint:
    """A new pod as enforcement knows it: its veth, its address, its identity and that identity's labels."""
    security = allocator.security_labels(wanted.labels, wanted.namespace) if allocator is not None else {}
    labels = {key.partition(":")[2]: value for key, value in security.items()}
    return LocalEndpoint(attachment.host_ifindex, attachment.host_interface, attachment.ip, identity, labels,
                         wanted.namespace, wanted.name, attachment.netns_cookie)  # fmt: skip


def _pod_request(request: Request) -> PodRequest:
    try:
        pod = _POD_REQUEST.decode(request.body or b"null")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRequest(f"not a pod request: {exc}") from None
    if not pod.containerID:
        raise InvalidRequest("containerID is required")
    return pod


def flows_route(flows: FlowLog | None) -> Route:
    """GET /v1/flows?since=N&last=N&wait=S: the flows numbered after N (on the local socket and the flow service)."""

    async def flow_list(request: Request) -> Response:
        if flows is None:
            return fail(503, "no-datapath", "this agent enforces no policy here: it has no flows to tell")
        try:
            after = int(request.query.get("since", "0"))
            last = int(request.query["last"]) if "last" in request.query else None
            wait = min(float(request.query.get("wait", "0")), 60.0)
        except ValueError:
            return fail(400, "invalid", "since and last are numbers, wait a number of seconds")
        if wait > 0:
            await flows.wait(after, wait)
        found = flows.since(after, last)
        next_ = found[-1][0] if found else max(after, flows.next - 1 if after == 0 else after)
        # newest: the node's own count, lower than a reader's `since` once the agent restarted and counts anew
        return respond(200, {"flows": [flow for _, flow in found], "next": next_, "newest": flows.next - 1})

    return flow_list


def peers_route(mesh: Mesh, port: int) -> Route:
    """GET /v1/peers: every node of every cluster this agent knows, with where its flow service listens (the same
    port on every node, as Hubble's peer service assumes) and the name its certificate carries."""

    async def peers(request: Request) -> Response:
        found = []
        for key, node in sorted(mesh.view.nodes.items()):
            cluster, _, name = key.partition("/")
            address = next((a.IP for a in node.IPAddresses or [] if a.Type == "InternalIP" and ":" not in a.IP), "")
            if address:
                found.append({"name": key, "cluster": cluster, "node": name, "address": f"{address}:{port}",
                              "tls_server_name": hubble_server_name(cluster, name)})  # fmt: skip
        return respond(200, {"peers": found})

    return peers


def routes(
    mesh: Mesh,
    endpoints: Callable[[], EndpointManager | None],
    *,
    pods: PodNetwork | None = None,
    supernets: list[str] | None = None,
    datapath: Callable[[], DatapathStatus] | None = None,
    enforcer: Callable[[], Enforcer | None] = lambda: None,
    flows: FlowLog | None = None,
    allocator: Callable[[], IdentityAllocator | None] = lambda: None,
    lb: Callable[[], LoadBalancer | None] = lambda: None,
    health: Callable[[], HealthProber | None] = lambda: None,
    pod_labels: Callable[[str, str], Awaitable[dict[str, str]]] | None = None,
) -> dict[str, Route]:
    def needs_manager(handler: Callable[[Request, EndpointManager], Awaitable[Response]]) -> Route:
        """The handler, once the agent's store is there; `starting` before (the caller retries)."""

        async def route(request: Request) -> Response:
            manager = endpoints()
            if manager is None:
                return fail(503, "starting", "the agent is still starting: its ResourceStore is not there yet")
            try:
                return await handler(request, manager)
            except InvalidRequest as exc:
                return fail(400, "invalid", str(exc))
            except ResourceError as exc:
                return _store_error(exc)

        return route

    def needs_pods(handler: Callable[[Request, EndpointManager, PodNetwork], Awaitable[Response]]) -> Route:
        async def with_pods(request: Request, manager: EndpointManager) -> Response:
            if pods is None:
                return fail(503, "no-datapath", "this agent runs without a datapath (--datapath none)")
            try:
                return await handler(request, manager, pods)
            except IPAMExhausted as exc:
                return fail(507, "exhausted", f"datapath: {exc}")
            except (DatapathError, OSError) as exc:
                return fail(500, "datapath", f"datapath: {exc}")

        return needs_manager(with_pods)

    async def status(request: Request) -> Response:
        wait = request.query.get("wait")
        if wait:
            try:
                seconds = min(float(wait), 3600.0)
            except ValueError:
                return fail(400, "invalid", f"wait={wait!r} is not a number of seconds")
            await mesh.wait_ready(seconds)
        document = mesh.status()
        prober = health()
        if prober is not None:
            for cluster in document.clusters:
                if cluster.local and not any(h.cluster == cluster.name for h in prober.nodes.values()):
                    continue
                cluster.health = prober.cluster(cluster.name)
                unreachable, probing = cluster.health["unreachable"], cluster.health["probing"]
                if unreachable or probing:  # the data path decides, whatever the control plane says
                    code = "datapath-unreachable" if unreachable else "datapath-probing"
                    message = f"cluster {cluster.name}: " + (
                        f"nodes unreachable through the data path: {', '.join(unreachable)}"
                        if unreachable
                        else f"probing {', '.join(probing)} through the data path"
                    )
                    cluster.ready = False
                    cluster.not_ready.append(message)
                    cluster.problems.append(Problem(code, message))
                    document.problems.append(Problem(code, message))
                    document.not_ready.append(message)
                    document.ready = False
        if datapath is not None:
            document.datapath = datapath()
            error = (document.datapath.details.get("policy") or {}).get("error")
            if error:  # policies this node should enforce are not: not ready
                document.problems.append(Problem("policy-unavailable", error))
                document.not_ready.append(error)
                document.ready = False
        return respond(200, document)

    async def view(request: Request) -> Response:
        return respond(
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

    async def create_endpoint(request: Request, manager: EndpointManager) -> Response:
        try:
            document = request.json()
        except ValueError as exc:
            raise InvalidRequest(f"the body is not JSON: {exc}") from None
        created = await manager.create(EndpointRequest.parse(document))
        return respond(201, created)

    async def delete_endpoint(request: Request, manager: EndpointManager) -> Response:
        parts = request.path.removeprefix("/v1/endpoints/").split("/")
        if len(parts) != 2 or not all(parts):
            raise InvalidRequest("use DELETE /v1/endpoints/<namespace>/<name>")
        found = await manager.delete(parts[0], parts[1])
        return respond(200 if found else 404, {"deleted": found})

    async def cni_add(request: Request, manager: EndpointManager, pods: PodNetwork) -> Response:
        pod = _pod_request(request)
        if not pod.netns:
            raise InvalidRequest("netns is required for ADD")
        labels = dict(pod.labels)
        if not labels and pod_labels is not None:  # Kubernetes tells a plugin no labels: the Pod object has them
            labels = await pod_labels(pod.namespace or "default", pod.name)
        attachment = await pods.add(pod.containerID, pod.netns, pod.ifname or "eth0")
        enforcing = enforcer()
        try:
            wanted = EndpointRequest.parse(
                {"namespace": pod.namespace, "name": pod.name, "labels": labels, "ipv4": attachment.ip}
            )
            created = await manager.create(wanted)
            identity = created["status"]["identity"]["id"]
            if enforcing is not None:  # its maps, then its programs: no packet passes unjudged
                await asyncio.to_thread(
                    enforcing.add_endpoint, local_endpoint(attachment, identity, wanted, allocator())
                )
        except BaseException:
            if enforcing is not None and attachment.host_ifindex:
                enforcing.remove_endpoint(attachment.host_ifindex)
            await pods.delete(pod.containerID)
            raise
        return respond(
            200,
            {
                "interfaces": [{"name": attachment.interface, "mac": attachment.mac, "sandbox": pod.netns}],
                "ips": [{"address": f"{attachment.ip}/32", "gateway": attachment.gateway, "interface": 0}],
                "routes": [{"dst": supernet, "gw": attachment.gateway} for supernet in supernets or []],
                "dns": {},
                "identity": identity,
            },
        )

    async def cni_del(request: Request, manager: EndpointManager, pods: PodNetwork) -> Response:
        pod = _pod_request(request)
        enforcing = enforcer()
        if enforcing is not None:
            gone = next((e for e in enforcing.endpoints.values() if e.ifname == host_veth(pod.containerID)), None)
            if gone is not None:
                enforcing.remove_endpoint(gone.ifindex)
        if pod.name:
            await manager.delete(pod.namespace or "default", pod.name)
        released = await pods.delete(pod.containerID)
        return respond(200, {"released": released})

    async def cni_check(request: Request, manager: EndpointManager, pods: PodNetwork) -> Response:
        pod = _pod_request(request)
        problems = await pods.check(pod.containerID, pod.netns, pod.ifname or "eth0")
        if problems:
            return fail(409, "conflict", "; ".join(problems))
        return respond(200, {"problems": []})

    handlers = {"ADD": cni_add, "DEL": cni_del, "CHECK": cni_check}

    def as_cni_errors(route: Route) -> Route:
        """The agent's own refusals (still starting, no datapath) as CNI error documents too."""

        async def cni_route(request: Request) -> Response:
            try:
                status, content_type, body = await route(request)
            except Exception as exc:
                log.exception("CNI %s failed", request.query.get("command", ""))
                return _cni_error(500, cni.AGENT_FAILED, f"the agent failed: {type(exc).__name__}: {exc}")
            document = json.loads(body or b"null") if status != 200 else None
            if isinstance(document, dict) and "code" not in document:
                refused = cni.refused(request.query.get("command", ""), status, document)
                return _cni_error(status, refused.code, str(refused), refused.details)
            return status, content_type, body

        return cni_route

    async def cni_exec(request: Request, manager: EndpointManager, pods: PodNetwork) -> Response:
        """The CNI request as the shell plugin of hosts without Python hands it over: the CNI_* variables and the
        configuration in the query; answers the CNI result, or a CNI error document (`code`, `msg`)."""
        command = request.query.get("command", "")
        try:
            config = json.loads(request.query.get("config") or "{}")
            if not isinstance(config, dict):
                raise cni.CNIError(cni.UNDECODABLE, "the network configuration is not a JSON object")
            env = {
                f"CNI_{key.upper()}": request.query.get(key, "") for key in ("containerid", "netns", "ifname", "args")
            }
            pod = cni.pod_request(config, env)
        except json.JSONDecodeError as exc:
            return _cni_error(400, cni.UNDECODABLE, f"the network configuration is not JSON: {exc}")
        except cni.CNIError as exc:
            return _cni_error(400, exc.code, str(exc), exc.details)
        version = str(config.get("cniVersion", "1.0.0"))
        if command == "VERSION":
            return respond(200, {"cniVersion": version, "supportedVersions": cni.SUPPORTED})
        handler = handlers.get(command)
        if handler is None:
            return _cni_error(400, cni.INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}")
        inner = Request("POST", f"/v1/cni/{command.lower()}", {}, json.dumps(pod).encode())
        status, _, body = await handler(inner, manager, pods)
        if status != 200:
            refused = cni.refused(command, status, json.loads(body or b"null"))
            return _cni_error(status, refused.code, str(refused), refused.details)
        if command != "ADD":
            return 200, "application/json", b""
        return respond(200, {"cniVersion": version, **json.loads(body)})

    flow_list = flows_route(flows)

    async def policy(request: Request) -> Response:
        enforcing = enforcer()
        if enforcing is None:
            return fail(503, "no-datapath", "this agent enforces no policy here")
        names = {number: sorted(str(label) for label in entry.labels) for number, entry in mesh.view.identities.items()}
        reserved = {1: ["reserved:host"], 2: ["reserved:world"], 4: ["reserved:health"], 6: ["reserved:remote-node"]}
        endpoints = []
        for endpoint in sorted(enforcing.endpoints.values(), key=lambda e: (e.namespace, e.name)):
            compiled = enforcing.compiled.get(endpoint.ifindex)
            rules = []
            for rule in compiled.rules if compiled is not None else []:
                peers = [{"identity": n, "labels": reserved.get(n) or names.get(n) or
                          (["cidr"] if n >= CIDR_IDENTITY_BASE else ["any"] if n == 0 else [])}
                         for n in rule.identities]  # fmt: skip
                rules.append({"policy": rule.policy, "direction": rule.direction, "verdict": rule.verdict,
                              "peers": rule.peers, "identities": peers, "ports": list(rule.ports)})  # fmt: skip
            endpoints.append({
                "namespace": endpoint.namespace, "name": endpoint.name, "ip": endpoint.ip, "interface": endpoint.ifname,
                "identity": endpoint.identity, "labels": sorted(f"k8s:{k}={v}" for k, v in endpoint.labels.items()),
                "enforced": {"ingress": bool(compiled and compiled.enforce_ingress),
                             "egress": bool(compiled and compiled.enforce_egress)},
                "policies": list(compiled.policies) if compiled is not None else [], "rules": rules,
            })  # fmt: skip
        return respond(200, {"node": enforcing.node, "endpoints": endpoints, "not_enforced": enforcing.not_enforced(),
                             "cidr_identities": dict(enforcing.cidr_identities),
                             "map_writes": dataclasses.asdict(enforcing.counts)})  # fmt: skip

    async def services(request: Request) -> Response:
        balancer = lb()
        if balancer is None:
            return fail(503, "no-datapath", "this agent load-balances no service here")
        enforcing = enforcer()
        node = enforcing.node if enforcing is not None else ""
        writes = dataclasses.asdict(balancer.counts)
        return respond(200, {"node": node, "frontends": balancer.describe(), "map_writes": writes})

    return counted({
        "/v1/flows": flow_list,
        "/v1/services": services,
        "/v1/policy": policy,
        "POST /v1/cni/add": needs_pods(cni_add),
        "POST /v1/cni/del": needs_pods(cni_del),
        "POST /v1/cni/check": needs_pods(cni_check),
        "POST /v1/cni/exec": as_cni_errors(needs_pods(cni_exec)),
        "/v1/status": status,
        "/v1/view": view,
        "POST /v1/endpoints": needs_manager(create_endpoint),
        "DELETE /v1/endpoints/*": needs_manager(delete_endpoint),
    }, mesh.metrics)  # fmt: skip
