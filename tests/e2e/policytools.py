"""Tools for the network policy tests: policies applied from the host's shell through `lab env` (as a user does),
pods of the tests' naming, reachability matrices probed from inside the pods, flows read from the agents, and a
guard that counts every packet the host's own namespace sends to a lab address (there must be none).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.lab import netns
from clustermesh.lab.pods import find_pod
from tests.e2e.labtools import CLI, PYTHON, LabHandle, clustermesh, describe, wait_until

PORTS = [("tcp", 80), ("tcp", 81), ("udp", 80), ("udp", 81)]
Probe = tuple[str, str, str, int]  # (source pod, destination pod, protocol, port); pods as CLUSTER/NS/NAME
Expect = Callable[[str, str, str, int], bool]


def run_cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI from the host's shell with the lab's contexts (`eval "$(clustermesh lab env LAB)"`)."""
    env = {**os.environ, "CLUSTERMESH_CONFIG": str(config)}
    return subprocess.run([str(CLI), *args], input=stdin, capture_output=True, text=True, timeout=60, env=env,
                          check=False)  # fmt: skip


@dataclass
class PolicyLab:
    """A lab as a policy user drives it: apply and delete manifests per cluster, pods, probes and flows."""

    lab: LabHandle
    config: Path
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # CLUSTER/NS/NAME -> lab pod add's JSON

    @classmethod
    def of(cls, lab: LabHandle) -> PolicyLab:
        result = clustermesh("lab", "env", lab.name)
        assert result.returncode == 0 and result.stdout.startswith("export CLUSTERMESH_CONFIG="), describe(result)
        return cls(lab, Path(result.stdout.strip().partition("=")[2]))

    def apply(self, cluster: str, manifest: str) -> None:
        result = run_cli(self.config, "--context", cluster, "apply", "-f", "-", stdin=manifest)
        assert result.returncode == 0, describe(result)

    def delete(self, cluster: str, manifest: str) -> None:
        run_cli(self.config, "--context", cluster, "delete", "-f", "-", stdin=manifest)

    def add_pod(self, reference: str, labels: dict[str, str], node: str | None = None) -> dict[str, Any]:
        cluster, namespace, name = reference.split("/")
        args = ["lab", "pod", "add", self.lab.name, cluster, name, "--namespace", namespace, "-o", "json",
                "--labels", ",".join(f"{k}={v}" for k, v in labels.items())]  # fmt: skip
        result = clustermesh(*args, *(("--node", node) if node else ()))
        assert result.returncode == 0, describe(result)
        made: dict[str, Any] = json.loads(result.stdout)
        self.pods[reference] = made
        return made

    def endpoint(self, reference: str) -> dict[str, Any]:
        """The pod as its node's agent enforces it (`policy get`): labels, identity, what is enforced, the rules."""
        made = self.pods[reference]
        for document in self.policy_documents().values():
            for endpoint in document["endpoints"]:
                if endpoint["ip"] == made["ip"]:
                    return dict(endpoint)
        raise AssertionError(f"{reference} ({made['ip']}) is no endpoint of any agent")

    def add_pod_with_namespace_labels(self, reference: str, labels: dict[str, str], node: str | None = None) -> None:
        """A pod whose identity carries its namespace's labels: a node's agent that has not seen the Namespace
        object yet (it was applied a moment ago) gives a pod its name's label only; such a pod is made again."""
        namespace = reference.split("/")[1]

        def made() -> tuple[bool, object]:
            self.add_pod(reference, labels, node)
            found = self.endpoint(reference)["labels"]
            prefix = "k8s:io.cilium.k8s.namespace.labels."
            if any(label.startswith(prefix) and "metadata.name" not in label for label in found):
                return True, found
            self.delete_pod(reference)
            return False, found

        wait_until(f"{reference} with the labels of namespace {namespace}", made, timeout=20, every=0.2)

    def delete_pod(self, reference: str) -> None:
        result = clustermesh("lab", "pod", "delete", self.lab.name, reference)
        assert result.returncode == 0, describe(result)
        self.pods.pop(reference, None)

    def netns(self, reference: str) -> str:
        return str(find_pod(self.lab.state, reference)[1]["netns"])

    def ip(self, reference: str) -> str:
        return str(self.pods[reference]["ip"])

    def serve(self, reference: str) -> None:
        """The probe server on TCP and UDP 80 and 81, left running in the pod by `lab exec` (it goes with the pod)."""
        log = f"/tmp/clustermesh-e2e-probe-{self.lab.name}-{reference.replace('/', '-')}.log"
        command = f"exec {PYTHON} -m clustermesh.lab.probe serve --tcp 80,81 --udp 80,81 >{log} 2>&1 &"
        result = clustermesh("lab", "exec", self.lab.name, reference, "--", "sh", "-c", command)
        assert result.returncode == 0, describe(result)
        wait_until(f"the probe server in {reference}", lambda: (_read(log).startswith("ready"), _read(log)),
                   timeout=15, every=0.05)  # fmt: skip

    def probe(self, probes: Iterable[Probe], timeout: float = 1.0) -> dict[Probe, bool]:
        """Every probe, each source's at once, all sources side by side: about `timeout` seconds in all."""
        by_source: dict[str, list[Probe]] = {}
        for item in probes:
            by_source.setdefault(item[0], []).append(item)
        running = {}
        for source, items in by_source.items():
            targets = [f"{protocol}:{self.ip(destination)}:{port}" for _, destination, protocol, port in items]
            running[source] = (items, targets, subprocess.Popen(
                [*netns.nsenter(self.netns(source)), PYTHON, "-m", "clustermesh.lab.probe", "check", "--timeout",
                 str(timeout), *targets], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))  # fmt: skip
        found: dict[Probe, bool] = {}
        for source, (items, targets, process) in running.items():
            out, err = process.communicate(timeout=30)
            assert process.returncode == 0, f"probe from {source}: {err}"
            answers = json.loads(out)
            found.update({item: answers[target] for item, target in zip(items, targets, strict=True)})
        return found

    def expect_matrix(self, what: str, probes: list[Probe], expect: Expect, timeout: float = 20) -> None:
        """Until every probe gives what `expect` says (the agents apply a change within a moment)."""

        def check() -> tuple[bool, object]:
            found = self.probe(probes)
            wrong = [f"{s} -> {d} {p}/{port}: {'open' if found[(s, d, p, port)] else 'blocked'}, expected "
                     f"{'open' if expect(s, d, p, port) else 'blocked'}"
                     for s, d, p, port in probes if found[(s, d, p, port)] != expect(s, d, p, port)]  # fmt: skip
            return not wrong, f"{len(wrong)} of {len(probes)} wrong: " + "; ".join(wrong[:12])

        wait_until(what, check, timeout=timeout, every=0.1)

    def flows(self, *filters: str) -> list[dict[str, Any]]:
        result = clustermesh("observe", "--lab", self.lab.name, "-o", "json", "--last", "0", *filters)
        assert result.returncode == 0, describe(result)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def policy_documents(self) -> dict[str, Any]:
        result = clustermesh("policy", "get", "--lab", self.lab.name, "-o", "json")
        assert result.returncode == 0, describe(result)
        documents: dict[str, Any] = json.loads(result.stdout)
        return documents

    def expect_drop(self, source: str, destination: str, reason: str = "POLICY_DENIED", timeout: float = 10) -> None:
        """A drop flow from `source` to `destination`, each side named by its labels, identity and cluster."""
        source_ip, destination_ip = self.ip(source), self.ip(destination)

        def check() -> tuple[bool, object]:
            wanted = {"source": source_ip, "destination": destination_ip, "ipVersion": "IPv4"}
            drops = [f["flow"] for f in self.flows("--verdict", "DROPPED") if f["flow"]["IP"] == wanted]
            for flow in drops:
                src, dst = flow["source"], flow["destination"]
                if (flow["drop_reason_desc"] == reason and src.get("labels") and dst.get("labels")
                        and src.get("cluster_name") == source.partition("/")[0]
                        and dst.get("cluster_name") == destination.partition("/")[0]
                        and src.get("identity") and dst.get("identity")):  # fmt: skip
                    return True, flow
            return False, drops[-3:] or "no drop between them"

        wait_until(f"a {reason} drop {source} -> {destination} with both sides' labels", check, timeout=timeout,
                   every=0.3)  # fmt: skip


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# --- the host's namespace sends nothing to the lab

