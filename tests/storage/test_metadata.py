"""``_metadata`` format version 1: golden files pin the bytes; the model's invariants and derived values.

Version 1 stays readable (and ``dump_v1`` still writes it byte for byte); new checkpoints are written as
version 2, whose samples are built here too (``incremental_metadata``, ``savepoint_v2_metadata``) and whose
tests are in ``test_metadata_v2.py``.

Regenerate the golden files after an intended format change with ``KEYSTATE_REGEN_GOLDEN=1``; the run
that rewrites a file still fails, so a changed format is never accepted silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    CheckpointStatistics,
    Compression,
    DistributionMode,
    HandleScope,
    InputEdge,
    KeyedStateHandle,
    KeyGroupRange,
    MetadataError,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    OperatorStatistics,
    OperatorStatus,
    Partitioning,
    StateFileWriter,
    StreamHandle,
    SubtaskState,
    UnsafePathError,
    UnsupportedFormatVersionError,
)
from keystate.storage.format import dump_metadata, parse_metadata
from keystate.storage.format._metadata_v1 import dump_v1
from keystate.storage.format.statefile import (
    format_checksum,
)

GOLDEN = Path(__file__).parent / "golden"
JOB = "0123456789abcdef0123456789abcdef"
WHERE = "memory://golden/chk-42/_metadata"


# --- a representative checkpoint and savepoint, built in code ---------------------------------------


def inline_stream(groups: list[bytes]) -> tuple[StreamHandle, tuple[int, ...]]:
    """A real (uncompressed, so byte-stable) state file held inline, and its key-group offsets."""
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=Compression.NONE)
    offsets = []
    for group in groups:
        offsets.append(writer.start_block())
        writer.write(group)
    s = writer.finish()
    return StreamHandle(HandleScope.INLINE, s.size, s.raw_size, s.checksum, Compression.NONE, data=bytes(out)), tuple(
        offsets
    )


def file_stream(scope: HandleScope, path: str, size: int, raw_size: int) -> StreamHandle:
    checksum = format_checksum(xxhash.xxh3_64_intdigest(path.encode()))
    return StreamHandle(scope, size, raw_size, checksum, Compression.ZSTD, path=path)


def checkpoint_operators() -> tuple[OperatorState, ...]:
    keyed_inline, inline_offsets = inline_stream([b"k4=1;k4b=2", b"k5=\xff\x00"])
    rules, _ = inline_stream([b'{"a":1}{"b":2}'])
    exclusive = file_stream(HandleScope.EXCLUSIVE, "totals/0/keyed-3f9a0c1d2e4b5a69.ksf", 1000, 3000)
    shared = file_stream(HandleScope.SHARED, "totals/1/keyed-77e1c0ffee000001.ksf", 500, 900)
    orders_state = file_stream(HandleScope.EXCLUSIVE, "orders/1/operator-0a1b2c3d4e5f6071.ksf", 120, 48)
    sink_state = file_stream(HandleScope.EXCLUSIVE, "sink/0/operator-1111222233334444.ksf", 40, 0)
    return (
        OperatorState("source", 2, 128, fully_finished=True),
        OperatorState(
            "orders",
            2,
            128,
            (InputEdge("source", Partitioning.FORWARD),),
            subtasks=(
                SubtaskState(0, finished=True),
                SubtaskState(
                    1,
                    operator=(
                        OperatorStateHandle(
                            (
                                OperatorStateEntry("offsets", DistributionMode.SPLIT, (0, 12, 24), "int64"),
                                OperatorStateEntry("zählerstand", DistributionMode.UNION, (36,), "utf8"),
                            ),
                            orders_state,
                        ),
                    ),
                ),
            ),
        ),
        OperatorState(
            "totals",
            4,
            8,
            (InputEdge("orders", Partitioning.HASH),),
            subtasks=(
                SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 1), (8, 400), exclusive),)),
                SubtaskState(
                    1,
                    keyed=(KeyedStateHandle(KeyGroupRange(2, 3), (8, 8), shared),),
                    operator=(
                        OperatorStateHandle(
                            (OperatorStateEntry("rules", DistributionMode.BROADCAST, (0, 7), "json"),), rules
                        ),
                    ),
                ),
                SubtaskState(2, keyed=(KeyedStateHandle(KeyGroupRange(4, 5), inline_offsets, keyed_inline),)),
                # subtask 3 has no state at all: it is simply absent
            ),
        ),
        OperatorState("audit", 2, 128, (InputEdge("totals", Partitioning.RESCALE),)),
        OperatorState(
            "sink",
            1,
            128,
            (InputEdge("totals", Partitioning.REBALANCE), InputEdge("orders", Partitioning.BROADCAST)),
            subtasks=(
                SubtaskState(
                    0,
                    operator=(
                        OperatorStateHandle(
                            (OperatorStateEntry("pending-transactions", DistributionMode.SPLIT, (), "json"),),
                            sink_state,
                        ),
                    ),
                ),
            ),
        ),
    )


def checkpoint_metadata() -> CheckpointMetadata:
    return CheckpointMetadata(42, JOB, CheckpointKind.CHECKPOINT, 1_700_000_000_000, checkpoint_operators())


def savepoint_metadata() -> CheckpointMetadata:
    keyed_inline, offsets = inline_stream([b"a", b"", b"ccc", b"d"])
    exclusive = file_stream(HandleScope.EXCLUSIVE, "totals/0/keyed-0000000000000001.ksf", 64, 64)
    operators = (
        OperatorState("source", 1, 128, fully_finished=True),
        OperatorState(
            "totals",
            2,
            8,
            (InputEdge("source", Partitioning.HASH),),
            subtasks=(
                SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 3), (8, 8, 8, 20), exclusive),)),
                SubtaskState(1, keyed=(KeyedStateHandle(KeyGroupRange(4, 7), offsets, keyed_inline),)),
            ),
        ),
    )
    return CheckpointMetadata(
        43,
        JOB,
        CheckpointKind.SAVEPOINT,
        1_700_000_060_000,
        operators,
        CheckpointProperties(synchronous=True, drain=True),
    )


# --- version 2: the same checkpoint, incremental, with statistics -------------------------------------

BASE_WRITTEN_BY = 40
"""The sample's incremental handle: a base written by checkpoint 40, deltas by 41 and 42 (this checkpoint)."""


