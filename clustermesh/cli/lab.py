"""`clustermesh lab up|down|status|exec|node`: a multi-cluster mesh of network namespaces on this host."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path

import click
import msgspec

from clustermesh import output
from clustermesh.cli.root import T, cli, output_option
from clustermesh.model.api import AgentStatus, DatapathStatus


@cli.group("lab")
def lab_group() -> None:
    """A multi-cluster mesh on this host, out of network namespaces: no Docker, no Kubernetes (needs root)."""


def _lab_errors(work: Callable[[], T]) -> T:
    """A lab's errors, and those of what it drives (etcd, connect, a child process), as one line each."""
    from clustermesh.connecting import ConnectError
    from clustermesh.lab.layout import LabError
    from clustermesh.lab.netns import CommandFailed
    from clustermesh.processes.child import ChildFailed
    from clustermesh.processes.etcd import EtcdStartError
    from clustermesh.resources.store import ResourceError
    from kvstore.errors import KVStoreError

    try:
        return work()
    except (LabError, CommandFailed, ChildFailed, EtcdStartError, ConnectError, KVStoreError, ResourceError) as exc:
        raise click.ClickException(str(exc)) from None


def _lab_name(positional: str | None, option: str | None) -> str:
    """`lab down L` and `lab down --name L` both work (like `lab exec L ...`); two different names are an error."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two lab names given: {positional!r} and --name {option!r}")
    return positional if positional is not None else option if option is not None else "cmlab"


@lab_group.command("up")
@click.argument("lab", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name: 1-8 lower-case letters, digits.  [default: cmlab]")
@click.option("--clusters", default=2, show_default=True)
@click.option("--nodes", default=2, show_default=True, help="Nodes per cluster.")
@click.option("--pods", default=2, show_default=True, help="Pods per node.")
@click.option("--routing", type=click.Choice(["wireguard", "ipsec", "vxlan", "native"]), default="wireguard",
              show_default=True)  # fmt: skip
@click.option("--source", type=click.Choice(["standalone", "kubernetes"]), default="standalone",
              show_default=True,
              help="Where each cluster's resources live: its etcd, or a stand-in Kubernetes API server per "
                   "cluster (its apiserver and agents then run with --source kubernetes).")  # fmt: skip
@click.option("--agent-arg", "agent_args", multiple=True, metavar="FLAG",
              help="A flag for every agent, as `--agent-arg=--policy-default-local-cluster=false`; repeat for more "
                   "(nodes added later get them too).")  # fmt: skip
def lab_up(lab: str | None, name: str | None, clusters: int, nodes: int, pods: int, routing: str, source: str,
           agent_args: tuple[str, ...]) -> None:  # fmt: skip
    """Build the lab: underlay, per cluster etcd and apiserver, per node an agent, pods, all clusters connected."""
    from clustermesh.lab.lab import Lab, LabExists
    from clustermesh.lab.layout import LabLayout

    name = _lab_name(lab, name)

    def up() -> None:
        lab = Lab(LabLayout(name, clusters, nodes, pods, routing, source), progress=output.step)
        lab.state.agent_args = list(agent_args)
        try:
            lab.up()
        except LabExists:
            raise  # not ours to remove
        except BaseException:
            from clustermesh.lab.lab import down

            logs = Path(f"/tmp/clustermesh-lab-{name}-logs")
            output.err.print(f"[red]lab up failed[/]: cleaning up; the processes' logs are kept in {logs}")
            down(name, progress=output.step, keep_logs=logs)
            raise

    _lab_errors(up)


@lab_group.command("down")
@click.argument("lab", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name (also as the argument).  [default: cmlab]")
def lab_down(lab: str | None, name: str | None) -> None:
    """Remove everything the lab made: processes, namespaces, sockets, state (also after a crash)."""
    from clustermesh.lab.lab import down

    name = _lab_name(lab, name)
    _lab_errors(lambda: down(name, progress=output.step))


@lab_group.command("status")
@click.argument("lab_name", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name (also as the argument).  [default: cmlab]")
@output_option
def lab_status(lab_name: str | None, name: str | None, output_format: str) -> None:
    """Each node's agent: ready or not, clusters, datapath peers; each pod's address."""
    from clustermesh.lab.lab import Lab
    from clustermesh.status import AgentUnreachable, fetch_status

    name = _lab_name(lab_name, name)
    lab = _lab_errors(lambda: Lab.existing(name))
    state = lab.state

    async def collect() -> dict[str, AgentStatus | str]:
        nodes: dict[str, AgentStatus | str] = {}
        for node in state.node_layouts():
            try:
                nodes[node.name] = await fetch_status(lab.socket(node))
            except AgentUnreachable as exc:
                nodes[node.name] = str(exc)
        return nodes

    nodes = asyncio.run(collect())
    if output_format == "json":
        documents = {n: msgspec.to_builtins(s) if isinstance(s, AgentStatus) else {"ready": False, "error": s}
                     for n, s in nodes.items()}  # fmt: skip
        output.print_json({"lab": name, "routing": state.routing, "nodes": documents, "pods": state.pods})
        return
    rows = []
    for node_name, found in nodes.items():
        if isinstance(found, str):
            rows.append((node_name, "no", 0, 0, "-", found))
            continue
        datapath = found.datapath or DatapathStatus()
        error = "; ".join(found.not_ready) or datapath.last_error or "-"
        rows.append((node_name, "yes" if found.ready else "no", len(found.clusters), len(datapath.peers),
                     datapath.driver, error))  # fmt: skip
    output.print_table(["NODE", "READY", "CLUSTERS", "PEERS", "DATAPATH", "ERROR"], rows,
                       title=f"lab {name} ({state.routing}, {state.source})")  # fmt: skip
    output.print_table(["POD", "IP", "NODE"], [(p, d["ip"], d["node"]) for p, d in sorted(state.pods.items())])


@lab_group.group("node")
def lab_node() -> None:
    """Add a node to a running lab, or remove one, as machines come and go."""


@lab_node.command("add")
@click.argument("name")
@click.argument("cluster")
@click.option("--pods", type=int, default=None, help="Pods on the new node (default: as many as the lab's others).")
def lab_node_add(name: str, cluster: str, pods: int | None) -> None:
    """Add a node to CLUSTER (c1, c2, ...) of lab NAME; wait until every agent has it as a peer."""
    from clustermesh.lab.lab import Lab
    from clustermesh.lab.layout import LabError

    def add() -> None:
        if not re.fullmatch(r"c[1-9]", cluster):
            raise LabError(f"cluster {cluster!r}: name it as the lab does, c1, c2, ...")
        lab = Lab.existing(name, progress=output.step)
        node = lab.add_node(int(cluster[1:]), pods=pods)
        output.step(f"{node.name} is up: {node.ip}, pods {node.pod_cidr}")

    _lab_errors(add)


@lab_node.command("remove")
@click.argument("name")
@click.argument("node")
def lab_node_remove(name: str, node: str) -> None:
    """Remove NODE (as `lab status` names it, e.g. c2-node-2) from lab NAME, with its pods."""
    from clustermesh.lab.lab import Lab

    _lab_errors(lambda: Lab.existing(name, progress=output.step).remove_node(node))


@lab_group.command("wipe-etcd")
@click.argument("name")
@click.argument("cluster")
def lab_wipe_etcd(name: str, cluster: str) -> None:
    """Lose CLUSTER's etcd (c1, c2, ...) of lab NAME and bring it back empty, then run what an operator would
    (etcd init, connect again): its apiserver and agents refill it by themselves. For fault-injection tests."""
    from clustermesh.lab.lab import Lab
    from clustermesh.lab.layout import LabError

    def wipe() -> None:
        if not re.fullmatch(r"c[1-9]", cluster):
            raise LabError(f"cluster {cluster!r}: name it as the lab does, c1, c2, ...")
        Lab.existing(name, progress=output.step).wipe_etcd(int(cluster[1:]))

    _lab_errors(wipe)


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(name: str, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD of lab NAME: `lab exec NAME c1/shop/web -- ping ...` (CLUSTER/NAMESPACE/NAME), or
    CLUSTER/POD for the pods `lab up` makes (c1/pod-1-1). A process COMMAND leaves in the background keeps running
    until the pod or the lab goes."""
    from clustermesh.lab import cgroups
    from clustermesh.lab.lab import load, require_root
    from clustermesh.lab.pods import find_pod, pod_command

    _lab_errors(require_root)
    state = _lab_errors(lambda: load(name))
    _, record = _lab_errors(lambda: find_pod(state, pod))
    if record.get("cgroup") and Path(record["cgroup"]).is_dir():
        cgroups.join(Path(record["cgroup"]))  # the command runs as the pod's processes do: services balanced
    argv = pod_command(record, list(command))
    os.execvp(argv[0], argv)


