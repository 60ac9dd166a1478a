"""The node's WireGuard key file: kept across restarts, and a corrupt one never stops the agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.wgkeys import load_or_create


def test_the_key_is_made_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "wireguard.key")
    assert (tmp_path / "wireguard.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create(tmp_path / "wireguard.key").public_base64 == first.public_base64


@pytest.mark.parametrize(
    "content",
    [b"", b"not base64 at all!", b"c2hvcnQ=\n", b"\xff\xfe\x00\x01", b"A" * 44 + b"\n" + b"garbage"],
)
def test_a_corrupt_key_file_is_set_aside_and_a_new_key_made(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "wireguard.key"
    path.write_bytes(content)
    pair = load_or_create(path)
    aside = list(tmp_path.glob("wireguard.key.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content, "the broken file is kept for a person to look at"
    assert load_or_create(path).public_base64 == pair.public_base64, "the new key is saved"
    assert "a new key pair is made" in caplog.text
