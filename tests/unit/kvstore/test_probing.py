"""The words of a failed connection: what the operating system said, and a name that does not resolve told apart
from an address that does not answer (status shows these; a person acts on them)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

import certs
from kvstore import errors, probing
from kvstore.config import EtcdConfig


@pytest.fixture
def config_for(tmp_path: Path) -> Any:
    ca = certs.create_ca("probe-ca")
    pki = certs.ClusterPKI(tmp_path)
    certs.write_issued(ca, pki.ca)
    certs.write_issued(certs.issue_client(ca, "remote-c1"), pki.user("remote-c1"))
    paths = pki.user("remote-c1")

    def make(endpoint: str) -> EtcdConfig:
        return EtcdConfig([endpoint], pki.ca.cert, paths.cert, paths.key, dial_timeout=2.0)

    return make


async def test_a_name_that_does_not_resolve_is_a_dns_failure(config_for: Any) -> None:
    config = config_for("https://etcd.cm-test.invalid:2379")  # .invalid never resolves (RFC 2606)
    with pytest.raises(errors.NameNotResolved) as caught:
        await probing.probe_endpoint(config, config.parsed[0])
    assert caught.value.reason == "dns"
    assert str(caught.value).startswith("cannot resolve etcd endpoint https://etcd.cm-test.invalid:2379")


@pytest.mark.parametrize(
    ("failure", "words"),
    [
        (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network is unreachable"),
        (OSError("Multiple exceptions: [Errno 113] Connect call failed ('10.9.9.9', 2379)"), "errno 113"),
        (TimeoutError(), "timed out"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
    ],
)
async def test_an_unreachable_endpoint_keeps_the_operating_systems_reason(
    config_for: Any, monkeypatch: pytest.MonkeyPatch, failure: BaseException, words: str
) -> None:
    async def fail(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(asyncio, "open_connection", fail)
    config = config_for("https://10.9.9.9:2379")
    with pytest.raises(errors.EndpointUnreachable) as caught:
        await probing.probe_endpoint(config, config.parsed[0])
    assert caught.value.reason == "unreachable"
    assert str(caught.value).startswith("etcd at https://10.9.9.9:2379 is unreachable: ")
    assert words in str(caught.value)
