"""Reading the datapath's ring buffer of flow events from Python: the map mmap'ed, no libbpf.

The kernel's BPF ring buffer is one consumer page (read-write: where we have read to), one producer page (where the
kernel has written to), then the data area mapped twice in a row, so that a record that wraps reads as one. Each
record has an 8-byte header: its length, with a busy bit (still being written: stop there) and a discard bit (skip
it). The datapath wakes the reader (the map's fd turns readable) only once much is waiting, so the reader also reads
on a short timer: a burst of events costs one read, not one wakeup each.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import AsyncIterator

from bpf import syscall
from bpf.maps import FLOW_EVENT_SIZE, FlowEvent

__all__ = ["RingReader", "follow_events", "follow_records"]

_BUSY = 1 << 31
_DISCARD = 1 << 30


class RingReader:
    """The records of one ring buffer map, read in order."""

    def __init__(self, fd: int) -> None:
        info = syscall.map_info(fd)
        self.fd = fd
        self.size = info.max_entries  # the data area: a power of two
        self.page = mmap.PAGESIZE
        self._consumer = mmap.mmap(fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, self.page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=self.page)  # fmt: skip
        self.lost = 0

    @classmethod
    def pinned(cls, path: str) -> RingReader:
        return cls(syscall.obj_get(path))

    def read(self) -> list[bytes]:
        """Every complete record there is now."""
        records = []
        consumer = struct.unpack_from("<Q", self._consumer, 0)[0]
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        while consumer < producer:
            offset = self.page + (consumer & (self.size - 1))
            header = struct.unpack_from("<I", self._producer, offset)[0]
            if header & _BUSY:
                break
            length = header & ~(_BUSY | _DISCARD)
            if not header & _DISCARD:
                records.append(self._producer[offset + 8 : offset + 8 + length])
            consumer += (length + 8 + 7) // 8 * 8
            struct.pack_into("<Q", self._consumer, 0, consumer)  # give the space back as we go
        return records

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        os.close(self.fd)


async def follow_records(reader: RingReader, *, every: float = 0.1) -> AsyncIterator[list[bytes]]:
    """Batches of raw records, until cancelled: what is there every `every` seconds, or sooner when the datapath
    wakes the reader (it does so only once much is waiting: one wakeup per event would cost more than the event)."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(reader.fd, readable.set)
    try:
        while True:
            records = reader.read()
            if records:
                yield records
                continue
            readable.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readable.wait(), every)
    finally:
        loop.remove_reader(reader.fd)


async def follow_events(reader: RingReader, *, every: float = 0.1) -> AsyncIterator[list[FlowEvent]]:
    """Batches of flow events, decoded."""
    async for records in follow_records(reader, every=every):
        yield [FlowEvent.decode(record) for record in records if len(record) >= FLOW_EVENT_SIZE]
