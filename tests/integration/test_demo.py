"""`make demo` end to end, so it keeps working: three clusters with etcd, apiserver and agent processes, YAML
applied, `clustermesh connect` in mesh mode, status ready, then one etcd stopped and status naming it."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from clustermesh.cli import cli


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    result = CliRunner().invoke(cli, ["demo", "--control-plane"])
    assert result.exit_code == 0, result.output
    for expected in (
        "ciliumendpoint/echo-1 created",
        "cilium/state/nodes/v1/c1/c1-node-1",
        "k8s:app=echo;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=shop;",
        "c1 (ID 1) can read c3 as remote-c1",
        "c3 (ID 3) can read c2 as remote-c3",
        "node c1-node-1: ready",
        "node c1-node-1: NOT ready",
        "not ready: c3: not connected: etcd at https://127.0.0.1:",
        "stopping the agent of c1",
        "stopping the etcd of c2",
    ):
        assert expected in result.output, expected
    workdir = Path(re.search(r"one CA for the mesh \((\S+)\)", result.output).group(1))  # type: ignore[union-attr]
    assert not workdir.exists(), "the demo leaves nothing behind"
