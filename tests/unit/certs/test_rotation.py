"""Rotating a PKI in place (`certs.rotation`, `clustermesh certs rotate`): what is written, what is kept, and the
CA roll's steps in order, each refusing what would lock a process out."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

import certs
from certs import rotation
from clustermesh.cli import cli


def leaf(path: Path) -> x509.Certificate:
    return certs.load_certificates(path)[0]


def chains_to(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except Exception:
        return False
    return True


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A cluster's PKI, a node folder with a flow-service certificate and a copy of the CA (as IPsec keeps it), and
    a certificate of another CA that must be left alone."""
    directory = tmp_path / "c1" / "pki"
    created = certs.create_cluster_pki(directory, "c1", server_hosts=["192.168.1.2"], days=30)
    ca = certs.load_issued(created.ca)
    node = tmp_path / "c1-node-1"
    hubble = certs.issue_server(ca, "hubble-n1", hosts=["n1.c1.hubble-grpc.cilium.io", "192.168.1.11"], days=30)
    certs.write_issued(hubble, certs.CertPaths.in_dir(node / "hubble-certs", "server"))
    (node / "ipsec-certs").mkdir(parents=True)
    shutil.copyfile(created.ca.cert, node / "ipsec-certs" / "ca.crt")
    stranger = certs.create_ca("someone-else")
    certs.write_issued(certs.issue_client(stranger, "theirs"), certs.CertPaths.in_dir(node, "theirs"))
    return tmp_path


def test_rotate_issues_every_leaf_again_with_the_same_names_and_a_new_key(pki: Path) -> None:
    server = pki / "c1" / "pki" / "server.crt"
    hubble = pki / "c1-node-1" / "hubble-certs" / "server.crt"
    before = {path: leaf(path) for path in (server, hubble, pki / "c1" / "pki" / "agent-c1.crt")}
    ca_before = (pki / "c1" / "pki" / "ca.crt").read_bytes()
    theirs = (pki / "c1-node-1" / "theirs.crt").read_bytes()

    report = rotation.rotate([pki])

    assert set(before) <= {p.resolve() for p in report.reissued}
    for path, old in before.items():
        new = leaf(path)
        assert new.serial_number != old.serial_number
        assert new.public_key() != old.public_key()
        assert new.subject == old.subject
        old_names = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == old_names
        assert new.not_valid_after_utc - new.not_valid_before_utc == old.not_valid_after_utc - old.not_valid_before_utc
        assert stat.S_IMODE(path.with_suffix(".key").stat().st_mode) == 0o600
    hubble_names = leaf(hubble).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "n1.c1.hubble-grpc.cilium.io" in hubble_names.get_values_for_type(x509.DNSName)
    assert (pki / "c1" / "pki" / "ca.crt").read_bytes() == ca_before, "the CA stays"
    assert (pki / "c1-node-1" / "theirs.crt").read_bytes() == theirs, "another CA's certificate is not ours to touch"
    assert any(p.name == "theirs.crt" and "not by this CA" in why for p, why in report.skipped)
    issued = certs.load_issued(certs.CertPaths.in_dir(pki / "c1" / "pki", "server"))
    assert issued.certificate == leaf(server), "the key written is the new certificate's"


def test_a_ca_roll_in_three_steps_never_leaves_a_certificate_untrusted(pki: Path) -> None:
    authority = pki / "c1" / "pki" / "ca.crt"
    copy = pki / "c1-node-1" / "ipsec-certs" / "ca.crt"
    old_ca = leaf(authority)
    hubble = pki / "c1-node-1" / "hubble-certs" / "server.crt"
    old_hubble = leaf(hubble)

    with pytest.raises(rotation.RotationError, match="no old CA"):
        rotation.drop_old_cas([pki])

    rotation.add_ca([pki])  # step 1: trust both, issue nothing yet
    bundle = certs.load_certificates(authority)
    assert len(bundle) == 2 and bundle[1] == old_ca
    assert certs.load_certificates(copy) == bundle, "a copy of the CA trusts the new one too"
    assert leaf(hubble) == old_hubble, "no certificate of the new CA before everyone trusts it"
    new_ca = bundle[0]
    assert certs.load_issued(certs.CertPaths.in_dir(pki / "c1" / "pki", "ca")).certificate == new_ca

    with pytest.raises(rotation.RotationError, match="still chain to the old CA"):
        rotation.drop_old_cas([pki])

    rotation.rotate([pki])  # step 2: everything from the new CA
    assert chains_to(leaf(hubble), new_ca) and not chains_to(leaf(hubble), old_ca)
    assert chains_to(leaf(pki / "c1" / "pki" / "root.crt"), new_ca)

    rotation.drop_old_cas([pki])  # step 3: trust only the new CA
    assert certs.load_certificates(authority) == [new_ca]
    assert certs.load_certificates(copy) == [new_ca]


def test_a_ca_file_whose_key_is_another_is_refused(pki: Path) -> None:
    other = certs.create_ca("other")
    certs.write_atomic(pki / "c1" / "pki" / "ca.key", certs.files.key_pem(other.key), mode=0o600)
    with pytest.raises(rotation.RotationError, match="is not the key of"):
        rotation.rotate([pki])


def test_folders_without_a_ca_cannot_rotate(tmp_path: Path) -> None:
    with pytest.raises(rotation.RotationError, match="holds a CA"):
        rotation.rotate([tmp_path])


# --- the command


def test_certs_rotate_says_what_it_wrote_in_json(pki: Path) -> None:
    result = CliRunner().invoke(cli, ["certs", "rotate", "--dir", str(pki), "-o", "json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["step"] == "leaves"
    assert any(path.endswith("hubble-certs/server.crt") for path in answer["reissued"])
    assert any(item["file"].endswith("theirs.crt") for item in answer["skipped"])

    result = CliRunner().invoke(cli, ["certs", "rotate", "--dir", str(pki), "--new-ca"])
    assert result.exit_code == 0, result.output
    assert "next: " in result.stderr and "restart each etcd" in result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "--dir"),
        (["--dir", "{pki}", "--new-ca", "--drop-old-ca"], "one at a time"),
        (["--dir", "{pki}", "--lab", "x"], "one of them"),
    ],
)
def test_certs_rotate_refuses_unclear_requests(pki: Path, args: list[str], error: str) -> None:
    result = CliRunner().invoke(cli, ["certs", "rotate", *(a.format(pki=pki) for a in args)])
    assert result.exit_code == 2 and error in result.output, result.output


def test_certs_rotate_of_a_folder_without_a_ca_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["certs", "rotate", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "holds a CA" in result.output, result.output


def test_a_rotated_file_keeps_its_owner_and_mode(pki: Path) -> None:
    """etcd running as its own user reads its key at every handshake: a rotation must not take that away."""
    import os

    key = pki / "c1" / "pki" / "server.key"
    os.chmod(key, 0o640)
    owner = (1, 1) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    if os.geteuid() == 0:
        os.chown(key, *owner)
    before = key.read_bytes()
    rotation.rotate([pki])
    assert key.read_bytes() != before
    assert stat.S_IMODE(key.stat().st_mode) == 0o640
    assert (key.stat().st_uid, key.stat().st_gid) == owner
    fresh = pki / "c1-node-1" / "new.key"
    certs.write_atomic(fresh, b"x", mode=0o600)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600, "a new file gets the mode asked for"
