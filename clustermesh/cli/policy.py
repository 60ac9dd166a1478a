"""`clustermesh policy get` and `clustermesh observe`: what a node enforces, and the flows it sees.

Both ask agents over their unix sockets: one node (`--socket`) or every node of a lab (`--lab NAME`, whose agents'
sockets the lab's state names). `observe` filters as `hubble observe` does and prints Hubble's JSON (`-o json`,
one flow a line) or one line a flow; `--follow` keeps asking each agent for what came after the last flow seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fnmatch
import json
from pathlib import Path
from typing import Any

import click

from clustermesh import output
from clustermesh.cli.agents import get_json as _get
from clustermesh.cli.agents import lab_option, socket_option
from clustermesh.cli.agents import sockets as _sockets
from clustermesh.cli.root import Controls, cli
from clustermesh.contexts import ContextError
from clustermesh.model.flows import compact

__all__ = ["observe", "policy_group"]


@cli.group("policy")
def policy_group() -> None:
    """What a node's agent enforces."""


@policy_group.command("get")
@socket_option
@lab_option
@click.option("-o", "--output", "output_format", type=click.Choice(["table", "json"]), default="table")
def policy_get(socket: Path | None, lab: str | None, output_format: str) -> None:
    """Per local endpoint: is a direction enforced, and each rule compiled for it (peer identities with their
    labels, ports, verdict), with the policy it came from."""
    sockets = _sockets(socket, lab)

    async def collect() -> dict[str, Any]:
        return {node: await _get(path, "/v1/policy") for node, path in sockets.items()}

    found = asyncio.run(collect())
    if output_format == "json":
        output.print_json(found if lab else next(iter(found.values())))
        return
    for asked, document in found.items():
        node = document.get("node") or asked
        for endpoint in document["endpoints"]:
            enforced = [d for d in ("ingress", "egress") if endpoint["enforced"][d]]
            output.out.print(
                f"[bold]{endpoint['namespace']}/{endpoint['name']}[/] {endpoint['ip']} identity "
                f"{endpoint['identity']} on {node}: enforced {', '.join(enforced) or 'nowhere (default allow)'}"
            )
            rows = [
                (rule["direction"], rule["verdict"], rule["peers"],
                 "; ".join(f"{p['identity']} ({','.join(_short(p['labels']))})" for p in rule["identities"]) or "-",
                 ", ".join(rule["ports"]) or "any", rule["policy"])
                for rule in endpoint["rules"]
            ]  # fmt: skip
            if rows:
                output.print_table(["DIRECTION", "VERDICT", "PEERS", "IDENTITIES", "PORTS", "POLICY"], rows)
        for name, reason in document.get("not_enforced", {}).items():
            output.out.print(f"  [yellow]not enforced[/] {name}: {reason}")


def _context_relay(controls: Controls, name: str) -> Path:
    """The relay a context names (the lab writes it in its contexts; add `relay: SOCKET` to a context of yours)."""
    try:
        context = controls.contexts().get(name)
    except ContextError as exc:
        raise click.ClickException(str(exc)) from None
    if not context.relay:
        raise click.ClickException(
            f"context {name} names no relay: add `relay: /path/to/relay.sock` to it in {controls.config}, or give "
            "--relay SOCKET"
        )
    return Path(context.relay)


def _relay_socket(lab: str, cluster: str) -> dict[str, Path]:
    from clustermesh.lab.lab import Lab
    from clustermesh.lab.layout import LabError

    try:
        found = Lab.existing(lab)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    if not cluster.startswith("c") or not cluster[1:].isdigit() or not 1 <= int(cluster[1:]) <= found.state.clusters:
        raise click.BadParameter(f"lab {lab} has clusters c1..c{found.state.clusters}", param_hint="--cluster")
    path = found.relay_socket(int(cluster[1:]))
    return {str(path): path}


def _short(labels: list[str]) -> list[str]:
    """Labels a person reads: not the namespace's labels, which every identity of a namespace shares."""
    return [label for label in labels if "io.cilium.k8s.namespace.labels" not in label]


