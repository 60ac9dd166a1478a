"""What can be checked of the images and of scripts/kind-e2e.sh on a machine with no Docker engine: the
Containerfiles' bases are pinned, every file they copy exists, the apiserver ends as a non-root user, the agent's
image installs what the agent runs; the shell scripts pass shellcheck; the kind script's dry run prints, in order,
every step it would take (clusters, images, chart, connect, checks, delete)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "deploy" / "images"
CONTAINERFILES = sorted(IMAGES.glob("*.Containerfile"))
#: what the agent runs at run time (scripts/setup-system.sh installs them for the lab, with test tools besides)
AGENT_RUNTIME = ["iproute2", "bpftool", "wireguard-tools", "wireguard-go", "strongswan-charon",
                 "libcharon-extra-plugins", "libstrongswan-standard-plugins", "util-linux", "python3"]  # fmt: skip


def instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_there_is_an_image_for_the_apiserver_and_for_the_agent() -> None:
    assert [p.name for p in CONTAINERFILES] == ["agent.Containerfile", "apiserver.Containerfile"]


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_every_base_is_pinned_by_digest_and_every_copied_file_exists(path: Path) -> None:
    steps = instructions(path)
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in steps if word == "ARG" and "=" in rest}
    for word, rest in steps:
        if word == "FROM":
            image = rest.split()[0]
            image = args.get(image.strip("${}"), image) if image.startswith("$") else image
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{path.name}: {image} is not pinned by digest"
        if word == "COPY" and "--from=" not in rest:
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file in the repository"


def test_the_apiserver_image_runs_as_a_non_root_user() -> None:
    users = [rest for word, rest in instructions(IMAGES / "apiserver.Containerfile") if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users


def test_the_agent_image_installs_what_the_agent_runs_and_its_ebpf_objects() -> None:
    text = (IMAGES / "agent.Containerfile").read_text()
    for package in AGENT_RUNTIME:
        assert re.search(rf"\b{re.escape(package)}\b", text), f"the agent image does not install {package}"
    setup = (ROOT / "scripts" / "setup-system.sh").read_text()
    for package in AGENT_RUNTIME:
        assert package == "python3" or package in setup, f"{package}: the lab does not install it either"
    assert "loader.build()" in text, "the eBPF objects are compiled when the image is built"
    assert "COPY deploy/images/clustermesh-cni" in text


@pytest.mark.parametrize("script", ["deploy/images/clustermesh-cni", "scripts/kind-e2e.sh", "scripts/setup-system.sh",
                                    "scripts/run-tests.sh"])  # fmt: skip
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is installed by scripts/setup-system.sh"
    result = subprocess.run([shellcheck, str(ROOT / script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("clusters", [2, 3])
def test_the_kind_script_dry_run_prints_every_step_in_order(clusters: int) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "kind-e2e.sh"), "--dry-run", "--clusters", str(clusters)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    names = [f"cm-c{n}" for n in range(1, clusters + 1)]

    def first(fragment: str) -> int:
        return next(i for i, command in enumerate(commands) if fragment in command)

    for name in names:
        assert any(c.startswith(f"kind create cluster --name {name} ") for c in commands)
        assert any(c.startswith(f"kind delete cluster --name {name}") for c in commands), "the clusters are deleted"
    set_folder = "two-clusters" if clusters == 2 else "three-clusters"
    assert f"kind-configs/{set_folder}/cluster1.yaml" in commands[0]
    pairs = clusters * (clusters - 1) // 2
    assert sum("connect --destination-context" in c for c in commands) == pairs
    assert first("kind create cluster") < first("docker build") < first("kind load docker-image")
    assert first("kind load docker-image") < first("helm install") < first("connect --destination-context")
    assert first("connect --destination-context") < first("agnhost connect") < first("kind delete cluster")
    assert sum(c.count("helm install") for c in commands) == clusters


def test_the_kind_script_refuses_a_bad_cluster_count() -> None:
    result = subprocess.run([str(ROOT / "scripts" / "kind-e2e.sh"), "--clusters", "4"], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "2 or 3" in result.stderr
