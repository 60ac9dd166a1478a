"""`clustermesh-apiserver`: the command that runs one cluster's apiserver.

    clustermesh-apiserver --cluster-name NAME --cluster-id ID --source standalone \\
        --kvstore-endpoints URL --kvstore-ca CA --kvstore-cert CERT --kvstore-key KEY \\
        --health-address HOST:PORT --metrics-address HOST:PORT

Cilium's `clustermesh-apiserver clustermesh` flags that change what is published are accepted with their names and
meanings (`--clustermesh-default-global-namespace`, `--k8s-service-proxy-name`, `--kvstore-lease-ttl`,
`--kvstore-opt etcd.config=FILE`, ...), or refused with the reason when this apiserver does not do what they ask
(`--clustermesh-enable-mcs-api`, `--enable-external-workloads`, `--cluster-users-enabled`, ...): docs/apiserver.md.

/healthz and /readyz answer from the first moment (not ready, with the reason, while etcd cannot be reached);
a port of 0 picks a free one, and the address is logged. SIGTERM and SIGINT stop it cleanly, leaving its keys in
place for the next run to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from prometheus_client import CollectorRegistry, Counter

from apiserver.server import Apiserver, ApiserverConfig, readyz_answer
from clustermesh.daemon.http import HttpEndpoint, Response, metrics_route, parse_address, text_route
from clustermesh.daemon.tasks import cancel_and_wait
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.errors import ModelError
from clustermesh.model.serviceips import ServiceIPPool
from clustermesh.resources.opening import open_resource_store
from clustermesh.resources.store import ResourceStore
from kvstore import errors, etcd
from kvstore.backend import Backend
from kvstore.config import EtcdConfig, load_config_file
from kvstore.credentials import follow_credentials
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


@dataclass(frozen=True)
class ApiserverSettings:
    """Everything the command line decides, checked."""

    cluster: ClusterInfo
    etcd: EtcdConfig
    source: str = "standalone"
    kubeconfig: str | None = None
    kube_context: str | None = None
    health: tuple[str, int] = ("127.0.0.1", 0)
    metrics: tuple[str, int] = ("127.0.0.1", 0)
    lease_ttl: int = DEFAULT_TTL
    default_global_namespace: bool = True
    service_proxy_name: str = ""
    service_cidr: str | None = None


async def run(settings: ApiserverSettings) -> None:
    cluster = settings.cluster
    registry = CollectorRegistry()
    failures = Counter(
        "apiserver_kvstore_connect_failures",
        "Failed attempts to connect to the cluster's etcd, by reason",
        ["reason"],
        namespace="clustermesh",
        registry=registry,
    )
    reloads = Counter(
        "apiserver_tls_reloads",
        "Rotated etcd client certificate files taken up in place (ok) or not yet (failed)",
        ["result"],
        namespace="clustermesh",
        registry=registry,
    )
    phase = Phase()
    health = HttpEndpoint(*settings.health)
    health.routes = {"/healthz": text_route(lambda: (200, "text/plain", b"ok\n")), "/readyz": text_route(phase.readyz)}
    metrics = HttpEndpoint(*settings.metrics)
    metrics.routes = {"/metrics": metrics_route(registry)}
    await health.start()
    await metrics.start()
    log.info("health endpoint listening on http://%s (/healthz, /readyz)", health.address)
    log.info("metrics endpoint listening on http://%s/metrics", metrics.address)
    backend: Backend | None = None
    resources: ResourceStore | None = None
    try:
        phase.reason = "connecting to etcd"
        config = settings.etcd

        def failed(exc: errors.KVStoreError) -> None:
            phase.reason = f"cannot connect to etcd at {config.describe()}: {exc}"
            failures.labels(exc.reason).inc()
            log.warning("%s", phase.reason)

        backend = await connect_until_up(lambda: etcd.connect(config), on_failure=failed)
        log.info("connected to etcd at %s", config.describe())
        resources = open_resource_store(settings.source, backend, settings.kubeconfig, settings.kube_context)
        apiserver_config = ApiserverConfig(
            cluster,
            lease_ttl=settings.lease_ttl,
            default_global_namespace=settings.default_global_namespace,
            service_proxy_name=settings.service_proxy_name,
            service_cidr=settings.service_cidr,
        )
        apiserver = Apiserver(apiserver_config, backend, resources, registry=registry)
        phase.apiserver = apiserver
        log.info("publishing cluster %s (ID %d) from the %s store", cluster.name, cluster.id, settings.source)
        following = asyncio.create_task(
            follow_credentials(backend, what=f"etcd {config.describe()}", on_result=lambda r: reloads.labels(r).inc()),
            name="follow-credentials",
        )
        try:
            await apiserver.run()
        finally:
            await cancel_and_wait([following])
    finally:
        await health.stop()
        await metrics.stop()
        if resources is not None:
            await resources.close()  # a Kubernetes store's watch threads and connection pool
        if backend is not None:
            await backend.close()


async def run_until_signalled(settings: ApiserverSettings) -> None:
    task = asyncio.create_task(run(settings))
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


def _go_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A Go duration as Cilium's flags take it (`15m`, `15m0s`, `1h30m`, `900s`), in whole seconds."""
    if value is None:
        return None
    try:
        return parse_go_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_go_duration(text: str) -> int:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total, number, rest = 0.0, "", text.strip()
    if not rest:
        raise ValueError("an empty duration")
    while rest:
        match = re.match(r"(\d+(?:\.\d+)?)(ms|h|m|s)", rest)
        if match is None:
            raise ValueError(f"{text!r} is not a duration like 15m, 900s or 1h30m")
        number, unit = match.groups()
        total += float(number) * units[unit]
        rest = rest[match.end() :]
    return int(total)


