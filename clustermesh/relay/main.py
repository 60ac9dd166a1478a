"""`clustermesh-relay`: follow the flow service of every node of every connected cluster (mutual TLS with the mesh's
CA), and serve the flows merged in time order on a unix socket, in the agent's shape.

GET /v1/flows   ?since=N&last=N&wait=S: as an agent's, plus `nodes` and `unreachable` (every node not read, why)
GET /v1/nodes   every node followed: its cluster, address, state, last error, flows read
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import click
from prometheus_client import CollectorRegistry

from clustermesh.daemon.http import HttpEndpoint, Request, Response, json_response, metrics_route, parse_address
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.daemon.tls import ReloadingContext, TlsFilesError, client_context
from clustermesh.relay.relay import Relay

__all__ = ["main"]

log = logging.getLogger("clustermesh.relay")


def routes(relay: Relay) -> dict[str, Any]:
    async def flows(request: Request) -> Response:
        try:
            after = int(request.query.get("since", "0"))
            last = int(request.query["last"]) if "last" in request.query else None
            wait = min(float(request.query.get("wait", "0")), 60.0)
        except ValueError:
            return json_response(400, {"error": "since and last are numbers, wait a number of seconds",
                                       "reason": "invalid"})  # fmt: skip
        if wait > 0:
            await relay.wait(after, wait)
        found = relay.since(after, last)
        next_ = max((number for number, _ in found), default=max(after, relay.next - 1 if after == 0 else after))
        return json_response(200, {"flows": [flow for _, flow in found], "next": next_, "newest": relay.next - 1,
                                   "nodes": relay.nodes(), "unreachable": relay.unreachable()})  # fmt: skip

    async def nodes(request: Request) -> Response:
        return json_response(200, {"nodes": relay.nodes(), "unreachable": relay.unreachable()})

    return {"/v1/flows": flows, "/v1/nodes": nodes}


async def _serve(relay: Relay, servers: list[HttpEndpoint]) -> None:
    for server in servers:
        await server.start()
        log.info("listening on %s", server.address if server.unix_path else f"http://{server.address}")
    task = asyncio.create_task(relay.run(), name="relay")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        await cancel_and_wait([task, waiter])
        for server in servers:
            await server.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--peer-service",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="An agent's unix socket: its merged view names every node of every connected cluster to follow.",
)
@click.option(
    "--tls-client-cert-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="(Hubble Relay's flag) The relay's client certificate, of the mesh's CA.",
)
@click.option("--tls-client-key-file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--tls-hubble-server-ca-files",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="(Hubble Relay's flag) The CA the nodes' flow services' certificates chain to (repeat for a bundle).",
)
@click.option(
    "--api-socket",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where readers (clustermesh observe --relay) ask for the merged flows.",
)
@click.option("--metrics-address", default=None, help="HOST:PORT for /metrics (port 0 picks one).")
@click.option("--refresh", default=5.0, show_default=True, help="Seconds between two asks of the peer service.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def main(**params: Any) -> None:
    """Run the relay: every node's flows, of every connected cluster, merged in time order."""
    logging.basicConfig(level=params["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cert, key = params["tls_client_cert_file"], params["tls_client_key_file"]
        cas = list(params["tls_hubble_server_ca_files"])
        tls = ReloadingContext(lambda: client_context(cert, key, cas), [cert, key, *cas])
        metrics = parse_address(params["metrics_address"]) if params["metrics_address"] else None
    except (TlsFilesError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    registry = CollectorRegistry()
    relay = Relay(params["peer_service"], tls, refresh=params["refresh"], registry=registry)
    servers = [HttpEndpoint(unix_path=params["api_socket"], routes=routes(relay))]
    if metrics is not None:
        servers.append(HttpEndpoint(metrics[0], metrics[1], routes={"/metrics": metrics_route(registry)}))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(relay, servers))
