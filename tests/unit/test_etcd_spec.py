"""How an etcd of the mesh is started: clients over mTLS only, and its peer listener never on a routable address."""

from __future__ import annotations

from pathlib import Path

from clustermesh.processes.etcd import EtcdSpec


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_peer_listener_is_on_loopback_whatever_address_clients_use(tmp_path: Path) -> None:
    spec = EtcdSpec(name="c1", data_dir=tmp_path / "data", ca_file=Path("ca"), cert_file=Path("c"), key_file=Path("k"),
                    host="192.168.11.2", client_port=2379, peer_port=2380, wrapper=["nsenter", "--net=/x"])  # fmt: skip
    command = spec.command()
    assert option(command, "--listen-client-urls") == "https://192.168.11.2:2379"
    assert option(command, "--listen-peer-urls") == "http://127.0.0.1:2380"
    assert option(command, "--initial-advertise-peer-urls") == "http://127.0.0.1:2380"
    assert option(command, "--initial-cluster") == "c1=http://127.0.0.1:2380"
    assert "--client-cert-auth" in command and option(command, "--trusted-ca-file") == "ca"
    assert not [arg for arg in command if arg.startswith("http://") and "127.0.0.1" not in arg]
