"""The state-file format: round trips, ranged reads by block offset, and every kind of damage."""

from __future__ import annotations

import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.storage import LocalObjectStore, MemoryObjectStore
from keystate.storage.errors import ChecksumMismatchError, StateFileError
from keystate.storage.format.statefile import (
    BLOCK_HEADER,
    END_MARKER,
    FILE_HEADER,
    MAGIC,
    MAX_RAW_BLOCK,
    TRAILER,
    BytesSource,
    Compression,
    StateFileReader,
    StateFileSummary,
    format_checksum,
)
from keystate.storage.statefile_io import StateFileWriter, StoreSource

NAME = "memory://test/orders/0/keyed.ksf"


@dataclass
class Written:
    data: bytes
    summary: StateFileSummary
    offsets: list[int]
    """The offset returned by each ``start_block`` call, in order."""


def write(chunks: list[bytes | None], compression: Compression = Compression.ZSTD, block_size: int = 64) -> Written:
    """Write ``chunks`` in order; ``None`` means ``start_block()``."""
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=compression, block_size=block_size)
    offsets: list[int] = []
    for chunk in chunks:
        if chunk is None:
            offsets.append(writer.start_block())
        else:
            writer.write(chunk)
    summary = writer.finish()
    return Written(bytes(out), summary, offsets)


def reader(data: bytes, *, size: int | None = None, checksum: str | None = None) -> StateFileReader:
    return StateFileReader(BytesSource(data, NAME), size=size, checksum=checksum)


def full_reader(w: Written) -> StateFileReader:
    return reader(w.data, size=w.summary.size, checksum=w.summary.checksum)


def payload(i: int, n: int) -> bytes:
    """Deterministic, partly compressible bytes."""
    return (f"record-{i}:".encode() + bytes(range(256)) * (n // 256 + 1))[:n]


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression))
def test_round_trip_many_blocks(compression: Compression) -> None:
    chunks: list[bytes | None] = [payload(i, 37 * i) for i in range(40)]
    w = write(chunks, compression, block_size=100)
    raw = b"".join(c for c in chunks if c is not None)
    assert w.summary.size == len(w.data)
    assert w.summary.raw_size == len(raw)
    assert w.summary.blocks > 100
    assert w.summary.checksum == format_checksum(xxhash.xxh3_64_intdigest(w.data))
    r = full_reader(w)
    blocks = list(r.iter_blocks())
    assert len(blocks) == w.summary.blocks
    assert all(len(b) <= 100 for b in blocks)
    assert b"".join(blocks) == raw
    assert r.read_all() == raw
    assert r.verify() == len(raw)
    assert r.header() is compression
    assert w.data[:4] == MAGIC


def test_zstd_actually_compresses_and_none_stores_raw() -> None:
    raw = b"a" * 10_000
    zstd = write([raw], Compression.ZSTD, block_size=1 << 20)
    none = write([raw], Compression.NONE, block_size=1 << 20)
    assert zstd.summary.size < 200
    assert none.summary.size == FILE_HEADER.size + BLOCK_HEADER.size + len(raw) + TRAILER.size
    assert raw in none.data


@pytest.mark.parametrize("compression", list(Compression))
def test_empty_file(compression: Compression) -> None:
    w = write([], compression)
    assert w.summary == StateFileSummary(FILE_HEADER.size + TRAILER.size, 0, w.summary.checksum, 0)
    assert full_reader(w).read_all() == b""
    assert list(full_reader(w).iter_blocks()) == []


@pytest.mark.parametrize(
    ("sizes", "expected_blocks"),
    [
        ([64], [64]),  # exactly one block
        ([63], [63]),  # one byte short
        ([65], [64, 1]),  # one byte over: the buffer is cut at block_size
        ([128], [64, 64]),
        ([32, 32], [64]),  # two writes fill exactly one block
        ([200], [64, 64, 64, 8]),
    ],
)
def test_block_size_boundaries(sizes: list[int], expected_blocks: list[int]) -> None:
    chunks: list[bytes | None] = [payload(i, n) for i, n in enumerate(sizes)]
    w = write(chunks, Compression.NONE, block_size=64)
    blocks = list(full_reader(w).iter_blocks())
    assert [len(b) for b in blocks] == expected_blocks
    assert b"".join(blocks) == b"".join(c for c in chunks if c is not None)


def test_block_size_must_be_in_bounds() -> None:
    for bad in (0, -1, MAX_RAW_BLOCK + 1):
        with pytest.raises(ValueError, match="block_size"):
            StateFileWriter(bytearray().extend, block_size=bad)


