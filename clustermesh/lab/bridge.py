"""The loopback bridge: each lab cluster's etcd reachable from the host's shell, with no packet to a lab address.

`clustermesh lab env` hands the host a contexts file; its endpoints must not be lab addresses, for the host's own
namespace has a default route out of the machine. So one process per lab listens on 127.0.0.1 (a port per cluster),
in the host's namespace, and then moves into the lab's world namespace: every connection it makes to an etcd is
made from there. A socket keeps the namespace it was made in, so the listeners stay on the host's loopback while
the outgoing connections never touch the host's routes. TLS is end to end (etcd's server certificate names
127.0.0.1); the bridge only copies bytes.

`python -m clustermesh.lab.bridge LAB` runs it; it writes `bridge.json` (its PID and ports) in the lab's state
folder once it listens. `lab down` stops it by that PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from clustermesh.contexts import Context, ContextFile
from clustermesh.lab import netns
from clustermesh.lab.layout import LabError
from clustermesh.lab.state import LabContext, LabState, load

__all__ = ["Bridge", "ensure_bridge", "host_contexts", "running_bridge", "stop_bridge"]

ETCD_PORT = 2379
MARK = "clustermesh.lab.bridge"


class Bridge:
    """The bridge of one lab as its `bridge.json` records it: the process and the loopback port per cluster."""

    def __init__(self, pid: int, ports: dict[str, int]) -> None:
        self.pid = pid
        self.ports = ports

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "bridge.json"


def _is_bridge(pid: int, lab: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return MARK.encode() in argv and lab.encode() in argv


def running_bridge(state_dir: Path, lab: str) -> Bridge | None:
    """The lab's bridge if its process is alive (a PID reused by another process is not it)."""
    try:
        document = json.loads(Bridge.path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    bridge = Bridge(int(document["pid"]), {k: int(v) for k, v in document["ports"].items()})
    return bridge if _is_bridge(bridge.pid, lab) else None


def ensure_bridge(state: LabState, state_dir: Path, timeout: float = 10.0) -> Bridge:
    """The lab's bridge, started (detached, logging to the lab's logs) unless it runs already."""
    found = running_bridge(state_dir, state.name)
    if found is not None and set(found.ports) == set(state.nodes):
        return found
    if found is not None:  # a cluster more or less than when it started
        stop_bridge(state_dir, state.name)
    Bridge.path(state_dir).unlink(missing_ok=True)
    log = (state_dir / "logs" / "bridge.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", MARK, state.name], stdin=subprocess.DEVNULL, stdout=log,
                               stderr=log, start_new_session=True)  # fmt: skip
    log.close()
    deadline = time.monotonic() + timeout
    while (found := running_bridge(state_dir, state.name)) is None or found.pid != process.pid:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = (state_dir / "logs" / "bridge.log").read_text(errors="replace")[-400:]
            raise LabError(f"the loopback bridge of lab {state.name} did not start: {tail or 'no log'}")
        time.sleep(0.05)  # another process binding its ports: bridge.json appearing is all there is to wait on
    return found


def host_contexts(ctx: LabContext) -> Path:
    """A contexts file for the host's shell, a context per cluster (c1, c2, ...) as root of its etcd, reached
    through the lab's loopback bridge (started if it is not running): never a lab address from the host."""
    running = ensure_bridge(ctx.state, ctx.state_dir)
    contexts = ContextFile(ctx.state_dir / "host-contexts.yaml")
    for cluster in ctx.layout.all_clusters():
        config = ctx.config(cluster.index, "root")
        host_kubeconfig = str(ctx.kubeconfig(cluster.index, "host")) if ctx.layout.source == "kubernetes" else None
        contexts.add(Context(cluster.name, [f"https://127.0.0.1:{running.ports[cluster.name]}"],
                             str(config.ca_file), str(config.cert_file), str(config.key_file),
                             relay=str(ctx.relay_socket(cluster.index)), source=ctx.layout.source,
                             kubeconfig=host_kubeconfig))  # fmt: skip
    contexts.current = ctx.layout.cluster(1).name
    contexts.save()
    return contexts.path


def stop_bridge(state_dir: Path, lab: str) -> bool:
    found = running_bridge(state_dir, lab)
    if found is None:
        return False
    netns.stop_processes([found.pid])
    Bridge.path(state_dir).unlink(missing_ok=True)
    return True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.write_eof() if writer.can_write_eof() else writer.close()


async def _serve(listeners: dict[str, tuple[socket.socket, str]]) -> None:
    async def relay(target: str, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            etcd_reader, etcd_writer = await asyncio.wait_for(asyncio.open_connection(target, ETCD_PORT), 10)
        except (OSError, TimeoutError) as exc:
            print(f"bridge: {target}:{ETCD_PORT} unreachable: {exc}", flush=True)
            client_writer.close()
            return
        for writer in (client_writer, etcd_writer):  # gRPC's small frames must not wait on Nagle's algorithm
            connection = writer.get_extra_info("socket")
            if connection is not None:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(client_reader, etcd_writer), _pipe(etcd_reader, client_writer))
        for writer in (client_writer, etcd_writer):
            writer.close()

    servers = []
    for listener, target in listeners.values():

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, target: str = target) -> None:
            await relay(target, r, w)

        servers.append(await asyncio.start_server(handle, sock=listener))
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main(lab: str) -> None:
    state = load(lab)
    layout = state.layout
    listeners: dict[str, tuple[socket.socket, str]] = {}
    for cluster in layout.all_clusters():
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))  # in the host's namespace: this process has not moved yet
        listener.listen(64)
        listeners[cluster.name] = (listener, cluster.control_plane_ip)
    netns.enter(layout.world_netns)  # from here on, every socket made is the lab's
    ports = {name: listener.getsockname()[1] for name, (listener, _) in listeners.items()}
    path = Bridge.path(layout.state_dir)
    path.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "ports": ports}))
    path.with_suffix(".tmp").replace(path)
    print(f"bridge of lab {lab}: {ports}", flush=True)
    asyncio.run(_serve(listeners))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {MARK} LAB")
    main(sys.argv[1])
