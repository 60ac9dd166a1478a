"""Reachability probes for the lab's pods: a server of TCP and UDP ports, and a client that tries many at once.

Run inside a pod (`clustermesh lab exec LAB c1/x/a -- python -m clustermesh.lab.probe ...`):

    serve --tcp 80,81 --udp 80,81     accept and echo on each port; prints `ready` once every port listens
    check [--timeout S] tcp:IP:PORT udp:IP:PORT ...
                                      one JSON object: target -> true (connected, or the datagram echoed) or false

A policy's drop shows as a timeout (the datapath drops silently), so `check` tries every target concurrently and
takes `--timeout` seconds at most, however many targets are blocked. The network policy tests, the demo and the
bench use it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

__all__ = ["check", "serve"]


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def _echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(tcp: list[int], udp: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await asyncio.start_server(_echo_stream, "0.0.0.0", port, reuse_address=True) for port in tcp]
    for port in udp:
        await loop.create_datagram_endpoint(_Echo, local_addr=("0.0.0.0", port))
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers), asyncio.Event().wait())


class _Reply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answered = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.answered.done():
            self.answered.set_result(True)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: nothing listens there
        if not self.answered.done():
            self.answered.set_result(False)


async def _try(target: str, timeout: float) -> bool:
    protocol, ip, port = target.split(":")
    try:
        async with asyncio.timeout(timeout):
            if protocol == "tcp":
                _, writer = await asyncio.open_connection(ip, int(port))
                writer.close()
                return True
            loop = asyncio.get_running_loop()
            transport, reply = await loop.create_datagram_endpoint(_Reply, remote_addr=(ip, int(port)))
            try:
                transport.sendto(b"probe")
                return bool(await reply.answered)
            finally:
                transport.close()
    except (TimeoutError, OSError):
        return False


async def check(targets: list[str], timeout: float) -> dict[str, bool]:
    results = await asyncio.gather(*(_try(target, timeout) for target in targets))
    return dict(zip(targets, results, strict=True))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m clustermesh.lab.probe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve")
    serving.add_argument("--tcp", default="", help="ports, comma-separated")
    serving.add_argument("--udp", default="", help="ports, comma-separated")
    checking = commands.add_parser("check")
    checking.add_argument("--timeout", type=float, default=1.0)
    checking.add_argument("targets", nargs="+", help="tcp:IP:PORT or udp:IP:PORT")
    args = parser.parse_args(argv)
    if args.command == "serve":

        def ports(text: str) -> list[int]:
            return [int(port) for port in text.split(",") if port]

        asyncio.run(serve(ports(args.tcp), ports(args.udp)))
    else:
        print(json.dumps(asyncio.run(check(args.targets, args.timeout))))


if __name__ == "__main__":
    main(sys.argv[1:])
