"""The CNI plugin as a runtime sees it: its stdout and exit status for each command, run in-process with the CNI
environment and stdin of the test, against agents that are absent, broken, or tiny unix-socket servers here."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent import cni

CNI_VARIABLES = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


@pytest.fixture(autouse=True)
def _clean_cni_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CNI_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a unix socket's path is limited to 107 bytes, and tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="cm-cni-") as directory:
        yield Path(directory)


def run_cni(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str | None, **env: str
) -> tuple[int, dict[str, Any] | None]:
    """Run the plugin's main() once: (exit status, the JSON document on stdout, or None when it wrote nothing).
    `stdin` None: the test set sys.stdin itself."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    status = 0
    try:
        cni.main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr().out
    return status, json.loads(out) if out.strip() else None


def config(socket: Path | str, **extra: Any) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "mesh", "type": "clustermesh-cni", "agentSocket": str(socket),
                       **extra})  # fmt: skip


POD_ENV = {"CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/lab-c1-pod-1-1", "CNI_IFNAME": "eth0"}


def assert_error(document: dict[str, Any] | None, code: int) -> str:
    """A CNI error document (spec 1.0): its code, a message; returns the message."""
    assert document is not None
    assert document["cniVersion"] == "1.0.0"
    assert document["code"] == code, document
    assert isinstance(document["msg"], str)
    assert document["msg"]
    assert "details" in document
    return str(document["msg"])


# --- without an agent


def test_version_lists_the_supported_versions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """VERSION needs no container, netns nor agent: runtimes call it to choose the version they speak."""
    status, document = run_cni(monkeypatch, capsys, '{"cniVersion": "1.0.0"}', CNI_COMMAND="VERSION")
    assert status == 0
    assert document is not None
    assert document["cniVersion"] == "1.0.0"
    assert "1.0.0" in document["supportedVersions"]
    assert "0.4.0" in document["supportedVersions"]


def test_a_configuration_that_is_not_json_is_error_6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, document = run_cni(monkeypatch, capsys, "cniVersion: 1.0.0", CNI_COMMAND="ADD", **POD_ENV)
    assert status == 1
    assert "not JSON" in assert_error(document, 6)


def test_a_configuration_that_is_not_an_object_is_error_6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, document = run_cni(monkeypatch, capsys, '["mesh"]', CNI_COMMAND="ADD", **POD_ENV)
    assert status == 1
    assert "not a JSON object" in assert_error(document, 6)


@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_NETNS"])
def test_add_without_a_required_variable_is_error_4_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path, missing: str
) -> None:
    env = {name: value for name, value in POD_ENV.items() if name != missing}
    status, document = run_cni(monkeypatch, capsys, config(short_dir / "agent.sock"), CNI_COMMAND="ADD", **env)
    assert status == 1
    assert missing in assert_error(document, 4)


