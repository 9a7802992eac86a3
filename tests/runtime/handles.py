"""Small real state handles for the runtime unit tests: inline state files built in memory."""

from __future__ import annotations

from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import (
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    OperatorStateEntry,
    OperatorStateHandle,
    StreamHandle,
)
from keystate.storage.format.statefile import (
    Compression,
)
from keystate.storage.statefile_io import StateFileWriter

JOB_ID = "ab" * 16
ELEMENT = 4
"""Bytes per operator-state element in :func:`operator_handle`."""


def keyed_handle(start: int, end: int) -> KeyedStateHandle:
    """A keyed handle for key groups ``start..end``: one block (one byte) per key group."""
    buf = bytearray()
    writer = StateFileWriter(buf.extend, compression=Compression.NONE)
    offsets: list[int] = []
    for key_group in range(start, end + 1):
        offsets.append(writer.start_block())
        writer.write(bytes([key_group % 256]))
    summary = writer.finish()
    stream = StreamHandle(
        HandleScope.INLINE, summary.size, summary.raw_size, summary.checksum, Compression.NONE, data=bytes(buf)
    )
    return KeyedStateHandle(KeyGroupRange(start, end), tuple(offsets), stream)


def operator_handle(*states: tuple[str, DistributionMode, int]) -> OperatorStateHandle:
    """An operator-state handle with the named list states, each ``(name, mode, element count)``."""
    buf = bytearray()
    writer = StateFileWriter(buf.extend, compression=Compression.NONE)
    entries: list[OperatorStateEntry] = []
    for name, mode, count in states:
        offsets: list[int] = []
        for i in range(count):
            offsets.append(writer.tell())
            writer.write(i.to_bytes(ELEMENT, "big"))
        entries.append(OperatorStateEntry(name, mode, tuple(offsets), "int32"))
    summary = writer.finish()
    stream = StreamHandle(
        HandleScope.INLINE, summary.size, summary.raw_size, summary.checksum, Compression.NONE, data=bytes(buf)
    )
    return OperatorStateHandle(tuple(entries), stream)
