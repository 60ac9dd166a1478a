"""`clustermesh demo`: the demo, with a lab or with the control plane alone."""

from __future__ import annotations

from pathlib import Path

import click

from clustermesh.cli.lab import _lab_errors
from clustermesh.cli.root import cli


@cli.command("demo")
@click.option(
    "--control-plane",
    "control_plane",
    is_flag=True,
    help="Only the control plane (three clusters' etcd, apiserver and agent on loopback): no root needed.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --control-plane: where to keep the PKI and etcd data (default: a temporary folder, removed).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the lab at the end, to look at it with `clustermesh ui --lab demo` (then `lab down demo`).",
)
def demo(control_plane: bool, workdir: Path | None, keep: bool) -> None:
    """Run the demo: a two-cluster lab, pods talking across clusters over WireGuard, then removed (needs root)."""
    if control_plane:
        from clustermesh import demo_control_plane

        demo_control_plane.main(workdir)
        return
    from clustermesh import demo as lab_demo

    _lab_errors(lambda: lab_demo.main(keep=keep))
