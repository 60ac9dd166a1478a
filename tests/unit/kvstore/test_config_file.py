"""Cilium's etcd config file: every way it can be broken is one clear error naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import errors
from kvstore.config import load_config_file


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"endpoints: [https://x:2379]\n\xff\xfe", "not UTF-8 text"),
        (b"endpoints: [", "not valid YAML"),
        (b"- a list", "expected a mapping"),
        (b"endpoints: []\n", "'endpoints' must be a non-empty list"),
        (b"endpoints: [https://x:2379]\ntrusted-ca-file: ca\ncert-file: c\n", "'key-file' is missing"),
        (b"endpoints: [http://x:2379]\ntrusted-ca-file: ca\ncert-file: c\nkey-file: k\n", "plaintext"),
    ],
)
def test_a_broken_config_file_is_one_clear_error(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "c2"
    path.write_bytes(content)
    with pytest.raises(errors.KVStoreError) as caught:
        load_config_file(path)
    assert words in str(caught.value)
    assert isinstance(caught.value, errors.TLSSetupError)


def test_relative_paths_are_taken_from_the_files_folder(tmp_path: Path) -> None:
    path = tmp_path / "c2"
    path.write_text("endpoints: https://10.0.0.1:2379\ntrusted-ca-file: ca.crt\ncert-file: /abs/c.crt\nkey-file: k\n")
    config = load_config_file(path)
    assert config.endpoints == ["https://10.0.0.1:2379"]
    assert (config.ca_file, config.cert_file, config.key_file) == (tmp_path / "ca.crt", Path("/abs/c.crt"),
                                                                   tmp_path / "k")  # fmt: skip