def test_writer_refuses_use_after_finish() -> None:
    writer = StateFileWriter(bytearray().extend)
    writer.write(b"x")
    assert writer.tell() == 1
    writer.finish()
    with pytest.raises(StateFileError):
        writer.write(b"y")
    with pytest.raises(StateFileError):
        writer.finish()


@pytest.mark.parametrize("compression", list(Compression))
def test_start_block_offsets_read_exactly_one_key_group(compression: Compression) -> None:
    groups = [payload(g, 50 * g) for g in range(8)]  # group 0 is empty
    chunks: list[bytes | None] = []
    for group in groups:
        chunks.append(None)
        chunks.append(group)
    w = write(chunks, compression, block_size=64)
    assert w.offsets[0] == FILE_HEADER.size
    assert w.offsets[1] == w.offsets[0], "an empty key group starts where the next one does"
    r = full_reader(w)
    for g, group in enumerate(groups):
        end = w.offsets[g + 1] if g + 1 < len(groups) else None
        assert b"".join(r.iter_range(w.offsets[g], end)) == group
        with_offsets = list(r.iter_range_with_offsets(w.offsets[g], end))
        if with_offsets:
            assert with_offsets[0][0] == w.offsets[g]


def test_ranged_read_touches_only_its_blocks_in_an_object_store(tmp_path: Path) -> None:
    w = write([None, b"a" * 100, None, b"b" * 100, None, b"c" * 100], Compression.ZSTD, block_size=64)
    store = LocalObjectStore(tmp_path, fsync=False)
    store.put("state.ksf", w.data)
    r = StateFileReader(StoreSource(store, "state.ksf"), size=w.summary.size, checksum=w.summary.checksum)
    assert b"".join(r.iter_range(w.offsets[1], w.offsets[2])) == b"b" * 100
    assert r.read_all() == b"a" * 100 + b"b" * 100 + b"c" * 100
    assert r.name == str(tmp_path / "state.ksf")


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=40),
    compression=st.sampled_from(list(Compression)),
    block_size=st.integers(min_value=1, max_value=200),
)
def test_random_writes_and_start_blocks_round_trip(
    ops: list[bytes | None], compression: Compression, block_size: int
) -> None:
    w = write(ops, compression, block_size)
    # Segments between consecutive block boundaries (the file start counts as one).
    segments: list[bytes] = [b""]
    for op in ops:
        if op is None:
            segments.append(b"")
        else:
            segments[-1] += op
    boundaries = [FILE_HEADER.size, *w.offsets]
    assert boundaries == sorted(boundaries)
    r = full_reader(w)
    assert r.read_all() == b"".join(segments)
    assert w.summary.raw_size == sum(map(len, segments))
    for i, segment in enumerate(segments):
        end = boundaries[i + 1] if i + 1 < len(boundaries) else None
        assert b"".join(r.iter_range(boundaries[i], end)) == segment


# --- damage ------------------------------------------------------------------------------------------


def two_key_groups() -> Written:
    return write([None, payload(1, 300), None, payload(2, 300)], Compression.ZSTD, block_size=1000)


@pytest.mark.parametrize("block", [0, 1])
def test_flipped_payload_byte_names_file_and_block_offset(block: int) -> None:
    w = two_key_groups()
    block_offset = w.offsets[block]
    damaged = bytearray(w.data)
    damaged[block_offset + BLOCK_HEADER.size + 3] ^= 0x40
    with pytest.raises(ChecksumMismatchError) as info:
        reader(bytes(damaged), size=w.summary.size).read_all()
    assert NAME in str(info.value)
    assert f"offset {block_offset}" in str(info.value)
    # A ranged read of that key group finds it too (no whole-file checksum involved).
    with pytest.raises(ChecksumMismatchError, match=f"offset {block_offset}"):
        list(reader(bytes(damaged), size=w.summary.size).iter_range(block_offset, w.offsets[1] if block == 0 else None))


def test_flipped_payload_byte_names_the_stored_file(tmp_path: Path) -> None:
    w = two_key_groups()
    damaged = bytearray(w.data)
    damaged[-TRAILER.size - 1] ^= 0xFF  # last payload byte of the last block
    store = MemoryObjectStore("ckpt")
    store.put("job/chk-1/state.ksf", bytes(damaged))
    r = StateFileReader(StoreSource(store, "job/chk-1/state.ksf"), size=w.summary.size)
    with pytest.raises(
        ChecksumMismatchError, match=f"memory://ckpt/job/chk-1/state.ksf: block at offset {w.offsets[1]}"
    ):
        r.verify()


