"""`make demo` end to end, so it keeps working: two etcds, two apiserver processes, YAML applied, keys shown."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from clustermesh.cli import cli


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for expected in (
        "ciliumendpoint/echo-1 created",
        "cilium/state/nodes/v1/c1/c1-node-1",
        "cilium/state/nodes/v1/c2/c2-node-2",
        "cilium/synced/c2/cilium/state/ip/v1",
        "k8s:app=echo;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=shop;",
        "frontends 10.96.0.10; backends 10.1.1.10, 10.1.2.10",
        "etcd refused user 'remote-c2'",
        "stopping the apiserver of c1",
        "stopping the etcd of c2",
    ):
        assert expected in result.output, expected
