"""Hostile and foreign input: every failure is a typed FlinkMetadataError, fast, in bounded memory.

Never IndexError, struct.error, MemoryError, RecursionError or UnicodeError: truncation at every byte,
counts and lengths that lie (2**31 - 1 items in a small file), nesting without end, random byte flips,
unsupported versions, and files that are not Flink's at all.
"""

from __future__ import annotations

import contextlib
import random
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystate.storage.errors import MetadataError, UnsupportedMetadataVersionError
from keystate.storage.format.flink import (
    FlinkMetadataError,
    NotFlinkMetadataError,
    TruncatedFlinkMetadataError,
    UnsupportedFlinkHandleError,
    UnsupportedFlinkMetadataVersionError,
    flink_operator_id,
    looks_like_flink_metadata,
    parse_flink_metadata,
)
from tests.flink import _writer
from tests.flink._samples import checkpoint
from tests.flink._support import NAMES, fixture

MAX_PEAK_BYTES = 4 << 20  # a parse of a 20 KB file allocates well under 100 KB; 2**31 items must not change that
MAX_SECONDS = 5.0  # generous for two busy shared cores; a real parse takes about a millisecond
HUGE = 0x7FFFFFFF


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def parse_bounded(data: bytes) -> FlinkMetadataError | None:
    """Parse under tracemalloc; return the typed error (None if it parsed) after checking time and memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        parse_flink_metadata(data, location="hostile/_metadata")
    except FlinkMetadataError as exc:
        return exc
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MAX_PEAK_BYTES, f"peak {peak} bytes"
        assert elapsed < MAX_SECONDS, f"{elapsed:.2f} s"
    return None


# --- truncation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hashmap-fully-finished", "hashmap-partially-finished-p3"])
def test_truncation_at_every_byte_of_a_real_file(name: str) -> None:
    data = fixture(name).data
    with pytest.raises(NotFlinkMetadataError):
        parse_flink_metadata(data[:0])
    for n in range(1, len(data)):
        with pytest.raises(TruncatedFlinkMetadataError) as caught:
            parse_flink_metadata(data[:n], location=name)
        offset, message = caught.value.offset, str(caught.value)
        assert offset is not None, n
        assert offset <= n, n
        assert message.startswith(f"{name}: "), n
        assert "(at byte " in message, n


@pytest.mark.parametrize("name", ["rocksdb-full", "rocksdb-incremental"])
def test_truncation_at_every_fifth_byte_of_a_rocksdb_file(name: str) -> None:
    data = fixture(name).data
    for n in range(1, len(data), 5):
        with pytest.raises(TruncatedFlinkMetadataError):
            parse_flink_metadata(data[:n])


@pytest.mark.parametrize("version", [3, 6])
def test_truncation_at_every_byte_of_a_synthetic_file_with_every_handle_type(version: int) -> None:
    data = _writer.metadata(checkpoint(version))
    for n in range(1, len(data)):
        with pytest.raises(TruncatedFlinkMetadataError):
            parse_flink_metadata(data[:n])


# --- lying counts and lengths ---------------------------------------------------------------------------

# (fixture, offset, value there, field): count and length fields of the real files, located by the layout.
HUGE_COUNTS = [
    ("hashmap-all-running", 16, 0, "master state count"),
    ("hashmap-all-running", 20, 5, "operator count"),
    ("hashmap-all-running", 108, 64, "key-group count of bounded-keyed-sum subtask 0"),
    ("hashmap-partially-finished-p3", 7965, 16, "coordinator state data length"),
    ("hashmap-partially-finished-p3", 7985, 3, "subtask count of unbounded-source"),
]


def source_reader_offset_count(data: bytes) -> int:
    return data.index(b"\x00\x11SourceReaderState") + 2 + 17 + 1  # utf name, then the mode byte


def rocksdb_shared_file_count(data: bytes) -> int:
    meta_name_end = data.index(b"4529fb30-79ff-45ce-971e-a08edea5c240") + 36
    (meta_length,) = struct.unpack_from(">i", data, meta_name_end)
    return meta_name_end + 4 + int(meta_length)


@pytest.mark.parametrize(("name", "offset", "value", "field"), HUGE_COUNTS, ids=[c[3] for c in HUGE_COUNTS])
def test_a_count_of_2_31_fails_fast_in_bounded_memory(name: str, offset: int, value: int, field: str) -> None:
    data = fixture(name).data
    assert struct.unpack_from(">i", data, offset) == (value,), "the layout moved: fix the offset"
    error = parse_bounded(patched(data, offset, struct.pack(">i", HUGE)))
    assert error is not None, field
    assert "2147483647" in str(error)


@pytest.mark.parametrize(
    ("name", "locate", "value"),
    [
        ("hashmap-all-running", source_reader_offset_count, 1),
        ("rocksdb-incremental", rocksdb_shared_file_count, 7),
    ],
    ids=["operator state offset count", "shared file count"],
)
def test_counts_inside_handles_fail_fast(name: str, locate: Callable[[bytes], int], value: int) -> None:
    data = fixture(name).data
    offset = locate(data)
    assert struct.unpack_from(">i", data, offset) == (value,)
    for lie in (HUGE, -1, -HUGE - 1):
        error = parse_bounded(patched(data, offset, struct.pack(">i", lie)))
        assert error is not None
        assert f"(at byte {offset})" in str(error)


def test_two_to_the_31_items_in_a_100_byte_file() -> None:
    for count_offset in (16, 20):  # master states, operators
        data = patched(_writer.header(6) + bytes(92), count_offset, struct.pack(">i", HUGE))
        assert len(data) == 100
        error = parse_bounded(data)
        assert isinstance(error, TruncatedFlinkMetadataError)


def test_a_lying_string_length() -> None:
    data = fixture("hashmap-all-running").data
    assert data[24:26] == b"\x00\x11"  # utf length of the first operator's name
    error = parse_bounded(patched(data, 24, b"\xff\xff"))
    assert isinstance(error, TruncatedFlinkMetadataError)
    assert "operator #0 > name" in str(error)


def test_patching_any_four_bytes_to_2_31_gives_a_result_or_the_typed_error() -> None:
    data = _writer.metadata(checkpoint(6))  # every handle type, so every kind of count field
    for offset in range(8, len(data) - 3):
        started = time.perf_counter()
        with contextlib.suppress(FlinkMetadataError):
            parse_flink_metadata(patched(data, offset, struct.pack(">i", HUGE)))
        assert time.perf_counter() - started < MAX_SECONDS, offset


# --- nesting --------------------------------------------------------------------------------------------


def single_subtask_file(subtask_body: bytes, version: int = 6) -> bytes:
    """A file with one operator whose subtask 0 is ``subtask_body`` (after its index)."""
    op = _writer.utf("") + _writer.utf("") + bytes.fromhex(flink_operator_id("x"))
    op += _writer.i32(1) + _writer.i32(128) + b"\x00" + _writer.i32(1) + _writer.i32(0) + subtask_body
    body = _writer.i64(1) + _writer.i32(0) + _writer.i32(1) + op
    return _writer.header(version) + body + _writer.java_properties()


def test_stream_handles_nested_without_end_give_the_typed_error() -> None:
    # managed keyed state: type 3 whose delegate is type 3 whose delegate is type 3 ...
    nested = (b"\x03" + _writer.i32(0) + _writer.i32(0)) * 100_000 + b"\x00"
    error = parse_bounded(single_subtask_file(_writer.i32(0) + _writer.i32(0) + nested))
    assert error is not None
    assert "nest deeper" in str(error)


def test_changelog_handles_nested_without_end_give_the_typed_error() -> None:
    level = b"\x0e" + _writer.i32(0) + _writer.i32(0) + _writer.i64(0) + _writer.i32(1)  # CHANGELOG_V2, 1 materialized
    error = parse_bounded(single_subtask_file(_writer.i32(0) + _writer.i32(0) + level * 50_000))
    assert error is not None
    assert "nest deeper" in str(error)


def test_java_objects_nested_without_end_give_the_typed_error() -> None:
    trailer_start = len(_writer.header(4) + _writer.body(1, (), 4))
    good = _writer.header(4) + _writer.body(1, (), 4) + _writer.java_properties()
    # An object whose only field is an object of the same class, referenced by handle, 100 000 deep.
    desc = b"\x72" + _writer.utf("Node") + _writer.i64(1) + b"\x02" + _writer.i16(1) + b"L" + _writer.utf("next")
    desc += b"\x74" + _writer.utf("LNode;") + b"\x78\x70"
    stream = b"\xac\xed\x00\x05\x73" + desc + (b"\x73\x71" + _writer.i32(0x7E0000)) * 100_000 + b"\x70"
    error = parse_bounded(good[:trailer_start] + stream)
    assert error is not None
    assert "nest deeper" in str(error)


# --- structural violations, with messages that say where ------------------------------------------------------


def test_an_unknown_handle_type_byte_is_named() -> None:
    error = parse_bounded(single_subtask_file(_writer.i32(0) + _writer.i32(0) + b"\x12"))
    assert isinstance(error, UnsupportedFlinkHandleError)
    assert error.type_byte == 18
    assert "type byte 18" in str(error)
    assert "subtask 0 > managed keyed state" in str(error)


def test_a_handle_type_in_the_wrong_place_is_named() -> None:
    error = parse_bounded(single_subtask_file(_writer.i32(0) + _writer.i32(0) + b"\x01"))  # a stream as keyed
    assert error is not None
    assert not isinstance(error, UnsupportedFlinkHandleError)
    assert "expected one of 3 (KEY_GROUPS)" in str(error)
    assert "found 1 (BYTE_STREAM)" in str(error)


def metadata_with(*operators: bytes, version: int = 6) -> bytes:
    body = _writer.i64(1) + _writer.i32(0) + _writer.i32(len(operators)) + b"".join(operators)
    return _writer.header(version) + body + _writer.java_properties()


def operator_bytes(
    uid: str, parallelism: int, max_parallelism: int, rest: bytes, coordinator: bytes = b"\x00"
) -> bytes:
    head = _writer.utf("") + _writer.utf(uid) + bytes.fromhex(flink_operator_id(uid))
    return head + _writer.i32(parallelism) + _writer.i32(max_parallelism) + coordinator + rest


EMPTY_SUBTASK = _writer.i32(0) * 2 + b"\x00\x00" + _writer.i32(0) * 2
INLINE_COORDINATOR = b"\x01" + _writer.utf("c") + _writer.i32(1) + b"\x00"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (metadata_with(operator_bytes("a", 1, 1, _writer.i32(0)), operator_bytes("a", 1, 1, _writer.i32(0))),
         "appears twice (first as operator #0)"),
        (metadata_with(operator_bytes("a", 3, 2, _writer.i32(0))), "found parallelism 3 and max parallelism 2"),
        (metadata_with(operator_bytes("a", 0, 2, _writer.i32(0))), "found parallelism 0"),
        (metadata_with(operator_bytes("a", 1, 40000, _writer.i32(0))), "max parallelism 40000"),
        (metadata_with(operator_bytes("a", 2, 2, _writer.i32(1) + _writer.i32(2) + EMPTY_SUBTASK)),
         "subtask 2 (stored as 2) is not below the parallelism 2"),
        (metadata_with(operator_bytes("a", 2, 2, _writer.i32(2) + _writer.i32(-1) + _writer.i32(0) + EMPTY_SUBTASK)),
         "subtask 0 (stored as 0) appears twice"),
        (metadata_with(operator_bytes("a", 1, 1, _writer.i32(-1), INLINE_COORDINATOR)),
         "fully finished operator (count -1) must not have coordinator state"),
        (metadata_with(operator_bytes("a", 1, 1, _writer.i32(0), b"\x02" + _writer.i64(1) + _writer.utf("f"))),
         "expected a ByteStreamStateHandle (type 1), found FileStateHandle"),
        (_writer.header(6) + _writer.i64(-1), "expected a checkpoint id >= 0, found -1"),
        (_writer.header(6) + _writer.i64(1) + _writer.i32(1) + _writer.i32(1) + bytes(40), "expected c9 6b 16 96"),
        (metadata_with(operator_bytes("a", 1, 1, _writer.i32(0)))[:-1] + b"\x00\x00", "found 1 more bytes"),
        (_writer.header(6) + _writer.body(1, (), 6) + b"\xac\xed\x00\x05\x74\x00\x01x", "expected a serialized object"),
        (_writer.header(6) + _writer.body(1, (), 6) + b"\x00\x01\x02\x03", "expected the Java serialization header"),
        (_writer.header(5) + _writer.i64(1) + _writer.i32(0) + _writer.i32(1) + b"\x00\x02\xff\xfe" + bytes(40),
         "operator #0 > name (at byte 24): the 2 bytes are not Java modified UTF-8"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
def test_structural_violations_say_what_and_where(data: bytes, message: str) -> None:
    error = parse_bounded(data)
    assert error is not None
    assert message in str(error)
    assert str(error).startswith("hostile/_metadata: ")
    assert "(at byte " in str(error)


def test_properties_of_another_class_are_refused() -> None:
    good = _writer.java_properties()
    other = good.replace(b"\x00\x38org.apache.flink.runtime.checkpoint.CheckpointProperties",
                         b"\x00\x38org.apache.flink.runtime.checkpoint.CheckpointPropertieX")  # fmt: skip
    error = parse_bounded(_writer.header(4) + _writer.body(1, (), 4) + other)
    assert error is not None
    assert "expected an object of class org.apache" in str(error)


# --- random damage ------------------------------------------------------------------------------------------

FLIPS = st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=12)


def flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), flips=FLIPS, cut=st.integers(min_value=0))
def test_random_byte_flips_in_real_files_give_a_result_or_the_typed_error(
    name: str, flips: list[tuple[int, int]], cut: int
) -> None:
    data = flipped(fixture(name).data, flips)
    for candidate in (data, data[: cut % (len(data) + 1)]):
        with contextlib.suppress(FlinkMetadataError):
            parse_flink_metadata(candidate)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([3, 4, 5, 6]), flips=FLIPS)
def test_random_byte_flips_in_synthetic_files_give_a_result_or_the_typed_error(
    version: int, flips: list[tuple[int, int]]
) -> None:
    data = _writer.metadata(checkpoint(version))
    with contextlib.suppress(FlinkMetadataError):
        parse_flink_metadata(flipped(data, [(8 + p % (len(data) - 8), v) for p, v in flips]))  # keep the header


@settings(max_examples=150, deadline=None)
@given(version=st.sampled_from([3, 4, 5, 6]), body=st.binary(max_size=400))
def test_arbitrary_bytes_after_a_valid_header_give_a_result_or_the_typed_error(version: int, body: bytes) -> None:
    with contextlib.suppress(FlinkMetadataError):
        parse_flink_metadata(_writer.header(version) + body)


# --- versions and foreign files -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 2, 7, 99, -1])
def test_unsupported_versions_are_refused_clearly(version: int) -> None:
    data = _writer.header(version) + fixture("hashmap-fully-finished").data[8:]
    with pytest.raises(UnsupportedFlinkMetadataVersionError) as caught:
        parse_flink_metadata(data, location="ck/chk-3/_metadata")
    error = caught.value
    assert isinstance(error, UnsupportedMetadataVersionError)
    assert isinstance(error, MetadataError)
    assert (error.found, error.supported, error.offset) == (version, (3, 4, 5, 6), 4)
    message = str(error)
    assert message.startswith(f"ck/chk-3/_metadata: Flink _metadata format version {version} (at byte 4)")
    assert ("newer than 2.3" in message) == (version > 6)
    assert looks_like_flink_metadata(data[:8]) == (version > 0)


KEYSTATE_JSON = b'{"format_version": 1, "checkpoint_id": 3, "kind": "checkpoint", "operators": []}\n'


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (KEYSTATE_JSON, "looks like JSON"),
        (b"", "the file is empty"),
        (random.Random(7).randbytes(1000), "expected the magic number 49 60 67 2d"),
        (b"PK\x03\x04" + bytes(100), "found 50 4b 03 04"),
        (b"\x00\x01", "the file is 2 bytes: 00 01"),
    ],
    ids=["keystate JSON", "empty", "random bytes", "zip", "two bytes"],
)
def test_files_that_are_not_flinks_are_refused_clearly(data: bytes, hint: str) -> None:
    assert not looks_like_flink_metadata(data[:8])
    with pytest.raises(NotFlinkMetadataError, match=hint) as caught:
        parse_flink_metadata(data, location="x/_metadata")
    assert isinstance(caught.value, MetadataError)
    assert caught.value.offset == 0


def test_a_bare_magic_number_is_a_truncated_flink_file() -> None:
    data = fixture("hashmap-fully-finished").data
    for n in range(1, 8):
        with pytest.raises(TruncatedFlinkMetadataError):
            parse_flink_metadata(data[:n])
        assert not looks_like_flink_metadata(data[:n])
    assert looks_like_flink_metadata(data[:8])
    assert looks_like_flink_metadata(data)
