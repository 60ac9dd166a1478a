"""The bpf(2) system call from Python, through ctypes: maps by fd or pin, element and batch operations.

The only module of the project that issues bpf() calls (DESIGN section 2). No libbpf and no bcc at run time: the
objects are loaded by bpftool (`bpf.loader`); this module reads and writes their maps. Every failure is a
`BpfError` carrying errno and the command's name.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import struct
from collections.abc import Iterator

__all__ = [
    "ANY",
    "BpfError",
    "EXIST",
    "MapFd",
    "MapInfo",
    "NOEXIST",
    "create_map",
    "get_map_fd_by_id",
    "map_info",
    "obj_get",
    "obj_pin",
    "possible_cpus",
]

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
OBJ_PIN, OBJ_GET = 6, 7
MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD = 14, 15
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH, MAP_DELETE_BATCH = 24, 26, 27
_NAMES = {0: "MAP_CREATE", 1: "MAP_LOOKUP_ELEM", 2: "MAP_UPDATE_ELEM", 3: "MAP_DELETE_ELEM", 4: "MAP_GET_NEXT_KEY",
          6: "OBJ_PIN", 7: "OBJ_GET", 14: "MAP_GET_FD_BY_ID", 15: "OBJ_GET_INFO_BY_FD", 24: "MAP_LOOKUP_BATCH",
          26: "MAP_UPDATE_BATCH", 27: "MAP_DELETE_BATCH"}  # fmt: skip

# update flags
ANY, NOEXIST, EXIST = 0, 1, 2

# map types used here
MAP_TYPE_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_HASH, MAP_TYPE_LPM_TRIE = 1, 6, 9, 11
MAP_TYPE_HASH_OF_MAPS, MAP_TYPE_RINGBUF = 13, 27
_PERCPU_TYPES = (5, 6, 10)  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
F_NO_PREALLOC = 1

_ATTR_SIZE = 144


class BpfError(OSError):
    """A bpf() call failed: `errno` and the command say which."""

    def __init__(self, command: int, number: int, what: str = "") -> None:
        name = _NAMES.get(command, str(command))
        super().__init__(number, f"bpf({name}){' ' + what if what else ''}: {os.strerror(number)}")
        self.command = name


def possible_cpus() -> int:
    """How many CPUs a per-CPU map has values for (/sys/devices/system/cpu/possible, e.g. `0-1`)."""
    with open("/sys/devices/system/cpu/possible") as file:
        text = file.read().strip()
    total = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def _call(command: int, attr: ctypes.Array[ctypes.c_char], what: str = "") -> int:
    result = _libc.syscall(_SYS_BPF, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        raise BpfError(command, ctypes.get_errno(), what)
    return int(result)


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


def _address(buffer: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buffer) if buffer is not None else 0


class MapInfo:
    __slots__ = ("flags", "id", "key_size", "max_entries", "name", "type", "value_size")

    def __init__(self, raw: bytes) -> None:
        (self.type, self.id, self.key_size, self.value_size, self.max_entries, self.flags) = struct.unpack_from(
            "<6I", raw, 0
        )
        self.name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(80)
    _call(OBJ_GET_INFO_BY_FD, _attr("<IIQ", fd, ctypes.sizeof(info), _address(info)), "map info")
    return MapInfo(info.raw)


def obj_get(path: str) -> int:
    """A new fd for the object pinned at `path`."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _call(OBJ_GET, _attr("<QII", _address(name), 0, 0), path)


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    _call(OBJ_PIN, _attr("<QII", _address(name), fd, 0), path)


def get_map_fd_by_id(map_id: int) -> int:
    return _call(MAP_GET_FD_BY_ID, _attr("<I", map_id), f"id {map_id}")


def create_map(
    map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int = 0, name: str = ""
) -> int:
    """A new map; its fd (the caller pins it, or hands it to a map of maps, and closes it). The kernel takes names
    of letters, digits, '_' and '.': anything else in `name` becomes '_'."""
    raw_name = re.sub(r"[^A-Za-z0-9_.]", "_", name).encode()[:15]
    return _call(
        MAP_CREATE,
        _attr("<7I16s", map_type, key_size, value_size, max_entries, flags, 0, 0, raw_name),
        name or "map",
    )