def shared_stream(path: str, size: int, raw_size: int, written_by: int) -> StreamHandle:
    checksum = format_checksum(xxhash.xxh3_64_intdigest(path.encode()))
    return StreamHandle(
        HandleScope.SHARED, size, raw_size, checksum, Compression.ZSTD, path=path, written_by=written_by
    )


def incremental_operators() -> tuple[OperatorState, ...]:
    """Version 1's sample operators, made incremental: totals subtask 1's shared handle is a base with two
    deltas, audit's subtask 0 a base this checkpoint just wrote (a materialization), and statistics."""
    source, orders, totals, audit, sink = checkpoint_operators()
    base = totals.subtasks[1].keyed[0]
    deltas = (
        KeyedStateHandle(base.key_groups, (8, 60), shared_stream("totals/1/delta-77e1c0ffee000002.ksf", 120, 260, 41)),
        KeyedStateHandle(base.key_groups, (8, 8), shared_stream("totals/1/delta-77e1c0ffee000003.ksf", 90, 150, 42)),
    )
    incremental = KeyedStateHandle(
        base.key_groups,
        base.offsets,
        shared_stream(str(base.stream.path), base.stream.size, base.stream.raw_size, BASE_WRITTEN_BY),
        deltas,
    )
    subtasks = list(totals.subtasks)
    subtasks[1] = SubtaskState(1, keyed=(incremental,), operator=subtasks[1].operator)
    materialized = shared_stream("audit/0/keyed-aa00bb11cc22dd33.ksf", 700, 2100, 42)
    return (
        source,
        OperatorState(
            orders.uid, orders.parallelism, orders.max_parallelism, orders.inputs, subtasks=orders.subtasks,
            statistics=OperatorStatistics(3, 41, 0, 2, end_to_end_duration_ms=48),
        ),
        OperatorState(
            totals.uid, totals.parallelism, totals.max_parallelism, totals.inputs, subtasks=tuple(subtasks),
            statistics=OperatorStatistics(5, 130, 17, 4, end_to_end_duration_ms=171),
        ),
        OperatorState(
            audit.uid, audit.parallelism, audit.max_parallelism, audit.inputs,
            subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 1), (8, 300), materialized),)),),
            statistics=OperatorStatistics(1, 60, 2, 2),
        ),
        sink,  # no statistics recorded: "statistics": null
    )  # fmt: skip