def _kvstore_opts(values: tuple[str, ...]) -> dict[str, str]:
    """Cilium's `--kvstore-opt key=value` (repeatable, or comma-separated); only etcd.config is understood."""
    options: dict[str, str] = {}
    for value in values:
        for pair in filter(None, value.split(",")):
            key, sep, item = pair.partition("=")
            if not sep:
                raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--kvstore-opt")
            if key != "etcd.config":
                raise click.BadParameter(
                    f"{key!r} is not supported: this apiserver reads its etcd from etcd.config=FILE (Cilium's etcd "
                    "config file) or from --kvstore-endpoints/--kvstore-ca/--kvstore-cert/--kvstore-key",
                    param_hint="--kvstore-opt",
                )
            options[key] = item
    return options


#: Go's boolean flags: `--flag` alone is true, `--flag=false` false.
GO_BOOL: dict[str, Any] = {"type": bool, "is_flag": False, "flag_value": True}

#: Cilium's flags this apiserver does not implement: (flag, the value that would ask for it, why not).
REFUSED = {
    "clustermesh_enable_mcs_api": (True, "--clustermesh-enable-mcs-api",
                                   "the MCS-API (ServiceExport/ServiceImport) is not supported; use global services"),
    "enable_external_workloads": (True, "--enable-external-workloads",
                                  "external workloads (CiliumExternalWorkload) are not supported"),
    "cluster_users_enabled": (True, "--cluster-users-enabled",
                              "remote users are managed by `clustermesh connect`, not from a users file"),
    "enable_k8s_endpoint_slice": (False, "--enable-k8s-endpoint-slice=false",
                                  "backends are read from EndpointSlices only (Endpoints objects are not read)"),
}  # fmt: skip


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--cluster-name", required=True, help="This cluster's name (lower-case, digits, '-'; at most 32).")
@click.option("--cluster-id", required=True, type=int, help="This cluster's ID, unique in the mesh (1..255).")
@click.option("--max-connected-clusters", default="255", show_default=True, type=click.Choice(["255", "511"]))
@click.option(
    "--source",
    type=click.Choice(["standalone", "kubernetes"]),
    default="standalone",
    show_default=True,
    help="Where the cluster's resources live: the registry/ prefix of its etcd, or a Kubernetes API server.",
)
@click.option("--kubeconfig", "--k8s-kubeconfig-path", "kubeconfig", default=None,
              help="With --source kubernetes: the kubeconfig (default: in-cluster).")  # fmt: skip
@click.option("--kube-context", default=None, help="With --source kubernetes: the kubeconfig context.")
@click.option("--kvstore-endpoints", multiple=True, help="etcd URL(s), https://HOST:PORT.")
@click.option("--kvstore-ca", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kvstore", "kvstore_type", default="etcd", show_default=True, type=click.Choice(["etcd"]),
              help="(Cilium's flag) The key-value store: etcd is the only one.")  # fmt: skip
@click.option("--kvstore-opt", "kvstore_opts", multiple=True,
              help="(Cilium's flag) etcd.config=FILE: the etcd config file in Cilium's format, instead of the "
                   "--kvstore-endpoints/-ca/-cert/-key flags.")  # fmt: skip
@click.option("--health-address", default="127.0.0.1:0", show_default=True, callback=_address)
@click.option("--metrics-address", "--prometheus-serve-addr", "metrics_address", default="127.0.0.1:0",
              show_default=True, callback=_address)  # fmt: skip
@click.option("--lease-ttl", default=None, type=int, help="Seconds published keys outlive us (default 900).")
@click.option("--kvstore-lease-ttl", default=None, callback=_go_duration,
              help="(Cilium's flag) The same as a Go duration, e.g. 15m.")  # fmt: skip