def test_an_unknown_command_is_error_4(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    status, document = run_cni(monkeypatch, capsys, config("/nonexistent.sock"), CNI_COMMAND="GC", **POD_ENV)
    assert status == 1
    message = assert_error(document, 4)
    assert "'GC'" in message
    assert "ADD" in message


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_no_agent_listening_is_error_11_naming_the_socket(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path, command: str
) -> None:
    socket = short_dir / "agent.sock"
    status, document = run_cni(monkeypatch, capsys, config(socket), CNI_COMMAND=command, **POD_ENV)
    assert status == 1
    assert assert_error(document, 11) == f"no agent answers at {socket}"


def test_a_stale_socket_file_is_error_11_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    """An agent that died leaves its socket file behind: connecting is refused, not a missing file."""
    import socket as sockets

    path = short_dir / "agent.sock"
    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()  # the file stays, nobody listens
    status, document = run_cni(monkeypatch, capsys, config(path), CNI_COMMAND="ADD", **POD_ENV)
    assert status == 1
    assert assert_error(document, 11) == f"no agent answers at {path}"


# --- against a tiny agent


@asynccontextmanager
async def agent(directory: Path, reply: bytes) -> AsyncIterator[tuple[Path, list[tuple[str, Any]]]]:
    """A unix-socket server that records each request (request line, JSON body) and answers `reply`."""
    path = directory / "agent.sock"
    requests: list[tuple[str, Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(
            int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length")
        )
        requests.append((head.split("\r\n")[0], json.loads(await reader.readexactly(length))))
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield path, requests
    finally:
        server.close()
        await server.wait_closed()


def http(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\r\n".encode() + body


async def test_add_sends_the_pod_to_the_agent_and_prints_its_result(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    result = {"ips": [{"address": "10.1.1.10/32", "gateway": "10.1.1.1", "interface": 0}], "identity": 65792}
    env = {**POD_ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;"
                                  "CLUSTERMESH_LABELS=app:web,tier:front"}  # fmt: skip
    async with agent(short_dir, http("200 OK", json.dumps(result).encode())) as (socket, requests):
        status, document = await asyncio.to_thread(
            run_cni, monkeypatch, capsys, config(socket, cniVersion="0.4.0"), CNI_COMMAND="ADD", **env
        )
    assert status == 0
    assert document == {"cniVersion": "0.4.0", **result}, "the result speaks the configuration's version"
    assert len(requests) == 1
    line, body = requests[0]
    assert line == "POST /v1/cni/add HTTP/1.1"
    assert body == {
        "containerID": "abc123",
        "netns": "/var/run/netns/lab-c1-pod-1-1",
        "ifname": "eth0",
        "namespace": "shop",
        "name": "web-1",
        "labels": {"app": "web", "tier": "front"},
    }


async def test_del_asks_the_agent_and_prints_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    """Without K8S_POD_NAME the pod is named after its container; DEL needs no netns (the pod may be gone)."""
    env = {"CNI_CONTAINERID": "ABCDEF" + "0" * 60}
    async with agent(short_dir, http("200 OK", b"{}")) as (socket, requests):
        status, document = await asyncio.to_thread(
            run_cni, monkeypatch, capsys, config(socket), CNI_COMMAND="DEL", **env
        )
    assert (status, document) == (0, None)
    line, body = requests[0]
    assert line == "POST /v1/cni/del HTTP/1.1"
    assert body["namespace"] == "default"
    assert body["name"] == ("abcdef" + "0" * 34), "a valid pod name: lower case, at most 40 characters"
    assert body["netns"] == ""


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        ("503 Service Unavailable", "starting", 11),  # try again later: the runtime retries
        ("503 Service Unavailable", "unavailable", 11),
        ("400 Bad Request", "invalid", 7),
        ("507 Insufficient Storage", "exhausted", 101),
        ("500 Internal Server Error", "datapath", 100),
        ("503 Service Unavailable", "no-datapath", 103),
        ("500 Internal Server Error", "internal", 104),
    ],
)
async def test_an_agent_that_refuses_add_gives_the_code_of_its_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path, status: str, reason: str,
    code: int,
) -> None:  # fmt: skip
    reply = http(status, json.dumps({"error": "words for people", "reason": reason}).encode())
    async with agent(short_dir, reply) as (socket, _):
        exit_status, document = await asyncio.to_thread(
            run_cni, monkeypatch, capsys, config(socket), CNI_COMMAND="ADD", **POD_ENV
        )
    assert exit_status == 1
    assert assert_error(document, code) == "the agent refused ADD: words for people"
    assert document is not None and document["details"] == reason


async def test_check_reports_the_agents_problems(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    reply = http("409 Conflict", b'{"error": "the node side lxc0 is gone; no route", "reason": "conflict"}')
    async with agent(short_dir, reply) as (socket, _):
        status, document = await asyncio.to_thread(
            run_cni, monkeypatch, capsys, config(socket), CNI_COMMAND="CHECK", **POD_ENV
        )
    assert status == 1
    assert assert_error(document, 102) == "the agent refused CHECK: the node side lxc0 is gone; no route"


@pytest.mark.parametrize(
    ("reply", "what"),
    [(b"HTTP/1.1 500 x\r\n\r\nnot json", "not JSON"), (b"", "not HTTP"), (b"garbage", "not HTTP")],
)
async def test_an_agent_answer_that_is_not_json_is_error_104(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path, reply: bytes, what: str
) -> None:
    """Whatever answers on the socket (an old agent, another program), the runtime gets a CNI error, not a crash."""
    async with agent(short_dir, reply) as (socket, _):
        status, document = await asyncio.to_thread(
            run_cni, monkeypatch, capsys, config(socket), CNI_COMMAND="ADD", **POD_ENV
        )
    assert status == 1
    assert assert_error(document, 104) == f"the agent at {socket} gave an answer that is {what}"


@pytest.mark.parametrize("body", [b"", b"null", b"[]"])
async def test_an_agent_answering_200_without_a_result_object_is_a_cni_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path, body: bytes
) -> None:
    """`{"cniVersion": ..., **answer}` with answer None or a list raises TypeError: a traceback on stderr and no
    CNI error document on stdout, which the runtime cannot report."""
    async with agent(short_dir, http("200 OK", body)) as (socket, _):
        status, document = await asyncio.to_thread(
            run_cni, monkeypatch, capsys, config(socket), CNI_COMMAND="ADD", **POD_ENV
        )
    assert status == 1
    assert_error(document, 104)


@pytest.mark.parametrize("args", ['"labels"', "[1, 2]", '{"labels": ["app"]}', '{"labels": {"app": 1}}'])
def test_configuration_args_that_are_not_an_object_of_labels_are_error_7(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], short_dir: Path, args: str
) -> None:
    conf = json.loads(config(short_dir / "agent.sock"))
    raw = json.dumps(conf)[:-1] + f', "args": {args}}}'
    status, document = run_cni(monkeypatch, capsys, raw, CNI_COMMAND="ADD", **POD_ENV)
    assert status == 1
    assert "args" in assert_error(document, 7)


def test_configuration_that_is_not_utf8_is_error_6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"cniVersion": "\xff\xfe"}'), encoding="utf-8"))
    status, document = run_cni(monkeypatch, capsys, None, CNI_COMMAND="ADD", **POD_ENV)
    assert status == 1
    assert_error(document, 6)