def interesting_cut_points(w: Written) -> dict[str, int]:
    first = w.offsets[0]
    return {
        "empty": 0,
        "inside file header": 5,
        "after file header": FILE_HEADER.size,
        "inside block header": first + 7,
        "after block header": first + BLOCK_HEADER.size,
        "inside payload": first + BLOCK_HEADER.size + 5,
        "after first block": w.offsets[1],
        "inside trailer": len(w.data) - 5,
        "without trailer": len(w.data) - TRAILER.size,
    }


@pytest.mark.parametrize("point", list(interesting_cut_points(two_key_groups())))
def test_truncation_at_interesting_points(point: str) -> None:
    w = two_key_groups()
    cut = w.data[: interesting_cut_points(w)[point]]
    with pytest.raises(StateFileError):
        reader(cut).read_all()  # structure alone finds it, without size or checksum from the handle
    with pytest.raises(StateFileError):
        reader(cut, size=w.summary.size, checksum=w.summary.checksum).read_all()


@pytest.mark.parametrize("compression", list(Compression))
def test_every_truncation_is_detected(compression: Compression) -> None:
    w = write([None, b"x" * 40, None, b"y" * 90, None], compression, block_size=32)
    for n in range(len(w.data)):
        with pytest.raises(StateFileError):
            reader(w.data[:n]).read_all()


def header(magic: bytes = MAGIC, version: int = 1, code: int = 1, flags: int = 0) -> bytes:
    return FILE_HEADER.pack(magic, version, code, flags)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (header(magic=b"PK\x03\x04"), "not a keystate state file"),
        (header(version=3), "version 3 is not supported"),
        (header(version=0), "version 0 is not supported"),
        (header(code=7), "unknown compression code 7"),
        (header(flags=1), "unknown header flags"),
    ],
)
def test_bad_file_header(head: bytes, message: str) -> None:
    w = two_key_groups()
    data = head + w.data[FILE_HEADER.size :]
    with pytest.raises(StateFileError, match=message) as info:
        reader(data).read_all()
    assert NAME in str(info.value)
    with pytest.raises(StateFileError, match=message):
        list(reader(data).iter_range(w.offsets[0], w.offsets[1]))


@pytest.mark.parametrize(
    "data", [b"root:x:0:0:root:/root:/bin/bash\n", b"AKIA\x00\x01SECRETKEY", b"\xff\xfe\x00\x01" * 8, b"KSS"]
)
def test_an_error_never_echoes_the_bytes_it_read(data: bytes) -> None:
    """Regression: a file that is not a state file (reached through a link, in the red team's case
    ``/etc/passwd``) had its first bytes quoted in the message: ``magic b'root'``."""
    with pytest.raises(StateFileError) as info:
        reader(data).read_all()
    message = str(info.value)
    for i in range(len(data) - 2):
        fragment = data[i : i + 3]
        assert repr(fragment)[2:-1] not in message.replace(repr(MAGIC), ""), (fragment, message)
        if fragment.isascii() and fragment.decode().isalnum():
            assert fragment.decode() not in message.replace(NAME, "").replace("KSSF", ""), (fragment, message)


@pytest.mark.parametrize(("count_delta", "raw_delta"), [(1, 0), (-1, 0), (0, 1), (0, -1)])
def test_trailer_disagreeing_with_the_blocks(count_delta: int, raw_delta: int) -> None:
    w = two_key_groups()
    trailer = TRAILER.pack(END_MARKER, w.summary.blocks + count_delta, w.summary.raw_size + raw_delta)
    data = w.data[: -TRAILER.size] + trailer
    with pytest.raises(StateFileError, match="trailer records") as info:
        reader(data, size=len(data)).read_all()
    assert type(info.value) is StateFileError


def test_bytes_after_the_trailer() -> None:
    w = two_key_groups()
    with pytest.raises(StateFileError, match=f"unexpected bytes after the trailer at offset {len(w.data)}"):
        reader(w.data + b"\x00").read_all()


def test_whole_file_checksum_mismatch() -> None:
    w = two_key_groups()
    wrong = format_checksum(xxhash.xxh3_64_intdigest(b"something else"))
    with pytest.raises(ChecksumMismatchError, match="whole-file checksum mismatch") as info:
        reader(w.data, size=w.summary.size, checksum=wrong).read_all()
    assert wrong in str(info.value)


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_handle_size_mismatch(delta: int) -> None:
    w = two_key_groups()
    with pytest.raises(StateFileError) as info:
        reader(w.data, size=w.summary.size + delta).read_all()
    assert str(w.summary.size + delta) in str(info.value)


def block(stored: bytes, raw_len: int, digest: int | None = None) -> bytes:
    return (
        BLOCK_HEADER.pack(len(stored), raw_len, xxhash.xxh3_64_intdigest(stored) if digest is None else digest) + stored
    )


