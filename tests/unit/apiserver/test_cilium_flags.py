"""Cilium's clustermesh-apiserver flags that change what is published: accepted with their meaning, or refused with
a clear error naming the flag. The exporter's side of each accepted one is tested on what it exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from apiserver import main as command
from apiserver.exporting import Exporter, StateStores
from clustermesh.model.clusters import ClusterInfo
from clustermesh.model.kinds import Object, kind_by_name
from kvstore.memory import MemoryBackend
from kvstore.syncing import SyncStore

SERVICE, NAMESPACE, SLICE = kind_by_name("Service"), kind_by_name("Namespace"), kind_by_name("EndpointSlice")
PREFIX = "cilium/state/services/v1/c1/"
BASE = ["--cluster-name", "c1", "--cluster-id", "1"]
ETCD = [
    "--kvstore-endpoints",
    "https://127.0.0.1:2379",
    "--kvstore-ca",
    "ca",
    "--kvstore-cert",
    "c",
    "--kvstore-key",
    "k",
]


def settings(*args: str) -> Any:
    """What the command line would run with (the command itself is not run)."""
    captured: list[Any] = []
    runner = CliRunner()
    original = command.run_until_signalled

    async def capture(value: Any) -> None:
        captured.append(value)

    command.run_until_signalled = capture  # type: ignore[assignment]
    try:
        result = runner.invoke(command.main, [*BASE, *args])
    finally:
        command.run_until_signalled = original  # type: ignore[assignment]
    if result.exit_code != 0:
        raise AssertionError(result.output)
    return captured[0]


def refused(*args: str) -> str:
    result = CliRunner().invoke(command.main, [*BASE, *args])
    assert result.exit_code == 2, result.output
    return result.output


def test_defaults_are_ciliums() -> None:
    chosen = settings(*ETCD)
    assert chosen.default_global_namespace is True and chosen.service_proxy_name == "" and chosen.lease_ttl == 900


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--clustermesh-default-global-namespace=false"], False),
        (["--clustermesh-default-global-namespace", "false"], False),
        (["--clustermesh-default-global-namespace"], True),  # Go's bare boolean flag
    ],
)
def test_default_global_namespace(args: list[str], expected: bool) -> None:
    assert settings(*ETCD, *args).default_global_namespace is expected


@pytest.mark.parametrize(("value", "seconds"), [("15m", 900), ("15m0s", 900), ("1h30m", 5400), ("90s", 90)])
def test_kvstore_lease_ttl_takes_go_durations(value: str, seconds: int) -> None:
    assert settings(*ETCD, "--kvstore-lease-ttl", value).lease_ttl == seconds


def test_kvstore_opt_etcd_config_is_ciliums_etcd_config_file(tmp_path: Path) -> None:
    config = tmp_path / "etcd.config"
    config.write_text(
        "endpoints: [https://10.0.0.5:2379]\ntrusted-ca-file: ca.crt\ncert-file: c.crt\nkey-file: c.key\n"
    )
    chosen = settings("--kvstore", "etcd", "--kvstore-opt", f"etcd.config={config}")
    assert chosen.etcd.endpoints == ["https://10.0.0.5:2379"] and chosen.etcd.ca_file == tmp_path / "ca.crt"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--clustermesh-enable-mcs-api"], "--clustermesh-enable-mcs-api: not supported"),
        (["--clustermesh-enable-mcs-api=true"], "MCS-API"),
        (["--enable-external-workloads"], "--enable-external-workloads: not supported"),
        (["--cluster-users-enabled"], "clustermesh connect"),
        (["--enable-k8s-endpoint-slice=false"], "--enable-k8s-endpoint-slice=false: not supported"),
        (["--kvstore-opt", "etcd.qps=100"], "'etcd.qps' is not supported"),
        (["--kvstore", "consul"], "consul"),
        (["--kvstore-lease-ttl", "fortnight"], "is not a duration"),
        (["--lease-ttl", "60", "--kvstore-lease-ttl", "1m"], "not both"),
    ],
)
def test_flags_asking_for_what_this_apiserver_does_not_do_are_refused(args: list[str], words: str) -> None:
    assert words in refused(*ETCD, *args)


def test_no_etcd_at_all_is_a_usage_error() -> None:
    assert "--kvstore-endpoints" in refused()


# --- what the exporter does with them


def exporter(**options: Any) -> Exporter:
    backend = MemoryBackend()
    stores = StateStores(*(SyncStore(backend, prefix=f"test/{name}/") for name in ("n", "i", "d")),
                         SyncStore(backend, prefix=PREFIX))  # fmt: skip
    return Exporter(ClusterInfo("c1", 1), stores, **options)


def service(name: str, namespace: str = "shop", labels: dict[str, str] | None = None) -> Object:
    metadata = {"name": name, "namespace": namespace, "annotations": {"service.cilium.io/global": "true"},
                "labels": labels or {}}  # fmt: skip
    spec = {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def namespace(name: str, global_: str | None) -> Object:
    annotations = {"clustermesh.cilium.io/global": global_} if global_ is not None else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": annotations}}


def exported(exp: Exporter) -> list[str]:
    return sorted(key.removeprefix(PREFIX) for key in exp.stores.services.held())


def test_with_no_default_global_namespace_only_annotated_namespaces_are_exported() -> None:
    exp = exporter(default_global_namespace=False)
    exp.on_upsert(NAMESPACE, namespace("shop", "true"))
    exp.on_upsert(NAMESPACE, namespace("plain", None))
    exp.on_upsert(SERVICE, service("web", "shop"))
    exp.on_upsert(SERVICE, service("web", "plain"))
    exp.on_upsert(SERVICE, service("web", "nowhere"))  # no Namespace object at all
    assert exported(exp) == ["shop/web"]
    exp.on_upsert(NAMESPACE, namespace("plain", "true"))
    assert exported(exp) == ["plain/web", "shop/web"]


def test_the_default_is_every_namespace_not_annotated_false() -> None:
    exp = exporter()
    exp.on_upsert(NAMESPACE, namespace("off", "false"))
    for ns in ("shop", "off", "nowhere"):
        exp.on_upsert(SERVICE, service("web", ns))
    assert exported(exp) == ["nowhere/web", "shop/web"]


def test_service_proxy_name_selects_the_services_to_export() -> None:
    label = "service.kubernetes.io/service-proxy-name"
    for proxy, expected in (("", ["shop/plain"]), ("mesh", ["shop/ours"])):
        exp = exporter(service_proxy_name=proxy)
        exp.on_upsert(SERVICE, service("plain"))
        exp.on_upsert(SERVICE, service("ours", labels={label: "mesh"}))
        exp.on_upsert(SERVICE, service("theirs", labels={label: "other-proxy"}))
        assert exported(exp) == expected, proxy
    assert json.loads(exp.stores.services.held()[PREFIX + "shop/ours"])["name"] == "ours"