# --- observe


def _matches_label(endpoint: dict[str, Any], wanted: tuple[str, ...]) -> bool:
    labels = set(endpoint.get("labels", []))
    plain = {label.split(":", 1)[1] for label in labels if ":" in label}
    return all(item in labels or item in plain for item in wanted)


def _names_service(flow: dict[str, Any], wanted: str) -> bool:
    """`ns/name`, or `name` in any namespace: the Service a flow went through (or came from)."""
    names = [f"{s.get('namespace', '')}/{s.get('name', '')}" for s in
             (flow.get("destination_service"), flow.get("source_service")) if s]  # fmt: skip
    if "/" in wanted:
        return wanted in names
    return any(name.partition("/")[2] == wanted for name in names)


def _flow_type(flow: dict[str, Any]) -> str:
    """Hubble's `--type` names: trace-sock, drop, policy-verdict."""
    if flow.get("Type") == "SOCK":
        return "trace-sock"
    return "drop" if flow.get("verdict") == "DROPPED" else "policy-verdict"


def matches(document: dict[str, Any], filters: dict[str, Any]) -> bool:
    flow = document["flow"]
    source, destination = flow.get("source", {}), flow.get("destination", {})
    if filters["from_label"] and not _matches_label(source, filters["from_label"]):
        return False
    if filters["to_label"] and not _matches_label(destination, filters["to_label"]):
        return False
    for side, key in ((source, "from"), (destination, "to")):
        if filters[f"{key}_namespace"] and side.get("namespace") != filters[f"{key}_namespace"]:
            return False
        if filters[f"{key}_cluster"] and not fnmatch.fnmatch(side.get("cluster_name", ""), filters[f"{key}_cluster"]):
            return False
    if filters["verdict"] and flow["verdict"] != filters["verdict"]:
        return False
    if filters.get("service") and not _names_service(flow, filters["service"]):
        return False
    if filters.get("flow_type") and _flow_type(flow) != filters["flow_type"]:
        return False
    l4: dict[str, Any] = next(iter(flow.get("l4", {}).values()), {})
    if filters["port"] and filters["port"] not in (l4.get("source_port"), l4.get("destination_port")):
        return False
    protocol = next(iter(flow.get("l4", {})), "").lower().removesuffix("v4")
    return not filters["protocol"] or protocol == filters["protocol"].lower()


def _moment(text: str) -> datetime.datetime:
    """An RFC 3339 time, or a duration before now (`30s`, `5m`, `2h`), as `hubble observe --since` takes them."""
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a time (2026-12-07T10:00:00Z) nor a duration (30s, 5m, 2h)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _flow_time(document: dict[str, Any]) -> datetime.datetime:
    text = str(document.get("time", ""))
    whole, _, fraction = text.rstrip("Z").partition(".")
    return datetime.datetime.fromisoformat(f"{whole}.{fraction[:6] or '0'}+00:00")


def in_window(document: dict[str, Any], filters: dict[str, Any]) -> bool:
    """The node (a glob of `cluster/node`) and the time window."""
    if filters["node"] and not fnmatch.fnmatch(str(document.get("node_name", "")), filters["node"]):
        return False
    if filters["since"] is None and filters["until"] is None:
        return True
    moment = _flow_time(document)
    return (filters["since"] is None or moment >= filters["since"]) and (
        filters["until"] is None or moment <= filters["until"]
    )