#: the labs' addresses: pods (10.<cluster>.<node>.0/24, cluster and node 1-9), Services (10.96.<cluster>.0/24),
#: the underlay; not all of 10.0.0.0/8, where the host's own resolver may be (10.255.255.53 on these machines)
LAB_RANGES = "10.0.0.0/12, 10.96.0.0/16, 192.168.0.0/16"


class HostGuard:
    """An nftables table in the host's namespace that counts (and drops) every packet the host sends to a lab
    range: what `lab env`'s contexts must never cause."""

    def __init__(self, name: str) -> None:
        self.table = f"clustermesh_guard_{name}"

    def __enter__(self) -> HostGuard:
        rules = (f"table ip {self.table} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
                 f"  ip daddr {{ {LAB_RANGES} }} counter drop\n }}\n}}\n")  # fmt: skip
        netns.run("nft", "-f", "-", input=rules.encode())
        return self

    def packets(self) -> int:
        document = json.loads(netns.run("nft", "-j", "list", "table", "ip", self.table))
        counters = [item["rule"] for item in document["nftables"] if "rule" in item]
        return sum(expr["counter"]["packets"] for rule in counters for expr in rule["expr"] if "counter" in expr)

    def __exit__(self, *exc: object) -> None:
        netns.run("nft", "delete", "table", "ip", self.table, check=False)


def guarded(name: str) -> Iterator[HostGuard]:
    with HostGuard(name) as guard:
        yield guard