@lab_group.group("pod")
def lab_pod() -> None:
    """Add a pod of your own naming and labels to a running lab, or delete one."""


def _cluster_index(cluster: str) -> int:
    from clustermesh.lab.layout import LabError

    if not re.fullmatch(r"c[1-9]", cluster):
        raise LabError(f"cluster {cluster!r}: name it as the lab does, c1, c2, ...")
    return int(cluster[1:])


@lab_pod.command("add")
@click.argument("name")
@click.argument("cluster")
@click.argument("pod")
@click.option("--namespace", "-n", default="default", show_default=True, help="The pod's namespace.")
@click.option("--labels", "-l", default="", help="The pod's labels: k=v,k2=v2 (with its namespace and cluster, "
              "they give its identity).")  # fmt: skip
@click.option("--node", default=None, help="The node (c1-node-2, or its index 2); default: the one with fewest pods.")
@click.option("-o", "--output", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)  # fmt: skip
def lab_pod_add(name: str, cluster: str, pod: str, namespace: str, labels: str, node: str | None,
                output_format: str) -> None:  # fmt: skip
    """Add POD to CLUSTER (c1, c2, ...) of lab NAME, attached through the CNI plugin as a kubelet would; print its
    IP (`-o json`: name, namespace, cluster, node, ip, identity)."""
    from clustermesh.lab.lab import Lab, require_root
    from clustermesh.lab.layout import LabError
    from clustermesh.lab.pods import add_named_pod, parse_labels

    def add() -> dict[str, object]:
        require_root()
        index = _cluster_index(cluster)
        lab = Lab.existing(name, progress=output.step)
        chosen = None
        if node is not None:
            wanted = f"c{index}-node-{node}" if node.isdigit() else node
            chosen = next((n for n in lab.state.node_layouts() if n.name == wanted), None)
            if chosen is None or chosen.cluster != index:
                known = ", ".join(n.name for n in lab.state.node_layouts() if n.cluster == index)
                raise LabError(f"no node {node!r} in cluster {cluster} of lab {name} (nodes: {known})")
        return add_named_pod(lab, index, pod, namespace=namespace, labels=parse_labels(labels), node=chosen)

    made = _lab_errors(add)
    if output_format == "json":
        output.print_json(made)
    else:
        click.echo(made["ip"])