@cli.command("observe")
@socket_option
@lab_option
@click.option("--relay", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A clustermesh-relay's socket: every node of every connected cluster.")  # fmt: skip
@click.option("--cluster", "relay_cluster", default="c1", show_default=True,
              help="With --lab: whose relay to ask (each sees the whole mesh).")  # fmt: skip
@click.option("--context", "context_name", default=None,
              help="Read the relay this context names (the lab's contexts name their cluster's).")  # fmt: skip
@click.option("--node", default=None, help="The observing node, `cluster/node` (a glob: c2/*).")
@click.option("--since", type=_moment, default=None, help="Flows at or after this time, or this long ago (5m).")
@click.option("--until", type=_moment, default=None, help="Flows at or before this time, or this long ago.")
@click.option("--from-label", multiple=True, help="k=v (or k8s:k=v, reserved:world) of the source; repeat: all.")
@click.option("--to-label", multiple=True, help="The same, of the destination.")
@click.option("--from-namespace", default=None)
@click.option("--to-namespace", default=None)
@click.option("--from-cluster", default=None, help="The source's cluster (a glob: c*).")
@click.option("--to-cluster", default=None)
@click.option("--verdict", type=click.Choice(["FORWARDED", "DROPPED", "TRANSLATED"]), default=None)
@click.option("--service", default=None,
              help="Flows through a Service: ns/name, or name in any namespace (connect()s the socket load "
                   "balancer translated, with the frontend and the chosen backend).")  # fmt: skip
@click.option("-t", "--type", "flow_type", type=click.Choice(["trace-sock", "drop", "policy-verdict"]), default=None,
              help="trace-sock: a Service's translations; drop; policy-verdict: new allowed flows.")  # fmt: skip
@click.option("--port", type=int, default=None, help="Either side's port.")
@click.option("--protocol", type=click.Choice(["tcp", "udp", "icmp", "sctp"], case_sensitive=False), default=None)
@click.option("--last", type=int, default=20, show_default=True, help="The last N flows (per node), then stop.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing flows as they come.")
@click.option("-o", "--output", "output_format", type=click.Choice(["compact", "json"]), default="compact",
              show_default=True, help="compact: one line a flow; json: Hubble's, one object a line.")  # fmt: skip
def observe(socket: Path | None, lab: str | None, relay: Path | None, relay_cluster: str, context_name: str | None,
            follow: bool, last: int, output_format: str, **filters: Any) -> None:  # fmt: skip
    """Flows seen by a node's datapath, or through a relay by every node of every connected cluster (--relay,
    --context, or --lab): drops with both sides' labels and the reason, each new allowed flow, and each connect()
    to a Service with its frontend and chosen backend. Nodes a relay cannot read are named on stderr, never silently
    left out."""
    controls = click.get_current_context().find_object(Controls)
    context_name = context_name or (controls.context if controls is not None and not (socket or lab or relay) else None)
    if context_name is not None and relay is None and not lab:
        relay = _context_relay(controls or Controls(), context_name)
    sockets = (
        {str(relay): relay}
        if relay is not None
        else _relay_socket(lab, relay_cluster)
        if lab
        else _sockets(socket, None)
    )
    warned: set[str] = set()

    def warn(document: dict[str, Any]) -> None:
        for problem in document.get("unreachable") or []:
            if problem not in warned:
                warned.add(problem)
                click.echo(f"warning: flows not read from {problem}", err=True)

    def show(documents: list[dict[str, Any]]) -> None:
        for document in sorted(documents, key=lambda d: d["time"]):
            if not matches(document, filters) or not in_window(document, filters):
                continue
            if output_format == "json":
                click.echo(json.dumps(document, separators=(",", ":")))
            else:
                click.echo(compact(document))

    async def run() -> None:
        seen: dict[str, int] = {}
        first: list[dict[str, Any]] = []
        for node, path in sockets.items():
            document = await _get(path, "/v1/flows?since=0")
            warn(document)
            picked = [d for d in document["flows"] if matches(d, filters) and in_window(d, filters)]
            first.extend(picked[-last:] if last else picked)
            seen[node] = document["next"]
        show(first)
        while follow:
            answers = await asyncio.gather(
                *(_get(path, f"/v1/flows?since={seen[node]}&wait=2", timeout=10) for node, path in sockets.items())
            )
            batch = []
            for node, document in zip(sockets, answers, strict=True):
                warn(document)
                batch.extend(document["flows"])
                seen[node] = max(seen[node], document["next"])
            show(batch)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
