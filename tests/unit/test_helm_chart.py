"""The Helm chart (deploy/helm/clustermesh), rendered with Helm itself (the `helm-binary` package: Helm 3.17) and
every rendered object validated offline against Kubernetes 1.33's OpenAPI schemas (`kubernetes-validate`, strict:
an unknown field fails). No cluster runs here: what is checked is what `helm install` would send."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import certs

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "clustermesh"
#: the test extras install Helm into the venv (helm-binary): no skip when it is missing, a failure
HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
K8S_VERSION = "1.33.0"
ENDPOINT = "https://172.18.0.2:2479"
#: cluster c2 given as a file (clustermesh.config)
REMOTE_C2 = [
    "--set", "clustermesh.config.enabled=true",
    "--set", "clustermesh.config.clusters.c2.endpoints[0]=https://172.18.0.5:2479",
    "--set", "clustermesh.config.clusters.c2.ca=CA",
    "--set", "clustermesh.config.clusters.c2.cert=C",
    "--set", "clustermesh.config.clusters.c2.key=K",
]  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.ClusterPKI:
    return certs.create_cluster_pki(tmp_path_factory.mktemp("pki"), "c1", server_hosts=["172.18.0.2"])


def tls_args(pki: certs.ClusterPKI) -> list[str]:
    files = {"ca": pki.ca, "server": pki.server, "root": pki.user("root"), "admin": pki.user("admin-c1"),
             "agent": pki.user("agent-c1")}  # fmt: skip
    args = []
    for name, paths in files.items():
        args += ["--set-file", f"tls.{name}.cert={paths.cert}"]
        if name != "ca":  # the CA's key never goes into the cluster
            args += ["--set-file", f"tls.{name}.key={paths.key}"]
    return args


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


def render(pki: certs.ClusterPKI, *values: str, crds: bool = False) -> list[dict[str, Any]]:
    result = helm("template", "cm", str(CHART), "--namespace", "kube-system", *(["--include-crds"] if crds else []),
                  "--set", "cluster.name=c1", "--set", "cluster.id=1", "--set", f"kvstore.endpoint={ENDPOINT}",
                  *tls_args(pki), *values)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(documents: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (doc for doc in documents if doc["kind"] == kind)


def one(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in by_kind(documents, kind) if doc["metadata"]["name"] == name]
    return found


def container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    [found] = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return found


@pytest.mark.parametrize("routing", ["vxlan", "wireguard", "native"])
def test_every_rendered_object_is_valid_for_kubernetes(pki: certs.ClusterPKI, routing: str) -> None:
    documents = render(pki, "--set", f"routingMode={routing}", *REMOTE_C2, crds=True)
    kinds = sorted({doc["kind"] for doc in documents})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "CustomResourceDefinition", "DaemonSet",
                     "Deployment", "Secret", "Service", "ServiceAccount"]  # fmt: skip
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_validation_catches_a_broken_object(pki: certs.ClusterPKI) -> None:
    """The check above can fail: a wrong type and an unknown field are refused."""
    deployment = one(render(pki), "Deployment", "clustermesh-apiserver")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], "replicas": "one"}}, K8S_VERSION,
                                     strict=True)  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], "replica": 1}}, K8S_VERSION,
                                     strict=True)  # fmt: skip


def test_the_apiserver_runs_with_its_etcd_as_non_root_and_initialises_the_users_first(pki: certs.ClusterPKI) -> None:
    documents = render(pki)
    deployment = one(documents, "Deployment", "clustermesh-apiserver")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65532
    assert spec["hostNetwork"] is True, "agents reach etcd before any pod network exists"
    etcd = container(deployment, "etcd")
    assert "--client-cert-auth" in etcd["command"] and f"--advertise-client-urls={ENDPOINT}" in etcd["command"]
    apiserver = container(deployment, "apiserver")
    script = apiserver["args"][0]
    assert script.index("etcd init --cluster c1") < script.index("exec clustermesh-apiserver")
    assert "--source=kubernetes" in script and "--cluster-id=1" in script
    assert one(documents, "Service", "clustermesh-apiserver")["spec"]["ports"][0]["nodePort"] == 32379


def test_the_agent_is_a_privileged_host_network_daemonset_that_installs_the_cni_plugin(pki: certs.ClusterPKI) -> None:
    documents = render(pki, "--set", "routingMode=wireguard", "--set", "maxConnectedClusters=511")
    daemonset = one(documents, "DaemonSet", "clustermesh-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["tolerations"] == [{"operator": "Exists"}]
    agent = container(daemonset, "agent")
    assert agent["securityContext"]["privileged"] is True
    flags = agent["command"]
    for flag in ("--datapath=wireguard", "--max-connected-clusters=511", "--pod-cidr=from-node",
                 "--source=kubernetes", f"--kvstore-endpoints={ENDPOINT}"):  # fmt: skip
        assert flag in flags, flags
    install = container(daemonset, "install-cni", init=True)
    assert "/host/opt/cni/bin/clustermesh-cni" in install["args"][0]
    conflist = yaml.safe_load(one(documents, "ConfigMap", "clustermesh-cni")["data"]["05-clustermesh.conflist"])
    assert conflist["plugins"][0]["type"] == "clustermesh-cni"


def test_the_secrets_hold_the_certificates_and_never_the_cas_key(pki: certs.ClusterPKI) -> None:
    documents = render(pki)
    secret = one(documents, "Secret", "clustermesh-agent-tls")
    assert base64.b64decode(secret["data"]["tls.crt"]) == pki.user("agent-c1").cert.read_bytes()
    assert base64.b64decode(secret["data"]["ca.crt"]) == pki.ca.cert.read_bytes()
    ca_key = pki.ca.key.read_bytes()
    everything = yaml.safe_dump_all(documents).encode()
    assert base64.b64encode(ca_key) not in everything and ca_key not in everything


def test_remote_clusters_given_as_files_are_rendered_in_ciliums_format(pki: certs.ClusterPKI) -> None:
    documents = render(pki, *REMOTE_C2)
    config = yaml.safe_load(one(documents, "Secret", "clustermesh-remotes")["stringData"]["c2"])
    assert config == {"endpoints": ["https://172.18.0.5:2479"],
                      "trusted-ca-file": "/var/lib/clustermesh/remote-certs/c2.ca.crt",
                      "cert-file": "/var/lib/clustermesh/remote-certs/c2.crt",
                      "key-file": "/var/lib/clustermesh/remote-certs/c2.key"}  # fmt: skip
    container(one(documents, "DaemonSet", "clustermesh-agent"), "copy-remotes", init=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "cluster.id=0"], "cluster.id"),
        (["--set", "cluster.id=512"], "cluster.id"),
        (["--set", "cluster.name=Bad_Name"], "cluster.name"),
        (["--set", "routingMode=gre"], "routingMode"),
        (["--set", "routingMode=ipsec"], "routingMode"),  # no per-node IKE certificates from the chart
        (["--set-string", "tls.ca.key=-----BEGIN PRIVATE KEY-----"], "tls.ca"),  # the CA key never goes in
        (["--set", "maxConnectedClusters=300"], "maxConnectedClusters"),
        (["--set", "kvstore.endpoint=http://plain:2379"], "kvstore.endpoint"),
    ],
)
def test_bad_values_are_refused_naming_the_value(pki: certs.ClusterPKI, values: list[str], message: str) -> None:
    result = helm("template", "cm", str(CHART), "--set", "cluster.name=c1", "--set", "cluster.id=1",
                  "--set", f"kvstore.endpoint={ENDPOINT}", *tls_args(pki), *values)  # fmt: skip
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_missing_certificates_are_refused() -> None:
    result = helm("template", "cm", str(CHART), "--set", "cluster.name=c1", "--set", "cluster.id=1",
                  "--set", f"kvstore.endpoint={ENDPOINT}")  # fmt: skip
    assert result.returncode != 0 and "tls" in result.stderr, result.stderr


def test_helm_lint_passes(pki: certs.ClusterPKI) -> None:
    result = helm("lint", str(CHART), "--set", "cluster.name=c1", "--set", "cluster.id=1",
                  "--set", f"kvstore.endpoint={ENDPOINT}", *tls_args(pki))  # fmt: skip
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


# --- `clustermesh enable --context C` renders the chart for a context's cluster


def test_enable_prints_the_manifests_of_the_contexts_cluster(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from clustermesh.cli import cli

    pki = certs.create_cluster_pki(tmp_path / "c7" / "pki", "c7", server_hosts=["172.18.0.9"])
    config = tmp_path / "config.yaml"
    added = CliRunner().invoke(cli, ["--config", str(config), "context", "add", "c7", "--endpoints",
                                     "https://172.18.0.9:2479", "--ca", str(pki.ca.cert), "--cert",
                                     str(pki.user("root").cert), "--key", str(pki.user("root").key)])  # fmt: skip
    assert added.exit_code == 0, added.output
    result = CliRunner().invoke(cli, ["--config", str(config), "--context", "c7", "enable", "--cluster-id", "7",
                                      "--routing", "wireguard"])  # fmt: skip
    assert result.exit_code == 0, result.output
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    daemonset = one(documents, "DaemonSet", "clustermesh-agent")
    flags = container(daemonset, "agent")["command"]
    assert "--cluster-name=c7" in flags and "--cluster-id=7" in flags and "--datapath=wireguard" in flags
    assert "--kvstore-endpoints=https://172.18.0.9:2479" in flags, "the context's endpoint host"
    assert any(doc["kind"] == "CustomResourceDefinition" for doc in documents)
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)

    (pki.directory / "agent-c7.crt").unlink()
    broken = CliRunner().invoke(cli, ["--config", str(config), "--context", "c7", "enable", "--cluster-id", "7"])
    assert broken.exit_code == 1 and "agent-c7.crt" in broken.output and "certs create" in broken.output
    missing = CliRunner().invoke(cli, ["--config", str(config), "--context", "c7", "enable"])
    assert missing.exit_code == 2 and "--cluster-id" in missing.output
