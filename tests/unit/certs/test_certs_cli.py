"""The PKI through `clustermesh certs`: what a user runs, and what lands on disk."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509

import certs
from clustermesh.cli import cli


def test_create_writes_a_cluster_pki_with_private_keys_0600(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["certs", "create", "--cluster", "c1", "--dir", str(tmp_path), "--server-host", "10.0.0.5"]
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{n}.{ext}" for n in ("ca", "server", "root", "admin-c1", "agent-c1") for ext in ("crt", "key")
    )
    for key in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    server = certs.describe(certs.load_certificates(tmp_path / "server.crt")[0])
    assert server.ip_addresses == ["127.0.0.1", "10.0.0.5"] and server.dns_names == ["localhost"]
    client = x509.load_pem_x509_certificate((tmp_path / "agent-c1.crt").read_bytes())
    assert client.subject.rfc4514_string() == "CN=agent-c1"
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    client.verify_directly_issued_by(ca)


def test_create_refuses_to_replace_a_ca_and_rejects_bad_names(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["certs", "create", "--cluster", "c1", "--dir", str(tmp_path)]).exit_code == 0
    again = runner.invoke(cli, ["certs", "create", "--cluster", "c1", "--dir", str(tmp_path)])
    assert again.exit_code == 1 and "refusing to replace the CA" in again.output
    bad = runner.invoke(cli, ["certs", "create", "--cluster", "Not_Valid", "--dir", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "cluster name 'Not_Valid' is invalid" in bad.output
    assert not (tmp_path / "x").exists()


def test_issue_and_show_as_json(tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(cli, ["certs", "create", "--cluster", "c1", "--dir", str(tmp_path)])
    assert runner.invoke(cli, ["certs", "issue", "--dir", str(tmp_path), "--user", "remote-c2"]).exit_code == 0
    result = runner.invoke(cli, ["certs", "show", "-o", "json", str(tmp_path)])
    assert result.exit_code == 0, result.output
    shown = {entry["commonName"]: entry for entry in json.loads(result.output)}
    assert set(shown) == {"c1-ca", "etcd-c1", "root", "admin-c1", "agent-c1", "remote-c2"}
    assert shown["c1-ca"]["isCA"] is True
    assert shown["etcd-c1"]["sans"] == ["localhost", "127.0.0.1"]
    assert all(entry["status"] == "valid" and entry["issuer"] == "CN=c1-ca" for entry in shown.values())


def test_show_refuses_a_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("hello")
    result = CliRunner().invoke(cli, ["certs", "show", str(junk)])
    assert result.exit_code == 1 and "not a PEM certificate" in result.output


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["certs", "issue", "--dir", str(tmp_path), "--user", "x"])
    assert result.exit_code == 1 and "clustermesh certs create" in result.output