def file_with(block_bytes: bytes, compression: Compression = Compression.ZSTD, blocks: int = 1, raw: int = 0) -> bytes:
    return header(code=compression.code) + block_bytes + TRAILER.pack(END_MARKER, blocks, raw)


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize(("stored_len", "raw_len"), [(0xFFFFFFF0, 10), (10, 0xFFFFFFF0), (MAX_RAW_BLOCK * 2, 5)])
def test_huge_declared_block_length_fails_fast(sized: bool, stored_len: int, raw_len: int) -> None:
    data = header() + BLOCK_HEADER.pack(stored_len, raw_len, 0) + b"\x00" * 32
    tracemalloc.start()
    try:
        with pytest.raises(StateFileError, match=r"over the limit|past the file size") as info:
            reader(data, size=len(data) if sized else None).read_all()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "offset 8" in str(info.value)
    assert peak < 4 << 20, f"reading a hostile header allocated {peak} bytes"


def test_block_within_limits_but_past_the_file_size_is_not_read(tmp_path: Path) -> None:
    data = header() + BLOCK_HEADER.pack(MAX_RAW_BLOCK, MAX_RAW_BLOCK, 0) + b"\x00" * 32
    store = LocalObjectStore(tmp_path, fsync=False)
    store.put("hostile.ksf", data)
    tracemalloc.start()
    try:
        with pytest.raises(StateFileError, match="runs past the file size"):
            StateFileReader(StoreSource(store, "hostile.ksf"), size=len(data)).read_all()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize("declared", [1000, 3])
def test_zstd_frame_disagreeing_with_block_header(declared: int) -> None:
    stored = zstandard.ZstdCompressor().compress(b"z" * declared)
    data = file_with(block(stored, 10), raw=10)
    with pytest.raises(StateFileError, match=f"block declares 10 raw bytes but its frame holds {declared}") as info:
        reader(data).read_all()
    assert "offset 8" in str(info.value)


def test_zstd_frame_without_content_size_is_rejected() -> None:
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(b"q" * 50)
    with pytest.raises(StateFileError, match="frame holds"):
        reader(file_with(block(stored, 50), raw=50)).read_all()


@pytest.mark.parametrize("stored", [b"not a zstd frame at all", b"\x28\xb5\x2f\xfd" + b"\xff" * 12, b"abc"])
def test_checksummed_block_that_is_not_zstd(stored: bytes) -> None:
    data = file_with(block(stored, 24), raw=24)
    with pytest.raises(StateFileError, match="offset 8"):
        reader(data).read_all()


def test_uncompressed_block_with_wrong_raw_length() -> None:
    data = file_with(block(b"abcdef", 7), Compression.NONE, raw=7)
    with pytest.raises(StateFileError, match="block decodes to 6 bytes, header says 7"):
        reader(data).read_all()


@pytest.mark.parametrize("compression", list(Compression))
def test_iter_range_rejects_offsets_off_block_boundaries(compression: Compression) -> None:
    w = write([None, payload(1, 200), None, payload(2, 200), None, payload(3, 200)], compression, block_size=1000)
    r = full_reader(w)
    for start in (0, 3, w.offsets[0] + 1, w.offsets[1] - 1, w.offsets[1] + BLOCK_HEADER.size, w.summary.size + 1):
        with pytest.raises(StateFileError):
            list(r.iter_range(start, w.offsets[2]))
    # The end must be a block boundary too, and may not lie beyond the trailer.
    for end in (w.offsets[2] + 1, w.offsets[2] - 1, w.summary.size):
        with pytest.raises(StateFileError):
            list(r.iter_range(w.offsets[1], end))
    with pytest.raises(StateFileError, match="ends inside a block"):
        list(r.iter_range(w.offsets[1], w.offsets[2] - 1))


def test_iter_range_with_an_empty_range_and_at_the_trailer() -> None:
    w = write([None, b"a" * 10, None], Compression.ZSTD)
    r = full_reader(w)
    assert list(r.iter_range(w.offsets[0], w.offsets[0])) == []
    assert list(r.iter_range(w.offsets[1])) == [], "the last key group is empty: the trailer follows"


def test_reader_over_a_local_file_reports_its_path(tmp_path: Path) -> None:
    w = two_key_groups()
    store = LocalObjectStore(tmp_path, fsync=False)
    store.put("x/s.ksf", w.data[:-3])
    with pytest.raises(StateFileError) as info:
        StateFileReader(StoreSource(store, "x/s.ksf")).read_all()
    assert os.path.join(str(tmp_path), "x", "s.ksf") in str(info.value)