@lab_pod.command("ready")
@click.argument("name")
@click.argument("pod")
def lab_pod_ready(name: str, pod: str) -> None:
    """Make POD of lab NAME ready again: the Services selecting it send new connections to it."""
    _set_ready(name, pod, True)


@lab_pod.command("unready")
@click.argument("name")
@click.argument("pod")
def lab_pod_unready(name: str, pod: str) -> None:
    """Make POD of lab NAME not ready (as a failing readiness probe): no new connection of a Service goes to it."""
    _set_ready(name, pod, False)


def _set_ready(name: str, pod: str, ready: bool) -> None:
    from clustermesh.lab.lab import Lab, require_root
    from clustermesh.lab.pods import set_ready

    def change() -> None:
        require_root()
        key = set_ready(Lab.existing(name, progress=output.step), pod, ready)
        output.step(f"{key}: {'ready' if ready else 'not ready'}")

    _lab_errors(change)


@lab_pod.command("delete")
@click.argument("name")
@click.argument("pod")
def lab_pod_delete(name: str, pod: str) -> None:
    """Delete POD (CLUSTER/NAMESPACE/NAME, or CLUSTER/POD) of lab NAME: CNI DEL, then what runs in it."""
    from clustermesh.lab.lab import Lab, require_root
    from clustermesh.lab.pods import delete_pod

    def delete() -> None:
        require_root()
        key = delete_pod(Lab.existing(name, progress=output.step), pod)
        output.step(f"{key}: deleted")

    _lab_errors(delete)


