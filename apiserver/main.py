"""`clustermesh-apiserver`: the command that runs one cluster's apiserver.

    clustermesh-apiserver --cluster-name NAME --cluster-id ID --source standalone \\
        --kvstore-endpoints URL --kvstore-ca CA --kvstore-cert CERT --kvstore-key KEY \\
        --health-address HOST:PORT --metrics-address HOST:PORT

/healthz and /readyz answer from the first moment (not ready, with the reason, while etcd cannot be reached);
a port of 0 picks a free one, and the address is logged. SIGTERM and SIGINT stop it cleanly, leaving its keys in
place for the next run to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import click
from prometheus_client import CollectorRegistry, Counter

from apiserver.server import Apiserver, ApiserverConfig, readyz_answer
from clustermesh.daemon.http import HttpEndpoint, Response, metrics_route, parse_address, text_route
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import ModelError
from clustermesh.resources.opening import open_resource_store
from clustermesh.resources.store import ResourceStore
from kvstore import errors, etcd
from kvstore.backend import Backend
from kvstore.config import EtcdConfig
from kvstore.leases import DEFAULT_TTL
from kvstore.reconnecting import connect_until_up

__all__ = ["main"]

log = logging.getLogger("clustermesh.apiserver")


class Phase:
    """What /readyz says before the apiserver itself exists."""

    def __init__(self) -> None:
        self.apiserver: Apiserver | None = None
        self.reason = "starting"

    def readyz(self) -> Response:
        if self.apiserver is not None:
            return self.apiserver.readyz()
        return readyz_answer([self.reason])


async def run(options: dict[str, Any]) -> None:
    cluster: ClusterInfo = options["cluster"]
    registry = CollectorRegistry()
    failures = Counter(
        "apiserver_kvstore_connect_failures",
        "Failed attempts to connect to the cluster's etcd, by reason",
        ["reason"],
        namespace="clustermesh",
        registry=registry,
    )
    phase = Phase()
    health = HttpEndpoint(*options["health"])
    health.routes = {"/healthz": text_route(lambda: (200, "text/plain", b"ok\n")), "/readyz": text_route(phase.readyz)}
    metrics = HttpEndpoint(*options["metrics"])
    metrics.routes = {"/metrics": metrics_route(registry)}
    await health.start()
    await metrics.start()
    log.info("health endpoint listening on http://%s (/healthz, /readyz)", health.address)
    log.info("metrics endpoint listening on http://%s/metrics", metrics.address)
    backend: Backend | None = None
    resources: ResourceStore | None = None
    try:
        phase.reason = "connecting to etcd"
        config: EtcdConfig = options["etcd"]

        def failed(exc: errors.KVStoreError) -> None:
            phase.reason = f"cannot connect to etcd at {config.describe()}: {exc}"
            failures.labels(exc.reason).inc()
            log.warning("%s", phase.reason)

        backend = await connect_until_up(lambda: etcd.connect(config), on_failure=failed)
        log.info("connected to etcd at %s", options["etcd"].describe())
        resources = open_resource_store(options["source"], backend, options["kubeconfig"], options["kube_context"])
        apiserver = Apiserver(
            ApiserverConfig(cluster, lease_ttl=options["lease_ttl"]), backend, resources, registry=registry
        )
        phase.apiserver = apiserver
        log.info("publishing cluster %s (ID %d) from the %s store", cluster.name, cluster.id, options["source"])
        await apiserver.run()
    finally:
        await health.stop()
        await metrics.stop()
        if resources is not None:
            await resources.close()  # a Kubernetes store's watch threads and connection pool
        if backend is not None:
            await backend.close()


async def run_until_signalled(options: dict[str, Any]) -> None:
    task = asyncio.create_task(run(options))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("stopped; the published keys stay on their leases for the next run to take over")


def _address(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--cluster-name", required=True, help="This cluster's name (lower-case, digits, '-'; at most 32).")
@click.option("--cluster-id", required=True, type=int, help="This cluster's ID, unique in the mesh (1..255).")
@click.option("--max-connected-clusters", default=255, show_default=True, type=click.Choice(["255", "511"]))
@click.option(
    "--source",
    type=click.Choice(["standalone", "kubernetes"]),
    default="standalone",
    show_default=True,
    help="Where the cluster's resources live: the registry/ prefix of its etcd, or a Kubernetes API server.",
)
@click.option("--kubeconfig", default=None, help="With --source kubernetes: the kubeconfig (default: in-cluster).")
@click.option("--kube-context", default=None, help="With --source kubernetes: the kubeconfig context.")
@click.option("--kvstore-endpoints", required=True, multiple=True, help="etcd URL(s), https://HOST:PORT.")
@click.option("--kvstore-ca", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore-cert", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore-key", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--health-address", default="127.0.0.1:0", show_default=True, callback=_address)
@click.option("--metrics-address", default="127.0.0.1:0", show_default=True, callback=_address)
@click.option("--lease-ttl", default=DEFAULT_TTL, show_default=True, help="Seconds published keys outlive us.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def main(**params: Any) -> None:
    """Publish one cluster's nodes, endpoints, identities and global services into its etcd, in Cilium's format."""
    logging.basicConfig(level=params["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cluster = ClusterInfo(params["cluster_name"], params["cluster_id"], int(params["max_connected_clusters"]))
        endpoints = [url for value in params["kvstore_endpoints"] for url in value.split(",") if url]
        config = EtcdConfig(endpoints, params["kvstore_ca"], params["kvstore_cert"], params["kvstore_key"])
    except (ModelError, errors.KVStoreError) as exc:
        raise click.UsageError(str(exc)) from None
    options = {
        "cluster": cluster,
        "etcd": config,
        "source": params["source"],
        "kubeconfig": params["kubeconfig"],
        "kube_context": params["kube_context"],
        "health": params["health_address"],
        "metrics": params["metrics_address"],
        "lease_ttl": params["lease_ttl"],
    }
    asyncio.run(run_until_signalled(options))
