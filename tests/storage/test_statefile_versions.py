"""State-file format versions: version 2 stores a block raw when zstd does not shrink it; version 1 still reads.

The golden files under ``golden/`` pin both: ``statefile_v1_*.ksf`` were written by the writer before
version 2 (a zstd file of version 1 holds a block whose frame is exactly as long as its raw bytes: it
must still be decompressed, not taken as raw), ``statefile_v2_zstd.ksf`` by the current writer. Each has
a ``.json`` beside it with what a reader must find: sizes, checksum, block offsets, stored lengths and the
raw bytes of every block. Golden files are only ever added, never rewritten.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import xxhash
import zstandard

from keystate.storage.errors import StateFileError
from keystate.storage.format.statefile import (
    BLOCK_HEADER,
    FILE_HEADER,
    MAGIC,
    TRAILER,
    BytesSource,
    Compression,
    StateFileEncoder,
    StateFileReader,
    zstd_compressor,
)
from keystate.storage.statefile_io import StateFileWriter

GOLDEN = Path(__file__).parent / "golden"
OVERHEAD = FILE_HEADER.size + TRAILER.size
"""Fixed bytes of every state file: the file header and the trailer (each block adds its 16-byte header)."""


def golden(name: str) -> tuple[bytes, dict[str, Any]]:
    expected: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text())
    return (GOLDEN / f"{name}.ksf").read_bytes(), expected


def block_headers(data: bytes) -> list[tuple[int, int]]:
    """``(stored length, raw length)`` of every block of a well-formed state file."""
    out: list[tuple[int, int]] = []
    pos = FILE_HEADER.size
    while True:
        stored, raw, _ = BLOCK_HEADER.unpack_from(data, pos)
        if stored == 0xFFFFFFFF:
            return out
        out.append((stored, raw))
        pos += BLOCK_HEADER.size + stored


@pytest.mark.parametrize("name", ["statefile_v1_zstd", "statefile_v1_none", "statefile_v2_zstd"])
def test_golden_state_files_read_as_recorded(name: str) -> None:
    data, expected = golden(name)
    compression = Compression(expected["compression"])
    raw_blocks = [bytes.fromhex(h) for h in expected["raw_blocks_hex"]]
    assert len(data) == expected["size"]
    assert [s for s, _ in block_headers(data)] == expected["stored_lengths"]

    def reader() -> StateFileReader:
        return StateFileReader(
            BytesSource(data, name),
            size=expected["size"],
            checksum=expected["checksum"],
            raw_size=expected["raw_size"],
            compression=compression,
        )

    assert list(reader().iter_blocks()) == raw_blocks
    assert reader().read_all() == b"".join(raw_blocks)
    assert reader().verify() == expected["raw_size"]
    offsets = [*expected["offsets"], None]
    for i, raw in enumerate(raw_blocks):
        assert list(reader().iter_range_with_offsets(offsets[i], offsets[i + 1])) == [(offsets[i], raw)]


def test_a_version_1_block_as_long_as_its_raw_bytes_is_still_a_zstd_frame() -> None:
    data, expected = golden("statefile_v1_zstd")
    assert data[4:6] == b"\x00\x01"
    stored, raw = block_headers(data)[2]
    assert stored == raw == 17, "the golden file holds the case this test is about"
    start = expected["offsets"][2] + BLOCK_HEADER.size
    payload = data[start : start + stored]
    assert payload.startswith(b"\x28\xb5\x2f\xfd"), "a zstd frame"
    blocks = StateFileReader(BytesSource(data, "v1")).iter_range(expected["offsets"][2], expected["offsets"][3])
    assert list(blocks) == [bytes.fromhex(expected["raw_blocks_hex"][2])]


def test_the_writer_still_writes_files_without_compression_as_version_1_byte_for_byte() -> None:
    data, expected = golden("statefile_v1_none")
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=Compression.NONE)
    for raw in expected["raw_blocks_hex"]:
        writer.start_block()
        writer.write(bytes.fromhex(raw))
    writer.finish()
    assert bytes(out) == data


def test_a_zstd_file_is_version_2_and_keeps_blocks_zstd_does_not_shrink_raw() -> None:
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=Compression.ZSTD)
    writer.write(b"xyz")
    writer.start_block()
    writer.write(b"hello, keystate! " * 4)
    summary = writer.finish()
    data = bytes(out)
    assert data[:8] == FILE_HEADER.pack(MAGIC, 2, Compression.ZSTD.code, 0)
    (tiny_stored, tiny_raw), (big_stored, big_raw) = block_headers(data)
    assert (tiny_stored, tiny_raw) == (3, 3), "a 12-byte zstd frame for 3 bytes is not written"
    assert data[FILE_HEADER.size + BLOCK_HEADER.size : FILE_HEADER.size + BLOCK_HEADER.size + 3] == b"xyz"
    assert big_stored < big_raw, "a block that compresses is compressed"
    assert summary.size == OVERHEAD + 2 * BLOCK_HEADER.size + tiny_stored + big_stored
    assert StateFileReader(BytesSource(data, "v2"), size=summary.size, checksum=summary.checksum).read_all() == (
        b"xyz" + b"hello, keystate! " * 4
    )


@pytest.mark.parametrize("threads", [0, 2])
def test_helper_threads_store_incompressible_blocks_raw_too(threads: int) -> None:
    incompressible = random.Random(5).randbytes(4096)
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=Compression.ZSTD, block_size=1024, threads=threads)
    writer.write(b"a" * 4096)  # compresses
    writer.write(incompressible)  # does not
    summary = writer.finish()
    data = bytes(out)
    headers = block_headers(data)
    assert all(stored <= raw for stored, raw in headers)
    assert any(stored == raw for stored, raw in headers)
    assert any(stored < raw for stored, raw in headers)
    assert StateFileReader(BytesSource(data, "t"), checksum=summary.checksum).read_all() == b"a" * 4096 + incompressible


def _v2_file(payload: bytes, raw_len: int) -> bytes:
    out = bytearray()
    encoder = StateFileEncoder(out.extend, Compression.ZSTD)
    encoder.write_block(payload, raw_len, xxhash.xxh3_64_intdigest(payload))
    encoder.finish(raw_len)
    assert out[4:6] == b"\x00\x02"
    return bytes(out)


def test_a_version_2_block_stored_larger_than_raw_is_refused() -> None:
    frame = zstd_compressor(1).compress(b"xyz")
    assert len(frame) > 3
    with pytest.raises(StateFileError, match="stores 12 bytes for 3 raw bytes"):
        StateFileReader(BytesSource(_v2_file(frame, 3), "v2")).read_all()


def test_a_version_2_block_as_long_as_raw_is_raw_even_if_it_looks_like_a_frame() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 100)
    data = _v2_file(frame, len(frame))
    assert StateFileReader(BytesSource(data, "v2")).read_all() == frame