def incremental_metadata() -> CheckpointMetadata:
    return CheckpointMetadata(
        42,
        JOB,
        CheckpointKind.CHECKPOINT,
        1_700_000_000_000,
        incremental_operators(),
        statistics=CheckpointStatistics(250),
    )


def savepoint_v2_metadata() -> CheckpointMetadata:
    sp = savepoint_metadata()
    source, totals = sp.operators
    totals = OperatorState(
        totals.uid,
        totals.parallelism,
        totals.max_parallelism,
        totals.inputs,
        subtasks=totals.subtasks,
        statistics=OperatorStatistics(2, 75, 0, 2),
    )
    return CheckpointMetadata(
        sp.checkpoint_id,
        sp.job_id,
        sp.kind,
        sp.timestamp,
        (source, totals),
        sp.properties,
        CheckpointStatistics(90),
    )


SAMPLES: dict[str, Callable[[], CheckpointMetadata]] = {
    "metadata_v1_checkpoint.json": checkpoint_metadata,
    "metadata_v1_savepoint.json": savepoint_metadata,
}
"""Version-1 golden files: read by ``parse_metadata``, written by ``dump_v1``."""


def golden_bytes(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


# --- golden files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_serialization_matches_the_golden_file_byte_for_byte(name: str) -> None:
    actual = dump_v1(SAMPLES[name]())
    path = GOLDEN / name
    if os.environ.get("KEYSTATE_REGEN_GOLDEN") == "1" and (not path.exists() or path.read_bytes() != actual):
        path.write_bytes(actual)
        pytest.fail(f"regenerated {path}; review the diff and rerun without KEYSTATE_REGEN_GOLDEN")
    assert actual == path.read_bytes(), f"the metadata format changed; see {path} (KEYSTATE_REGEN_GOLDEN=1)"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_golden_file_parses_back_to_an_equal_object(name: str) -> None:
    data = golden_bytes(name)
    parsed = parse_metadata(data, WHERE)
    assert parsed == SAMPLES[name]()
    assert dump_v1(parsed) == data
    assert not parsed.is_incremental
    assert parsed.statistics is None
    assert all(op.statistics is None for op in parsed.operators)


def test_golden_files_hold_what_the_format_promises() -> None:
    doc = json.loads(golden_bytes("metadata_v1_checkpoint.json"))
    assert doc["format_version"] == 1
    totals = doc["operators"][2]
    scopes = [k["stream"]["scope"] for st in totals["subtasks"] for k in st["keyed"]]
    assert scopes == ["exclusive", "shared", "inline"]
    assert [st["index"] for st in totals["subtasks"]] == [0, 1, 2]
    assert doc["operators"][1]["subtasks"][0] == {"index": 0, "finished": True}
    assert doc["operators"][0]["fully_finished"] is True
    assert doc["operators"][0]["subtasks"] == []
    assert "zählerstand".encode() in golden_bytes("metadata_v1_checkpoint.json"), "UTF-8, not \\u escapes"
    sp = json.loads(golden_bytes("metadata_v1_savepoint.json"))
    assert sp["kind"] == "savepoint"
    assert sp["properties"] == {"synchronous": True, "drain": True}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_truncation_of_a_golden_file_is_rejected(name: str) -> None:
    text = golden_bytes(name).rstrip(b"\n")
    # The trailing newline is whitespace: the document without it is still complete.
    assert parse_metadata(text, WHERE) == SAMPLES[name]()
    for n in range(len(text)):
        with pytest.raises(MetadataError) as info:
            parse_metadata(text[:n], WHERE)
        assert WHERE in str(info.value)


# --- bytes that are not a metadata document -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b" \n\t", "empty"),
        (b"\x00\x01\x02", "not valid JSON"),
        (b"PK\x03\x04 zip file", "not valid JSON"),
        (b'{"format_version": 1, \xff}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object, found list"),
        (b'"just a string"', "must be a JSON object, found str"),
        (b"null", "must be a JSON object"),
        (b"{}", "'format_version' is missing"),
        (b'{"checkpoint_id": 1}', "'format_version' is missing"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"format_version": 1, "operators": ' + b"[" * 100_000, "not valid JSON"),
        (b'{"format_version": 1, "operators": ' + b"{" * 100_000, "not valid JSON"),
        (b'{"format_version": 1, "format_version": 1}', "duplicate key 'format_version'"),
        (b'{"format_version": NaN}', "NaN is not valid JSON"),
        (b'{"format_version": 1, "timestamp": Infinity}', "Infinity is not valid JSON"),
        (b'{"format_version": -Infinity}', "Infinity is not valid JSON"),
        (b'{"format_version": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_not_a_metadata_document(data: bytes, message: str) -> None:
    with pytest.raises(MetadataError, match=message) as info:
        parse_metadata(data, WHERE)
    assert str(info.value).startswith(WHERE)


def test_duplicate_key_inside_the_document() -> None:
    data = golden_bytes("metadata_v1_checkpoint.json").replace(
        b'"kind":"checkpoint"', b'"kind":"checkpoint","kind":"x"'
    )
    with pytest.raises(MetadataError, match="duplicate key 'kind'"):
        parse_metadata(data, WHERE)


def test_float_overflow_is_not_an_integer() -> None:
    data = golden_bytes("metadata_v1_checkpoint.json").replace(b'"timestamp":1700000000000', b'"timestamp":1e400')
    with pytest.raises(MetadataError, match="field 'timestamp' must be an integer, found inf"):
        parse_metadata(data, WHERE)


@pytest.mark.parametrize("version", [3, 0, -1, 99, "1", "2", True, False, None, 1.0, 2.0, [1], {"v": 1}])
def test_unsupported_format_version(version: object) -> None:
    doc = json.loads(golden_bytes("metadata_v1_checkpoint.json"))
    doc["format_version"] = version
    with pytest.raises(UnsupportedFormatVersionError) as info:
        parse_metadata(json.dumps(doc).encode(), WHERE)
    assert "format_version" in str(info.value)
    assert info.value.found == version
    assert info.value.supported == (1, 2)
    assert info.value.where == WHERE


def test_document_over_the_size_limit_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = golden_bytes("metadata_v1_checkpoint.json")
    monkeypatch.setattr("keystate.storage.format.validation.MAX_DOCUMENT_BYTES", len(data) - 1)
    with pytest.raises(MetadataError, match=f"over the {len(data) - 1}-byte limit"):
        parse_metadata(data, WHERE)
    monkeypatch.setattr("keystate.storage.format.validation.MAX_DOCUMENT_BYTES", len(data))
    assert parse_metadata(data, WHERE) == checkpoint_metadata()


# --- derived values -----------------------------------------------------------------------------------


def test_operator_status_finished_subtasks_and_state_bytes() -> None:
    m = checkpoint_metadata()
    source, orders, totals, audit, sink = (m.operator(uid) for uid in ("source", "orders", "totals", "audit", "sink"))
    assert source is not None
    assert orders is not None
    assert totals is not None
    assert audit is not None
    assert sink is not None
    assert [op.status for op in (source, orders, totals, audit, sink)] == [
        OperatorStatus.FULLY_FINISHED,
        OperatorStatus.PARTIALLY_FINISHED,
        OperatorStatus.RUNNING,
        OperatorStatus.RUNNING,
        OperatorStatus.RUNNING,
    ]
    assert source.finished_subtasks == [0, 1]
    assert orders.finished_subtasks == [0]
    assert totals.finished_subtasks == []
    assert source.state_bytes == 0
    assert not source.has_state
    assert orders.state_bytes == 120
    inline_sizes = sum(h.size for h in totals.handles() if h.scope is HandleScope.INLINE)
    assert inline_sizes > 0
    assert totals.state_bytes == 1000 + 500 + inline_sizes
    assert sink.state_bytes == 40
    assert m.total_state_bytes == 120 + totals.state_bytes + 40
    assert totals.has_keyed_state
    assert not orders.has_keyed_state
    assert orders.uses_union_state()
    assert not totals.uses_union_state()
    assert not sink.uses_union_state()
    assert not source.uses_union_state()
    assert totals.subtask(3) is None
    third = totals.subtask(2)
    assert third is not None
    assert third.keyed[0].offset_range(4) == (
        third.keyed[0].offsets[0],
        third.keyed[0].offsets[1],
    )
    assert third.keyed[0].offset_range(5) == (third.keyed[0].offsets[1], None)
    assert m.operator("missing") is None
    assert m.directory_name == "chk-42"


def test_topology_at_checkpoint_time() -> None:
    topology = checkpoint_metadata().topology()
    assert [op.uid for op in topology.topological_order()] == ["source", "orders", "totals", "audit", "sink"]
    assert topology.operator("totals").max_parallelism == 8
    assert [e.source for _, e in topology.predecessors("sink")] == ["totals", "orders"]


def test_a_finished_operator_status_survives_serialization() -> None:
    parsed = parse_metadata(dump_metadata(incremental_metadata()), WHERE)
    assert {op.uid: op.status.value for op in parsed.operators} == {
        "source": "fully_finished",
        "orders": "partially_finished",
        "totals": "running",
        "audit": "running",
        "sink": "running",
    }


# --- invariants hold for metadata built in code too ---------------------------------------------------


def stream(size: int = 100, raw_size: int = 100) -> StreamHandle:
    return file_stream(HandleScope.EXCLUSIVE, "x.ksf", size, raw_size)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StreamHandle(HandleScope.EXCLUSIVE, -1, 0, format_checksum(0), Compression.NONE, path="a"), "size"),
        (
            lambda: StreamHandle(HandleScope.EXCLUSIVE, 1, -1, format_checksum(0), Compression.NONE, path="a"),
            "raw_size",
        ),
        (lambda: StreamHandle(HandleScope.EXCLUSIVE, 1, 1, "xxh3-64:XYZ", Compression.NONE, path="a"), "checksum"),
        (lambda: StreamHandle(HandleScope.INLINE, 2, 1, format_checksum(0), Compression.NONE, data=b"abc"), "size 2"),
        (lambda: StreamHandle(HandleScope.INLINE, 0, 0, format_checksum(0), Compression.NONE, path="a"), "inline"),
        (lambda: StreamHandle(HandleScope.SHARED, 3, 0, format_checksum(0), Compression.NONE, data=b"abc"), "path"),
        (lambda: KeyedStateHandle(KeyGroupRange(0, 2), (8, 8), stream()), "2 offsets, expected 3"),
        (lambda: KeyedStateHandle(KeyGroupRange(0, 1), (20, 10), stream()), "offset for key group 1 is 10"),
        (lambda: KeyedStateHandle(KeyGroupRange(0, 1), (8, 85), stream()), "offset for key group 1 is 85"),
        (lambda: KeyedStateHandle(KeyGroupRange(0, 0), (7,), stream()), "offset for key group 0 is 7"),
        (lambda: KeyedStateHandle(KeyGroupRange.empty(), (), stream()), "non-empty key-group range"),
        (lambda: OperatorStateEntry("", DistributionMode.SPLIT, (), "s"), "name"),
        (lambda: OperatorStateEntry("n", DistributionMode.SPLIT, (5, 4), "s"), "offsets"),
        (lambda: OperatorStateEntry("n", DistributionMode.SPLIT, (-1,), "s"), "offsets"),
        (
            lambda: OperatorStateHandle((OperatorStateEntry("n", DistributionMode.SPLIT, (101,), "s"),), stream()),
            "offset 101 is beyond",
        ),
        (
            lambda: OperatorStateHandle(
                (
                    OperatorStateEntry("n", DistributionMode.SPLIT, (), "s"),
                    OperatorStateEntry("n", DistributionMode.UNION, (), "s"),
                ),
                stream(),
            ),
            "names a state twice",
        ),
        (lambda: SubtaskState(-1), "index"),
        (
            lambda: SubtaskState(0, finished=True, keyed=(KeyedStateHandle(KeyGroupRange(0, 0), (8,), stream()),)),
            "finished but carries state",
        ),
        (lambda: OperatorState("a", 1, 0), "max_parallelism"),
        (lambda: OperatorState("a", 1, 40_000), "max_parallelism"),
        (lambda: OperatorState("a", 9, 8), "parallelism 9"),
        (lambda: OperatorState("a", 0, 8), "parallelism 0"),
        (
            lambda: OperatorState("a", 2, 8, fully_finished=True, subtasks=(SubtaskState(0, finished=True),)),
            "fully_finished",
        ),
        (lambda: OperatorState("a", 2, 8, subtasks=(SubtaskState(2),)), "subtask index 2"),
        (lambda: OperatorState("a", 2, 8, subtasks=(SubtaskState(1), SubtaskState(0))), "subtask index 0"),
        (lambda: OperatorState("a", 2, 8, subtasks=(SubtaskState(0), SubtaskState(0))), "subtask index 0"),
        (
            lambda: OperatorState(
                "a",
                1,
                8,
                subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(6, 9), (8,) * 4, stream()),)),),
            ),
            "key groups 6..9 exceed max_parallelism 8",
        ),
        (lambda: CheckpointProperties(drain=True), "'drain'"),
        (lambda: CheckpointMetadata(-1, JOB, CheckpointKind.CHECKPOINT, 0, ()), "checkpoint ID"),
        (lambda: CheckpointMetadata(1, JOB.upper(), CheckpointKind.CHECKPOINT, 0, ()), "job_id"),
        (lambda: CheckpointMetadata(1, JOB[:-1], CheckpointKind.CHECKPOINT, 0, ()), "job_id"),
        (
            lambda: CheckpointMetadata(
                1, JOB, CheckpointKind.CHECKPOINT, 0, (), CheckpointProperties(synchronous=True)
            ),
            "synchronous",
        ),
        (
            lambda: CheckpointMetadata(
                1, JOB, CheckpointKind.CHECKPOINT, 0, (OperatorState("a", 1, 8), OperatorState("a", 1, 8))
            ),
            "uid 'a' appears twice",
        ),
    ],
)
def test_invariants_of_metadata_built_in_code(build: Callable[[], object], message: str) -> None:
    with pytest.raises(MetadataError) as info:
        build()
    assert message in str(info.value)


@pytest.mark.parametrize("path", ["../x", "/abs", "a/./b", "C:/x", "a\\b", ".hidden", "a//b", ""])
def test_handle_paths_built_in_code_are_checked(path: str) -> None:
    with pytest.raises(UnsafePathError):
        StreamHandle(HandleScope.EXCLUSIVE, 1, 1, format_checksum(0), Compression.NONE, path=path)
