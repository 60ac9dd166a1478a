"""A network namespace's cookie: the number the kernel gives it, which the socket load balancer's events carry
(`bpf_get_netns_cookie`), so the agent can tell which pod a connect() came from.

Read with SO_NETNS_COOKIE from a socket made inside the namespace; entering it is `setns(2)` on a thread of its
own, which ends right after, so no other work of the process ever runs in the pod's namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading

__all__ = ["netns_cookie"]

SO_NETNS_COOKIE = 71  # asm-generic/socket.h (Linux 5.14)
CLONE_NEWNET = 0x40000000


def _in_namespace(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {path}: {os.strerror(error)}")
    finally:
        os.close(target)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        value: int = struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        return value


def netns_cookie(path: str) -> int:
    """The cookie of the network namespace at `path` (a /run/netns file or /proc/PID/ns/net); raises OSError."""
    result: list[int] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(_in_namespace(path))
        except BaseException as exc:  # carried to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=work, name="netns-cookie", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