@lab_group.group("service")
def lab_service() -> None:
    """Services of a lab's clusters, their EndpointSlices kept from the lab's pods."""


@lab_service.command("add")
@click.argument("name")
@click.argument("cluster")
@click.argument("service")
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option("--selector", "-l", default="", help="The pods it selects: k=v,k2=v2.")
@click.option("--port", "ports", multiple=True, required=True,
              help="PORT[:TARGET][/tcp|/udp], as 80 or 53/udp; repeat for more.")  # fmt: skip
@click.option("--global", "is_global", is_flag=True, help="service.cilium.io/global: backends of every cluster.")
@click.option("--shared", type=bool, default=True, show_default=True,
              help="service.cilium.io/shared: false keeps this cluster's backends to itself.")  # fmt: skip
@click.option("--affinity", type=click.Choice(["local", "remote", "none"]), default=None,
              help="service.cilium.io/affinity.")  # fmt: skip
@click.option("-o", "--output", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)  # fmt: skip
def lab_service_add(name: str, cluster: str, service: str, namespace: str, selector: str, ports: tuple[str, ...],
                    is_global: bool, shared: bool, affinity: str | None, output_format: str) -> None:  # fmt: skip
    """Apply SERVICE to CLUSTER of lab NAME and keep its EndpointSlice filled from the lab's pods its selector
    matches (as Kubernetes' endpoint-slice controller would); print its ClusterIP."""
    from clustermesh.lab.lab import Lab, require_root
    from clustermesh.lab.pods import parse_labels
    from clustermesh.lab.services import add_service, parse_ports

    def add() -> dict[str, object]:
        require_root()
        lab = Lab.existing(name, progress=output.step)
        return asyncio.run(add_service(lab, _cluster_index(cluster), service, namespace, parse_labels(selector),
                                       parse_ports(list(ports)), is_global=is_global, shared=shared,
                                       affinity=affinity))  # fmt: skip

    made = _lab_errors(add)
    if output_format == "json":
        output.print_json(made)
    else:
        click.echo(made["cluster_ip"])


@lab_group.command("env")
@click.argument("lab", required=False, metavar="[NAME]")
@click.option("--name", default=None, help="The lab's name (also as the argument).  [default: cmlab]")
def lab_env(lab: str | None, name: str | None) -> None:
    """Print `export CLUSTERMESH_CONFIG=...`: contexts named after the lab's clusters (c1, c2, ...), so that
    `clustermesh --context c1 apply -f FILE` from this shell acts on cluster c1. Each cluster's etcd is reached
    through a bridge on 127.0.0.1 into the lab: the host never sends a packet to a lab address.
    Use it as `eval "$(clustermesh lab env NAME)"`."""
    from clustermesh.lab.lab import Lab

    path = _lab_errors(lambda: Lab.existing(_lab_name(lab, name)).env())
    click.echo(f"export CLUSTERMESH_CONFIG={path}")