@click.option("--clustermesh-default-global-namespace", default=True, show_default=True, **GO_BOOL,
              help="(Cilium's flag) Namespaces are global unless annotated clustermesh.cilium.io/global=false; with "
                   "false, only namespaces annotated clustermesh.cilium.io/global=true are exported.")  # fmt: skip
@click.option("--k8s-service-proxy-name", default="", show_default=True,
              help="(Cilium's flag) Export only services whose service.kubernetes.io/service-proxy-name label is "
                   "this value (empty: only services without that label).")  # fmt: skip
@click.option("--service-cluster-ip-range", "service_cidr", default=None, metavar="CIDR",
              help="(Kubernetes' flag) Give each Service without a ClusterIP one from this CIDR, as kube-apiserver "
                   "does (standalone store only; a Kubernetes API server does it itself).")  # fmt: skip
@click.option("--clustermesh-enable-mcs-api", default=False, **GO_BOOL, help="(Cilium's flag) Refused if true.")
@click.option("--clustermesh-mcs-api-install-crds", default=True, **GO_BOOL, hidden=True)
@click.option("--enable-external-workloads", default=False, **GO_BOOL, help="(Cilium's flag) Refused if true.")
@click.option("--cluster-users-enabled", default=False, **GO_BOOL, help="(Cilium's flag) Refused if true.")
@click.option("--cluster-users-config-path", default=None, hidden=True)
@click.option("--enable-k8s-endpoint-slice", default=True, **GO_BOOL, help="(Cilium's flag) Refused if false.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--debug", "-D", is_flag=True, help="(Cilium's flag) --log-level debug.")
def main(**params: Any) -> None:
    """Publish one cluster's nodes, endpoints, identities and global services into its etcd, in Cilium's format."""
    level = "DEBUG" if params["debug"] else params["log_level"].upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_until_signalled(settings_from(params)))


def settings_from(params: dict[str, Any]) -> ApiserverSettings:
    """The command line, checked: a refused Cilium flag, a missing etcd, a bad value is a usage error."""
    for name, (asking, flag, why) in REFUSED.items():
        if params[name] == asking:
            raise click.UsageError(f"{flag}: not supported by this apiserver: {why}")
    if params["kvstore_lease_ttl"] is not None and params["lease_ttl"] is not None:
        raise click.UsageError("give --lease-ttl or --kvstore-lease-ttl, not both")
    lease_ttl = params["kvstore_lease_ttl"] or params["lease_ttl"] or DEFAULT_TTL
    if params["service_cidr"] is not None and params["source"] != "standalone":
        raise click.UsageError("--service-cluster-ip-range: with --source kubernetes, the API server gives ClusterIPs")
    try:
        cluster = ClusterInfo(params["cluster_name"], params["cluster_id"], int(params["max_connected_clusters"]))
        config = _etcd_config(params)
        if params["service_cidr"] is not None:
            ServiceIPPool(params["service_cidr"])  # a bad CIDR is a usage error, now
    except (ModelError, errors.KVStoreError) as exc:
        raise click.UsageError(str(exc)) from None
    return ApiserverSettings(
        cluster=cluster,
        etcd=config,
        source=params["source"],
        kubeconfig=params["kubeconfig"],
        kube_context=params["kube_context"],
        health=params["health_address"],
        metrics=params["metrics_address"],
        lease_ttl=lease_ttl,
        default_global_namespace=params["clustermesh_default_global_namespace"],
        service_proxy_name=params["k8s_service_proxy_name"],
        service_cidr=params["service_cidr"],
    )


def _etcd_config(params: dict[str, Any]) -> EtcdConfig:
    config_file = _kvstore_opts(params["kvstore_opts"]).get("etcd.config")
    flags = [params[name] for name in ("kvstore_ca", "kvstore_cert", "kvstore_key")]
    if config_file is not None:
        if params["kvstore_endpoints"] or any(flags):
            raise click.UsageError("give --kvstore-opt etcd.config=FILE or the --kvstore-* flags, not both")
        return load_config_file(Path(config_file))
    if not params["kvstore_endpoints"] or not all(flags):
        raise click.UsageError(
            "the cluster's etcd: --kvstore-endpoints, --kvstore-ca, --kvstore-cert and --kvstore-key "
            "(or --kvstore-opt etcd.config=FILE)"
        )
    endpoints = [url for value in params["kvstore_endpoints"] for url in value.split(",") if url]
    return EtcdConfig(endpoints, params["kvstore_ca"], params["kvstore_cert"], params["kvstore_key"])
