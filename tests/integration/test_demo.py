"""`make demo` end to end, so it keeps working: a real etcd, published state read back, the remote refused."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from clustermesh.cli import cli


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "cilium/state/nodes/v1/demo1/node-1" in result.output
    assert "cilium/synced/demo1/cilium/state/ip/v1" in result.output
    assert "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=demo1;" in result.output
    assert "was refused" in result.output and "permission denied" in result.output
    assert "stopping etcd" in result.output