# --- labels


def test_labels_come_from_cni_args() -> None:
    assert cni._labels({}, {"CLUSTERMESH_LABELS": "app:web,tier:db"}) == {"app": "web", "tier": "db"}


def test_labels_come_from_the_configuration_args() -> None:
    assert cni._labels({"args": {"labels": {"app": "web"}}}, {}) == {"app": "web"}


def test_cni_args_add_to_and_override_the_configuration_labels() -> None:
    """The runtime's per-pod CNI_ARGS are more specific than the network's configuration."""
    conf = {"args": {"labels": {"app": "web", "team": "shop"}}}
    labels = cni._labels(conf, {"CLUSTERMESH_LABELS": "app:api,tier:db"})
    assert labels == {"app": "api", "team": "shop", "tier": "db"}
    assert conf["args"]["labels"] == {"app": "web", "team": "shop"}, "the configuration is not changed"


def test_label_pairs_tolerate_empty_parts_values_and_colons() -> None:
    labels = cni._labels({"args": None}, {"CLUSTERMESH_LABELS": "app:web,,flag,url:http://x"})
    assert labels == {"app": "web", "flag": "", "url": "http://x"}


def test_no_labels_anywhere_is_no_labels() -> None:
    assert cni._labels({}, {}) == {}
    assert cni._labels({"args": {}}, {"K8S_POD_NAME": "web"}) == {}


def test_cni_args_are_split_on_semicolons() -> None:
    env = {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web-1;CLUSTERMESH_LABELS=a:b,c:d;junk"}
    assert cni._cni_args(env) == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web-1", "CLUSTERMESH_LABELS": "a:b,c:d"}
