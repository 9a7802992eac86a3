"""What a reader accepts from a state file before decoding it (``ReadLimits``), and what a writer may write.

Every block declares at most 16 MiB of raw bytes (the largest block keystate's writer cuts), a file at
most 4 GiB (configurable on ``CheckpointStorage`` and ``CheckpointConfig``), and no read decodes more
than its handle's ``raw_size``; each is refused with a message that says how to raise the limit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xxhash

from keystate.runtime.config import CheckpointConfig
from keystate.storage import LocalObjectStore
from keystate.storage.checkpoints import CheckpointStorage
from keystate.storage.errors import StateFileError
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    DistributionMode,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    SubtaskState,
)
from keystate.storage.format.statefile import (
    MAX_FILE_RAW,
    MAX_RAW_BLOCK,
    ByteReader,
    BytesSource,
    Compression,
    ReadLimits,
    StateFileEncoder,
    StateFileReader,
    zstd_compressor,
)
from keystate.storage.statefile_io import StateFileWriter

MIB = 1 << 20


def zeros_file(blocks: int, raw_per_block: int) -> bytes:
    """A valid zstd state file: ``blocks`` blocks of ``raw_per_block`` zero bytes (each a tiny frame)."""
    frame = zstd_compressor(1).compress(bytes(raw_per_block))
    digest = xxhash.xxh3_64_intdigest(frame)
    out = bytearray()
    encoder = StateFileEncoder(out.extend, Compression.ZSTD)
    for _ in range(blocks):
        encoder.write_block(frame, raw_per_block, digest)
    encoder.finish(blocks * raw_per_block)
    return bytes(out)


class CountingSource(BytesSource):
    """Counts the bytes handed out, to show what a refusal read first."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, "counted")
        self.handed_out = 0

    def read_range(self, start: int, length: int) -> bytes:
        data = super().read_range(start, length)
        self.handed_out += len(data)
        return data

    def open(self, start: int) -> ByteReader:
        self.handed_out += 1  # opening is already reading
        return super().open(start)


def test_the_default_limits() -> None:
    assert ReadLimits() == ReadLimits(max_block_raw=16 * MIB, max_file_raw=4 << 30)
    assert (MAX_RAW_BLOCK, MAX_FILE_RAW) == (16 * MIB, 4 << 30)
    with pytest.raises(ValueError, match="max_block_raw"):
        ReadLimits(max_block_raw=0)
    with pytest.raises(ValueError, match="max_file_raw"):
        ReadLimits(max_file_raw=-1)


def test_a_block_over_16_mib_is_refused_with_how_to_read_it_anyway() -> None:
    data = zeros_file(1, 16 * MIB + 1)
    with pytest.raises(StateFileError, match=r"over the limit .*ReadLimits\.max_block_raw.*read_limits=ReadLimits"):
        StateFileReader(BytesSource(data, "big")).verify()
    assert StateFileReader(BytesSource(data, "big"), limits=ReadLimits(max_block_raw=32 * MIB)).verify() == 16 * MIB + 1
    assert StateFileReader(BytesSource(zeros_file(1, 16 * MIB), "max")).verify() == 16 * MIB


def test_the_writer_cuts_no_block_a_default_reader_refuses() -> None:
    with pytest.raises(ValueError, match="block_size"):
        StateFileWriter(bytearray().extend, block_size=16 * MIB + 1)
    out = bytearray()
    writer = StateFileWriter(out.extend, block_size=16 * MIB)
    writer.write(bytes(40 * MIB))
    summary = writer.finish()
    assert summary.blocks == 3
    assert StateFileReader(BytesSource(bytes(out), "w")).verify() == 40 * MIB


def test_a_handle_declaring_more_than_the_file_limit_is_refused_before_reading() -> None:
    data = zeros_file(4, MIB)
    source = CountingSource(data)
    limits = ReadLimits(max_file_raw=3 * MIB)
    reader = StateFileReader(source, raw_size=4 * MIB, limits=limits)
    for read in (reader.verify, lambda: list(reader.iter_range_with_offsets(8))):
        with pytest.raises(StateFileError, match=r"records 4194304 raw bytes, over the 3145728-byte limit.*raise it"):
            read()
    assert source.handed_out == 0
    assert StateFileReader(BytesSource(data, "ok"), raw_size=4 * MIB, limits=ReadLimits(max_file_raw=4 * MIB)).verify()


def test_without_a_handle_a_read_stops_at_the_file_limit() -> None:
    data = zeros_file(4, MIB)
    with pytest.raises(StateFileError, match=r"past 3145728 raw bytes.*ReadLimits\.max_file_raw"):
        StateFileReader(BytesSource(data, "f"), limits=ReadLimits(max_file_raw=3 * MIB)).verify()


def test_blocks_decoding_past_the_handles_raw_size_stop_at_the_first_extra_block() -> None:
    """The handle says 1 MiB, the blocks hold 64: the read stops at the second block, not after all 64."""
    data = zeros_file(64, MIB)
    blocks = StateFileReader(BytesSource(data, "f"), raw_size=MIB).iter_blocks()
    assert len(next(blocks)) == MIB
    with pytest.raises(StateFileError, match="more than the 1048576 raw bytes its handle records"):
        next(blocks)


def test_read_limits_come_from_the_checkpoint_storage(tmp_path: Path) -> None:
    storage = CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), read_limits=ReadLimits(max_file_raw=100))
    assert storage.read_limits.max_file_raw == 100
    assert CheckpointStorage(LocalObjectStore(tmp_path, fsync=False)).read_limits == ReadLimits()
    writer = storage.begin_checkpoint("0123456789abcdef0123456789abcdef", 1)
    with writer.open_stream("op/0/operator") as stream:
        stream.write(bytes(101))
        handle = stream.close()
    entry = OperatorStateEntry("s", DistributionMode.SPLIT, (0,), "bytes")
    subtask = SubtaskState(0, operator=(OperatorStateHandle((entry,), handle),))
    operator = OperatorState("op", 1, 128, subtasks=(subtask,))
    metadata = CheckpointMetadata(1, writer.job_id, CheckpointKind.CHECKPOINT, 1, (operator,), CheckpointProperties())
    completed = writer.commit(metadata)
    with pytest.raises(StateFileError, match="over the 100-byte limit"):
        completed.open_state(handle).read_all()
    assert CheckpointConfig().read_limits == ReadLimits()
