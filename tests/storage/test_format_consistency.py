"""What the writer produces, the reader, the model and the loader agree on (gaps found in review)."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import pytest
import xxhash
import zstandard

from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    Compression,
    MetadataError,
    OperatorState,
    StateFileError,
    StateFileReader,
    StateFileWriter,
    TopologyError,
    UnsupportedFormatVersionError,
    open_storage,
)
from keystate.storage.errors import UnsupportedStateFileVersionError
from keystate.storage.format.statefile import (
    BLOCK_HEADER,
    FILE_HEADER,
    BytesSource,
)
from keystate.storage.format.topology import Topology
from keystate.storage.format.validation import safe_relative_path
from keystate.storage.streams import state_file_name


def write_file(chunks: list[bytes], block_size: int = 64, compression: Compression = Compression.ZSTD) -> bytes:
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=compression, block_size=block_size)
    for chunk in chunks:
        writer.write(chunk)
    writer.finish()
    return bytes(out)


def block_sizes(data: bytes) -> list[int]:
    raws: list[int] = []
    offset = FILE_HEADER.size
    while True:
        stored, raw, _ = BLOCK_HEADER.unpack_from(data, offset)
        if stored == 0xFFFFFFFF:
            return raws
        raws.append(raw)
        offset += BLOCK_HEADER.size + stored


def test_a_write_across_the_block_size_keeps_the_remainder_for_the_next_block() -> None:
    data = write_file([b"a" * 100, b"b" * 100, b"c" * 28])  # 228 bytes in blocks of 64
    assert block_sizes(data) == [64, 64, 64, 36]
    assert StateFileReader(BytesSource(data, "t")).read_all() == b"a" * 100 + b"b" * 100 + b"c" * 28


def test_a_huge_write_is_cut_into_full_blocks() -> None:
    payload = bytes(range(256)) * 10  # 2560 bytes
    data = write_file([payload], block_size=1000)
    assert block_sizes(data) == [1000, 1000, 560]
    assert StateFileReader(BytesSource(data, "t")).read_all() == payload


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.NONE])
def test_round_trip_without_extra_copies_is_byte_identical(compression: Compression) -> None:
    chunks = [bytes([i]) * (i * 7 % 150) for i in range(60)]
    data = write_file(chunks, block_size=97, compression=compression)
    assert StateFileReader(BytesSource(data, "t")).read_all() == b"".join(chunks)


def test_bytes_after_the_zstd_frame_are_corruption() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"hello")
    stored = frame + frame  # a valid checksum over two frames: the second must not be ignored
    out = bytearray(FILE_HEADER.pack(b"KSSF", 1, 1, 0))
    out += BLOCK_HEADER.pack(len(stored), 5, xxhash.xxh3_64_intdigest(stored)) + stored
    out += struct.pack(">IIQ", 0xFFFFFFFF, 1, 5)
    with pytest.raises(StateFileError, match="undecodable zstd block"):
        StateFileReader(BytesSource(bytes(out), "t")).read_all()


def test_handle_compression_and_raw_size_must_match_the_file() -> None:
    data = write_file([b"x" * 300])
    with pytest.raises(StateFileError, match="compression 'zstd' but its handle records 'none'"):
        StateFileReader(BytesSource(data, "t"), compression=Compression.NONE).read_all()
    with pytest.raises(StateFileError, match="holds 300 raw bytes but its handle records 301"):
        StateFileReader(BytesSource(data, "t"), raw_size=301).read_all()
    assert StateFileReader(BytesSource(data, "t"), raw_size=300, compression=Compression.ZSTD).verify() == 300


def test_unsupported_state_file_version_is_a_typed_version_error() -> None:
    data = bytearray(write_file([b"x"]))
    struct.pack_into(">H", data, 4, 9)
    with pytest.raises(UnsupportedStateFileVersionError) as info:
        StateFileReader(BytesSource(bytes(data), "t")).read_all()
    assert isinstance(info.value, StateFileError)
    assert isinstance(info.value, UnsupportedFormatVersionError)
    assert not isinstance(info.value, MetadataError)
    assert "format_version 9 is not supported" in str(info.value)


def test_topology_version_errors_are_not_metadata_errors() -> None:
    with pytest.raises(TopologyError) as info:
        Topology.from_json_bytes(b'{"format_version": 3, "operators": []}', "t.json")
    assert isinstance(info.value, UnsupportedFormatVersionError)
    assert not isinstance(info.value, MetadataError)


@pytest.mark.parametrize("hint", ["-op/0/keyed", "+x/~y/=z", "./../a", "op name/ü/…", "", "////"])
def test_state_file_names_are_always_safe_paths(hint: str) -> None:
    name = state_file_name(hint)
    assert safe_relative_path(name, "test") == name


def test_streams_with_unusual_hints_close_and_load(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    writer = storage.begin_checkpoint(uuid.uuid4().hex, 1)
    with writer.open_stream("-weird/+hint") as stream:
        stream.write(os.urandom(50_000))  # incompressible: above the inline threshold
        handle = stream.close()
    assert handle.path is not None
    assert handle.path.startswith("_weird/_hint-")


def _metadata(job_id: str, checkpoint_id: int, kind: CheckpointKind) -> CheckpointMetadata:
    return CheckpointMetadata(checkpoint_id, job_id, kind, 1, (OperatorState("op", 1, 128),))


def test_load_rejects_metadata_from_another_job(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    job, other = uuid.uuid4().hex, uuid.uuid4().hex
    storage.begin_checkpoint(job, 3).commit(_metadata(job, 3, CheckpointKind.CHECKPOINT))
    (tmp_path / other).mkdir()
    (tmp_path / job / "chk-3").rename(tmp_path / other / "chk-3")
    with pytest.raises(MetadataError, match=f"job directory {other} holds a checkpoint of job {job}"):
        storage.load(f"{storage.base}/{other}/chk-3")


def test_load_rejects_a_checkpoint_in_a_savepoint_directory(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    job = uuid.uuid4().hex
    storage.begin_checkpoint(job, 3).commit(_metadata(job, 3, CheckpointKind.CHECKPOINT))
    target = tmp_path / "savepoints" / f"savepoint-{job[:6]}-0123456789ab"
    target.parent.mkdir()
    (tmp_path / job / "chk-3").rename(target)
    with pytest.raises(MetadataError, match="holds a checkpoint, not a savepoint"):
        storage.resolve(f"savepoints/{target.name}")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"uid": "bad\ud800uid"}, "not valid UTF-8"),
        ({"uid": ""}, "1..256 characters"),
        ({"uid": "x" * 300}, "1..256 characters"),
        ({"uid": "tab\there"}, "control characters"),
    ],
)
def test_model_rejects_what_the_parser_rejects(kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(MetadataError, match=fragment):
        OperatorState(kwargs["uid"], 1, 128)


def test_model_rejects_out_of_range_ids_and_timestamps() -> None:
    job = uuid.uuid4().hex
    with pytest.raises(MetadataError, match="invalid checkpoint ID"):
        CheckpointMetadata(1 << 63, job, CheckpointKind.CHECKPOINT, 1, ())
    with pytest.raises(MetadataError, match="timestamp"):
        CheckpointMetadata(1, job, CheckpointKind.CHECKPOINT, -5, ())