class MapFd:
    """One open map: element and batch operations on raw bytes of its key and value sizes."""

    def __init__(self, fd: int, info: MapInfo | None = None) -> None:
        self.fd = fd
        self.info = info or map_info(fd)
        self.key_size = self.info.key_size
        self.value_size = self.info.value_size
        self._batch_update = True
        self._batch_delete = True

    @classmethod
    def pinned(cls, path: str) -> MapFd:
        return cls(obj_get(path))

    @classmethod
    def by_id(cls, map_id: int) -> MapFd:
        return cls(get_map_fd_by_id(map_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MapFd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check(self, key: bytes, value: bytes | None = None) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.info.name}: a key has {self.key_size} bytes, not {len(key)}")
        if value is not None and len(value) != self.value_size:
            raise ValueError(f"map {self.info.name}: a value has {self.value_size} bytes, not {len(value)}")

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None; for a per-CPU map, every CPU's value one after the other (8-byte aligned)."""
        self._check(key)
        raw_key = ctypes.create_string_buffer(key, len(key))
        size = self.value_size
        if self.info.type in _PERCPU_TYPES:
            size = (size + 7) // 8 * 8 * possible_cpus()
        value = ctypes.create_string_buffer(size)
        try:
            _call(MAP_LOOKUP_ELEM, _attr("<IIQQQ", self.fd, 0, _address(raw_key), _address(value), 0))
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        self._check(key, value)
        raw_key = ctypes.create_string_buffer(key, len(key))
        raw_value = ctypes.create_string_buffer(value, len(value))
        _call(MAP_UPDATE_ELEM, _attr("<IIQQQ", self.fd, 0, _address(raw_key), _address(raw_value), flags),
              self.info.name)  # fmt: skip

    def delete(self, key: bytes) -> bool:
        """Whether the key was there."""
        self._check(key)
        raw_key = ctypes.create_string_buffer(key, len(key))
        try:
            _call(MAP_DELETE_ELEM, _attr("<IIQQQ", self.fd, 0, _address(raw_key), 0, 0))
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def all_keys(self) -> Iterator[bytes]:
        """Every key (a map changed meanwhile may skip or repeat one, as the kernel walks it)."""
        current: ctypes.Array[ctypes.c_char] | None = None
        following = ctypes.create_string_buffer(self.key_size)
        while True:
            try:
                _call(MAP_GET_NEXT_KEY, _attr("<IIQQQ", self.fd, 0, _address(current), _address(following), 0))
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            key = following.raw
            yield key
            current = ctypes.create_string_buffer(key, len(key))

    def update_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        """Many updates in one call where the kernel has it for this map type, else one by one."""
        if not items:
            return
        for key, value in items:
            self._check(key, value)
        if self._batch_update:
            keys = ctypes.create_string_buffer(b"".join(key for key, _ in items))
            values = ctypes.create_string_buffer(b"".join(value for _, value in items))
            attr = _attr("<QQQQIIQQ", 0, 0, _address(keys), _address(values), len(items), self.fd, 0, 0)
            try:
                _call(MAP_UPDATE_BATCH, attr, self.info.name)
                return
            except BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: ENOTSUPP, the kernel's own
                    raise
                self._batch_update = False
        for key, value in items:
            self.update(key, value)

    def delete_batch(self, keys: list[bytes]) -> int:
        """Delete many keys (missing ones are skipped); how many were deleted."""
        for key in keys:
            self._check(key)
        deleted = 0
        remaining = list(keys)
        while remaining and self._batch_delete:
            raw = ctypes.create_string_buffer(b"".join(remaining))
            attr = _attr("<QQQQIIQQ", 0, 0, _address(raw), 0, len(remaining), self.fd, 0, 0)
            try:
                _call(MAP_DELETE_BATCH, attr, self.info.name)
                return deleted + len(remaining)
            except BpfError as exc:
                if exc.errno == errno.ENOENT:  # stopped at a missing key: `count` says how many went before it
                    done = struct.unpack_from("<I", attr, 32)[0]
                    deleted += done
                    remaining = remaining[done + 1 :]
                    continue
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, 524):
                    raise
                self._batch_delete = False
        return deleted + sum(1 for key in remaining if self.delete(key))
