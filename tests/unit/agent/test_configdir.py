"""The clustermesh config directory: what counts as a cluster's config, what changes it, and what is a problem
(named in status, logged once, never a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.configdir import ConfigDir, ConfigEvent


def config(directory: Path, name: str, cert: bytes = b"cert-1") -> None:
    (directory / f"{name}.crt").write_bytes(cert)
    (directory / "ca.crt").write_bytes(b"ca")
    (directory / f"{name}.key").write_bytes(b"key")
    (directory / name).write_text(
        f"endpoints: [https://10.0.0.1:2379]\ntrusted-ca-file: ca.crt\ncert-file: {name}.crt\nkey-file: {name}.key\n"
    )


def watch(directory: Path) -> tuple[ConfigDir, list[ConfigEvent]]:
    events: list[ConfigEvent] = []
    return ConfigDir(directory, events.append, ignore={"c1"}), events


def test_files_added_changed_and_removed(tmp_path: Path) -> None:
    folder, events = watch(tmp_path)
    config(tmp_path, "c2")
    folder.scan()
    assert [(e.action, e.name) for e in events] == [("added", "c2")], "certificates and keys are not configs"
    assert folder.scan() == []
    (tmp_path / "c2").write_text((tmp_path / "c2").read_text() + "# edited\n")
    assert [(e.action, e.name) for e in folder.scan()] == [("changed", "c2")]
    (tmp_path / "c2").unlink()
    assert [(e.action, e.name) for e in folder.scan()] == [("removed", "c2")]


def test_a_certificate_rotated_in_place_is_a_change(tmp_path: Path) -> None:
    """cert-manager or a Secret update rewrites the certificate and leaves the config file alone."""
    folder, _ = watch(tmp_path)
    config(tmp_path, "c2")
    folder.scan()
    (tmp_path / "c2.crt").write_bytes(b"cert-2")
    assert [(e.action, e.name) for e in folder.scan()] == [("changed", "c2")]
    (tmp_path / "ca.crt").write_bytes(b"another ca")
    assert [(e.action, e.name) for e in folder.scan()] == [("changed", "c2")]
    (tmp_path / "c2.key").unlink()
    assert [(e.action, e.name) for e in folder.scan()] == [("changed", "c2")], "the session will say it is gone"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("c3", b"endpoints: [https://x]\n\xff\xfe garbage", "not UTF-8 text (byte 23)"),
        ("C_3", b"endpoints: [https://x]\n", "is invalid"),
        ("c1", b"endpoints: [https://x]\n", "named after the local cluster"),
    ],
)
def test_a_file_that_is_not_usable_is_a_problem_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, content: bytes, problem: str
) -> None:
    folder, events = watch(tmp_path)
    (tmp_path / name).write_bytes(content)
    for _ in range(3):
        folder.scan()
    assert events == []
    assert problem in folder.problems[name]
    assert caplog.text.count(f"{name} not used") == 1, "said once, not every scan"
    assert "Traceback" not in caplog.text
