"""The state-file writer's compression helpers: the same bytes as inline, errors raised, no threads left."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.storage import CheckpointStorage, MemoryObjectStore, StreamOptions
from keystate.storage.errors import StateFileError
from keystate.storage.format.statefile import (
    BytesSource,
    Compression,
    StateFileReader,
)
from keystate.storage.statefile_io import StateFileWriter

HELPER = "keystate-statefile-compress"


def helpers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(HELPER)]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    assert not helpers()
    yield
    gc.collect()
    for thread in helpers():
        thread.join(timeout=5)
    assert not helpers()


def payload(i: int, n: int) -> bytes:
    return (f"record-{i}:".encode() + bytes(range(256)) * (n // 256 + 1))[:n]


Step = bytes | str  # bytes: write; "start": start_block(); "mark": mark_block()


def run(steps: list[Step], threads: int, block_size: int = 64) -> tuple[bytes, list[int], str, int]:
    """Write ``steps``; returns the file, the offset of every start/mark, the checksum and the block count."""
    out = bytearray()
    writer = StateFileWriter(out.extend, block_size=block_size, threads=threads)
    offsets: list[int] = []
    marks: list[tuple[int, int]] = []
    for step in steps:
        if step == "start":
            offsets.append(writer.start_block())
        elif step == "mark":
            marks.append((len(offsets), writer.mark_block()))
            offsets.append(-1)
        else:
            assert isinstance(step, bytes)
            writer.write(step)
    summary = writer.finish()
    for index, number in marks:
        offsets[index] = writer.block_offset(number)
    assert summary.size == len(out)
    return bytes(out), offsets, summary.checksum, summary.blocks


steps_strategy = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.integers(0, 1000).map(lambda n: payload(n, n)),
        st.sampled_from(["start", "mark"]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, block_size=st.sampled_from([1, 7, 64, 500]))
def test_helpers_write_the_same_bytes_as_inline(steps: list[Step], block_size: int) -> None:
    inline = run([s if s != "mark" else "start" for s in steps], threads=0, block_size=block_size)
    for threads in (0, 1, 2):
        assert run(steps, threads=threads, block_size=block_size) == inline


def test_marks_resolve_to_the_offsets_start_block_returns() -> None:
    steps: list[Step] = []
    for i in range(30):
        steps += ["start", payload(i, 37 * i)]
    inline = run(steps, threads=0)
    marked = run(["mark" if s == "start" else s for s in steps], threads=1)
    assert marked == inline
    reader = StateFileReader(BytesSource(inline[0], "f"), size=len(inline[0]), checksum=inline[2])
    ends = [*inline[1][1:], len(inline[0]) - 16]
    for i, (start, end) in enumerate(zip(inline[1], ends, strict=True)):
        assert b"".join(reader.iter_range(start, end)) == payload(i, 37 * i)


def test_block_offset_is_unknown_until_the_block_is_written() -> None:
    writer = StateFileWriter(bytearray().extend, block_size=64, threads=1)
    writer.write(payload(0, 1000))
    number = writer.mark_block()
    with pytest.raises(StateFileError, match="not known yet"):
        writer.block_offset(number + 5)
    writer.finish()
    assert writer.block_offset(number) > 0


def test_small_files_never_start_a_thread() -> None:
    started: list[int] = []
    writer = StateFileWriter(lambda data: started.append(len(helpers())), block_size=1 << 20, threads=1)
    writer.write(b"x" * 1000)
    writer.start_block()
    writer.write(b"y" * 1000)
    writer.finish()
    assert max(started) == 0


def test_helpers_start_after_a_block_and_stop_at_finish() -> None:
    writer = StateFileWriter(bytearray().extend, block_size=64, threads=2)
    writer.write(payload(1, 64 * 10))
    assert len(helpers()) == 2
    writer.finish()
    assert not helpers()


def write_all(writer: StateFileWriter, count: int) -> None:
    for i in range(count):
        writer.write(payload(i, 150))
    writer.finish()


class Boom(Exception):
    pass


class FailingCompressor:
    """Compresses like zstd until block ``fail_at``, then raises."""

    def __init__(self, fail_at: int) -> None:
        self._inner = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False)
        self._calls = 0
        self._fail_at = fail_at

    def compress(self, data: bytes) -> bytes:
        self._calls += 1
        if self._calls > self._fail_at:
            raise Boom(f"block {self._calls}")
        return self._inner.compress(data)


def test_a_helper_error_is_raised_in_the_writer_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keystate.storage._compression.zstd_compressor", lambda level: FailingCompressor(3))
    writer = StateFileWriter(bytearray().extend, block_size=64, threads=1)
    with pytest.raises(Boom):
        write_all(writer, 100)
    assert not helpers()
    with pytest.raises(StateFileError, match="failed"):
        writer.write(b"more")
    with pytest.raises(StateFileError, match="failed"):
        writer.finish()


def test_a_helper_error_surfaces_at_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keystate.storage._compression.zstd_compressor", lambda level: FailingCompressor(1))
    writer = StateFileWriter(bytearray().extend, block_size=64, threads=1)
    writer.write(payload(0, 64 * 2))  # block 0 inline, block 1 on the helper (its first: fine)
    writer.write(payload(1, 64))  # block 2: the helper's second, which fails
    with pytest.raises(Boom):
        writer.finish()
    assert not helpers()


def test_a_sink_error_stops_the_helpers() -> None:
    calls = 0

    def sink(data: bytes | memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls > 6:
            raise OSError("disk full")

    writer = StateFileWriter(sink, block_size=64, threads=1)
    with pytest.raises(OSError, match="disk full"):
        write_all(writer, 200)
    assert not helpers()


def test_abort_stops_the_helpers_and_writes_nothing_more() -> None:
    out = bytearray()
    writer = StateFileWriter(out.extend, block_size=64, threads=2)
    for i in range(50):
        writer.write(payload(i, 100))
    writer.abort()
    assert not helpers()
    size = len(out)
    writer.abort()
    with pytest.raises(StateFileError, match="aborted"):
        writer.write(b"x")
    with pytest.raises(StateFileError, match="aborted"):
        writer.finish()
    assert len(out) == size


def test_a_dropped_writer_stops_its_helpers() -> None:
    writer = StateFileWriter(bytearray().extend, block_size=64, threads=1)
    writer.write(payload(0, 1000))
    assert helpers()
    del writer
    gc.collect()  # the autouse fixture checks that the helper exits


def test_threads_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="threads"):
        StateFileWriter(bytearray().extend, threads=-1)
    with pytest.raises(ValueError, match="compression_threads"):
        StreamOptions(compression_threads=-1)


def test_uncompressed_files_never_use_helpers() -> None:
    writer = StateFileWriter(bytearray().extend, compression=Compression.NONE, block_size=64, threads=1)
    writer.write(payload(0, 1000))
    assert not helpers()
    writer.finish()


@pytest.mark.parametrize("inline_threshold", [0, 100_000])
def test_streams_write_the_same_bytes_with_and_without_helpers(inline_threshold: int) -> None:
    files: list[bytes] = []
    for threads in (0, 1):
        options = StreamOptions(inline_threshold=inline_threshold, block_size=256, compression_threads=threads)
        storage = CheckpointStorage(MemoryObjectStore(), options=options)
        writer = storage.begin_checkpoint("ab" * 16, 1)
        with writer.open_stream("op/0/keyed") as stream:
            stream.compress_in_background()
            marks = []
            for i in range(40):
                marks.append(stream.mark_block())
                stream.write(payload(i, 300))
            handle = stream.close()
            offsets = [stream.block_offset(m) for m in marks]
        data = handle.data if handle.data is not None else storage.store.get(stream.key)
        files.append(data + str(offsets).encode())
        writer.abort()
    assert files[0] == files[1]


def test_aborting_a_stream_stops_its_helpers() -> None:
    storage = CheckpointStorage(MemoryObjectStore(), options=StreamOptions(inline_threshold=0, block_size=64))
    writer = storage.begin_checkpoint("ab" * 16, 1)
    stream = writer.open_stream("op/0/keyed")
    stream.compress_in_background()
    for i in range(20):
        stream.write(payload(i, 100))
    assert helpers()
    stream.abort()
    assert not helpers()
    writer.abort()


def test_streams_compress_inline_unless_asked() -> None:
    storage = CheckpointStorage(MemoryObjectStore(), options=StreamOptions(inline_threshold=0, block_size=64))
    writer = storage.begin_checkpoint("ab" * 16, 1)
    with writer.open_stream("op/0/operator") as stream:
        stream.write(payload(0, 64 * 20))
        assert not helpers()
        assert stream._file._encoder.blocks == 20  # every block already went to the store
        stream.close()
    writer.abort()


def test_changing_threads_mid_file_keeps_the_bytes() -> None:
    steps: list[Step] = [payload(i, 90) for i in range(60)]
    expected = run(steps, threads=0)
    out = bytearray()
    writer = StateFileWriter(out.extend, block_size=64)
    for i, step in enumerate(steps):
        if i % 15 == 0:
            writer.set_threads([1, 2, 0, 1][i // 15])
        assert isinstance(step, bytes)
        writer.write(step)
    summary = writer.finish()
    assert (bytes(out), summary.checksum, summary.blocks) == (expected[0], expected[2], expected[3])
    with pytest.raises(ValueError, match="threads"):
        writer.set_threads(-1)
