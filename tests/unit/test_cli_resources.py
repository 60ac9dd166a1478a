"""`clustermesh context / apply / get / delete` over a standalone store held in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from clustermesh.cli import Controls, cli
from clustermesh.resources.standalone import StandaloneStore
from kvstore.memory import MemoryBackend

MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {service.cilium.io/global: "true"}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNode
metadata: {name: node-1}
spec:
  addresses: [{type: InternalIP, ip: 192.168.0.1}]
"""


@pytest.fixture
def controls() -> Controls:
    return Controls(store=StandaloneStore(MemoryBackend()))


def run(controls: Controls, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), obj=controls, input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_apply_is_create_or_update_and_reports_each_object(controls: Controls, tmp_path: Path) -> None:
    manifest = tmp_path / "all.yaml"
    manifest.write_text(MANIFESTS)
    code, out, _ = run(controls, "apply", "-f", str(manifest))
    assert code == 0
    assert out.splitlines() == ["namespace/shop created", "service/web created", "ciliumnode/node-1 created"]
    code, out, _ = run(controls, "apply", "-f", str(manifest))
    assert code == 0
    assert out.splitlines() == ["namespace/shop unchanged", "service/web unchanged", "ciliumnode/node-1 unchanged"]
    changed = MANIFESTS.replace("192.168.0.1", "192.168.0.2")
    code, out, _ = run(controls, "apply", "-f", "-", stdin=changed)
    assert code == 0
    assert "ciliumnode/node-1 configured" in out.splitlines()


def test_a_bad_object_is_named_and_the_others_still_go_in(controls: Controls) -> None:
    bad = MANIFESTS.replace("port: 80", "port: 80000")
    code, out, err = run(controls, "apply", "-f", "-", stdin=bad)
    assert code == 1
    assert "namespace/shop created" in out and "ciliumnode/node-1 created" in out
    assert "Service 'web': spec.ports[0].port: 80000 is out of range 1..65535" in err
    assert "stdin (document 2)" in err


def test_get_shows_tables_yaml_and_json(controls: Controls) -> None:
    run(controls, "apply", "-f", "-", stdin=MANIFESTS)
    code, out, _ = run(controls, "get", "svc", "-n", "shop")
    assert code == 0 and out.split()[:5] == ["NAME", "CLUSTER-IP", "PORTS", "GLOBAL", "AGE"]
    assert "web" in out and "http:80/TCP" in out
    code, out, err = run(controls, "get", "svc")
    assert out == "" and "no services found in namespace default" in err
    code, out, _ = run(controls, "get", "services", "-A", "-o", "wide")
    assert out.split()[0] == "NAMESPACE" and "SELECTOR" in out
    code, out, _ = run(controls, "get", "cn", "node-1", "-o", "json")
    assert json.loads(out)["spec"]["addresses"][0]["ip"] == "192.168.0.1"
    code, out, _ = run(controls, "get", "ciliumnodes", "-o", "yaml")
    listed = yaml.safe_load(out)
    assert listed["kind"] == "List" and [i["metadata"]["name"] for i in listed["items"]] == ["node-1"]
    code, _, err = run(controls, "get", "pods")
    assert code == 1 and "unknown resource type 'pods'" in err
    code, _, err = run(controls, "get", "cn", "nope")
    assert code == 1 and "ciliumnodes 'nope' not found" in err


def test_delete_reports_missing_objects(controls: Controls) -> None:
    run(controls, "apply", "-f", "-", stdin=MANIFESTS)
    code, out, _ = run(controls, "delete", "-f", "-", stdin=MANIFESTS)
    assert code == 0
    assert out.splitlines() == ["namespace/shop deleted", "service/web deleted", "ciliumnode/node-1 deleted"]
    code, _, err = run(controls, "delete", "-f", "-", stdin=MANIFESTS)
    assert code == 1 and "service/web not found" in err


def test_manifest_errors_name_the_file(controls: Controls, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed")
    code, _, err = run(controls, "apply", "-f", str(broken))
    assert code == 1 and f"{broken}: not valid YAML" in err
    code, _, err = run(controls, "apply", "-f", str(tmp_path / "missing.yaml"))
    assert code == 1 and "no such file or folder" in err


def test_contexts_are_saved_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "cm" / "config.yaml"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["--config", str(config), "context", "add", "c1", "--endpoints", "https://127.0.0.1:2379",
              "--ca", "ca.crt", "--cert", "c.crt", "--key", "c.key"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    saved = yaml.safe_load(config.read_text())
    assert saved["current-context"] == "c1" and saved["contexts"]["c1"]["endpoints"] == ["https://127.0.0.1:2379"]
    plain = runner.invoke(
        cli, ["--config", str(config), "context", "add", "c2", "--endpoints", "http://127.0.0.1:2379",
              "--ca", "a", "--cert", "b", "--key", "c"],
    )  # fmt: skip
    assert plain.exit_code == 1 and "plaintext" in plain.output
    listed = runner.invoke(cli, ["--config", str(config), "context", "list", "-o", "json"])
    assert json.loads(listed.output)["current"] == "c1"
    missing = runner.invoke(cli, ["--config", str(config), "--context", "nope", "get", "cn"])
    assert missing.exit_code == 1 and "no context 'nope'" in missing.output and "known: c1" in missing.output
    config.write_text("contexts: [oops")
    broken = runner.invoke(cli, ["--config", str(config), "get", "cn"])
    assert broken.exit_code == 1 and "not valid YAML" in broken.output


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"apiVersion: v1\nkind: Namespace\nmetadata: {name: caf\xe9}\n", "not UTF-8 text (byte 51)"),
        (b"\xff\xfe\x00k\x00i\x00n\x00d", "not UTF-8 text (byte 0)"),
        (b"apiVersion: v1\nkind: List\nitems: web\n", "a List's items must be a list of objects, not str"),
        (b"apiVersion: v1\nkind: List\nitems: {name: x}\n", "a List's items must be a list of objects, not dict"),
    ],
)
def test_a_manifest_that_cannot_be_read_is_one_clear_error(
    controls: Controls, tmp_path: Path, content: bytes, words: str
) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_bytes(content)
    for source in ("file", "stdin"):
        if source == "file":
            result = CliRunner().invoke(cli, ["apply", "-f", str(manifest)], obj=controls)
        else:
            result = CliRunner().invoke(cli, ["apply", "-f", "-"], obj=controls, input=content)
        assert result.exit_code == 1, result.output
        assert words in result.stderr, result.stderr
        assert isinstance(result.exception, SystemExit), "an error message, not a traceback"


def test_a_list_whose_items_are_not_objects_names_each_item(controls: Controls) -> None:
    manifest = "apiVersion: v1\nkind: List\nitems:\n- 7\n- {apiVersion: v1, kind: Namespace, metadata: {name: ok}}\n"
    code, out, err = run(controls, "apply", "-f", "-", stdin=manifest)
    assert code == 1
    assert "namespace/ok created" in out
    assert "stdin (document 1, item 0)" in err and "must be a mapping" in err


def test_apply_refuses_a_policy_it_could_not_enforce_naming_the_field(controls: Controls) -> None:
    policy = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress: [{toFQDNs: [{matchName: example.com}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: fine, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]
"""
    code, out, err = run(controls, "apply", "-f", "-", stdin=policy)
    assert code == 1
    assert "networkpolicy/shop/fine created" in out or "networkpolicy/fine created" in out, out
    assert "CiliumNetworkPolicy 'web': spec.egress[0].toFQDNs: DNS-based rules are not supported" in err
