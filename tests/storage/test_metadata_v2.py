"""``_metadata`` format version 2: incremental handles (base + deltas, ``written_by``) and statistics.

Golden files pin the bytes of an incremental checkpoint and of a savepoint; the model's delta and statistics
invariants hold for metadata built in code and parsed alike; the derived byte counts follow Flink's
"Checkpointed Data Size" / "Full Checkpoint Data Size"; version 1 documents and writers refuse version 2's
fields. Hostile mutations of every field are in ``test_metadata_hostile.py`` (its sample is version 2's).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStatistics,
    Compression,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    MetadataError,
    OperatorState,
    OperatorStatistics,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.format import SUPPORTED_METADATA_VERSIONS, dump_metadata, parse_metadata
from keystate.storage.format._metadata_v1 import dump_v1
from keystate.storage.format._metadata_v2 import MAX_DELTAS, dump_v2
from keystate.storage.format.metadata import MAX_ID
from tests.storage.test_metadata import (
    BASE_WRITTEN_BY,
    GOLDEN,
    JOB,
    WHERE,
    checkpoint_metadata,
    file_stream,
    incremental_metadata,
    savepoint_v2_metadata,
    shared_stream,
)

SAMPLES_V2: dict[str, Callable[[], CheckpointMetadata]] = {
    "metadata_v2_checkpoint.json": incremental_metadata,
    "metadata_v2_savepoint.json": savepoint_v2_metadata,
}


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def parse(doc: object) -> CheckpointMetadata:
    return parse_metadata(json.dumps(doc, ensure_ascii=False).encode(), WHERE)


def v2_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(golden("metadata_v2_checkpoint.json"))
    return doc


# --- golden files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES_V2))
def test_version_2_matches_the_golden_file_byte_for_byte(name: str) -> None:
    actual = dump_metadata(SAMPLES_V2[name]())
    assert actual == dump_v2(SAMPLES_V2[name]()), "dump_metadata writes the newest version, 2"
    path = GOLDEN / name
    if os.environ.get("KEYSTATE_REGEN_GOLDEN") == "1" and (not path.exists() or path.read_bytes() != actual):
        path.write_bytes(actual)
        pytest.fail(f"regenerated {path}; review the diff and rerun without KEYSTATE_REGEN_GOLDEN")
    assert actual == path.read_bytes(), f"the metadata format changed; see {path} (KEYSTATE_REGEN_GOLDEN=1)"


@pytest.mark.parametrize("name", list(SAMPLES_V2))
def test_version_2_golden_file_parses_back_to_an_equal_object(name: str) -> None:
    data = golden(name)
    parsed = parse_metadata(data, WHERE)
    assert parsed == SAMPLES_V2[name]()
    assert dump_metadata(parsed) == data


@pytest.mark.parametrize("name", list(SAMPLES_V2))
def test_every_truncation_of_a_version_2_golden_file_is_rejected(name: str) -> None:
    text = golden(name).rstrip(b"\n")
    assert parse_metadata(text, WHERE) == SAMPLES_V2[name]()
    for n in range(len(text)):
        with pytest.raises(MetadataError) as info:
            parse_metadata(text[:n], WHERE)
        assert str(info.value).startswith(WHERE)


def test_the_version_2_layout() -> None:
    """Where each new field sits and what it holds (docs/format.md section 4.11)."""
    doc = v2_doc()
    assert doc["format_version"] == 2
    assert list(doc) == [
        "format_version", "checkpoint_id", "job_id", "kind", "timestamp", "properties", "statistics", "operators",
    ]  # fmt: skip
    assert doc["statistics"] == {"duration_ms": 250}
    totals = doc["operators"][2]
    assert list(totals)[-1] == "statistics"
    assert totals["statistics"] == {
        "sync_duration_ms": 5, "async_duration_ms": 130, "alignment_duration_ms": 17, "acknowledged_subtasks": 4,
        "end_to_end_duration_ms": 171,
    }  # fmt: skip
    assert "end_to_end_duration_ms" not in doc["operators"][3]["statistics"], "optional: absent when not recorded"
    assert doc["operators"][0]["statistics"] is None
    assert doc["operators"][4]["statistics"] is None
    exclusive = totals["subtasks"][0]["keyed"][0]
    assert list(exclusive) == ["key_groups", "offsets", "stream", "deltas"]
    assert exclusive["deltas"] == []
    assert "written_by" not in exclusive["stream"]
    incremental = totals["subtasks"][1]["keyed"][0]
    assert incremental["stream"]["written_by"] == BASE_WRITTEN_BY
    assert list(incremental["stream"])[-1] == "written_by"
    assert [list(d) for d in incremental["deltas"]] == [["offsets", "stream"]] * 2
    assert [d["stream"]["written_by"] for d in incremental["deltas"]] == [41, 42]
    assert "written_by" not in totals["subtasks"][2]["keyed"][0]["stream"]  # inline
    sp = json.loads(golden("metadata_v2_savepoint.json"))
    assert sp["kind"] == "savepoint"
    assert '"scope":"shared"' not in golden("metadata_v2_savepoint.json").decode()


def test_version_1_golden_files_still_parse() -> None:
    assert SUPPORTED_METADATA_VERSIONS == (1, 2)
    v1 = parse_metadata(golden("metadata_v1_checkpoint.json"), WHERE)
    assert v1 == checkpoint_metadata()
    shared = [h for h in v1.handles() if h.scope is HandleScope.SHARED]
    assert len(shared) == 1
    assert shared[0].written_by is None
    assert v1.incremental_state_bytes == v1.full_state_bytes  # version 1 has no incremental checkpoints


# --- derived values: Flink's checkpointed size and full size ------------------------------------------


def test_checkpointed_and_full_sizes() -> None:
    m = incremental_metadata()
    totals = m.operator("totals")
    audit = m.operator("audit")
    assert totals is not None
    assert audit is not None
    incremental = totals.subtasks[1].keyed[0]
    assert [h.size for h in incremental.streams()] == [500, 120, 90]
    assert [h.written_by for h in incremental.streams()] == [40, 41, 42]
    assert incremental.is_incremental
    # Every file is referenced (handles() includes the deltas) ...
    assert totals.full_state_bytes == totals.state_bytes
    assert totals.state_bytes == checkpoint_metadata().operator("totals").state_bytes + 120 + 90  # type: ignore[union-attr]
    # ... and this checkpoint (42) wrote all but the base (40) and the first delta (41).
    assert totals.incremental_state_bytes(42) == totals.full_state_bytes - 500 - 120
    assert audit.incremental_state_bytes(42) == audit.full_state_bytes == 700
    assert m.full_state_bytes == m.total_state_bytes == sum(h.size for h in m.handles())
    assert m.incremental_state_bytes == m.full_state_bytes - 620
    assert m.is_incremental
    assert len(list(m.handles())) == len(list(checkpoint_metadata().handles())) + 3


def test_a_shared_file_of_an_earlier_checkpoint_makes_it_incremental() -> None:
    """No deltas, but a base written by an earlier checkpoint is reused: incremental too."""
    reused = KeyedStateHandle(KeyGroupRange(0, 0), (8,), shared_stream("t/0/k.ksf", 100, 100, 5))
    op = OperatorState("t", 1, 8, subtasks=(SubtaskState(0, keyed=(reused,)),))
    m = CheckpointMetadata(6, JOB, CheckpointKind.CHECKPOINT, 0, (op,))
    assert m.is_incremental
    assert (m.incremental_state_bytes, m.full_state_bytes) == (0, 100)
    same = CheckpointMetadata(5, JOB, CheckpointKind.CHECKPOINT, 0, (op,))
    assert not same.is_incremental
    assert same.incremental_state_bytes == 100


def test_a_full_checkpoint_wrote_everything_it_references() -> None:
    sp = savepoint_v2_metadata()
    assert not sp.is_incremental
    assert sp.incremental_state_bytes == sp.full_state_bytes > 0


# --- the model's invariants ---------------------------------------------------------------------------


def shared(written_by: int | None, size: int = 100, path: str = "s.ksf") -> StreamHandle:
    s = file_stream(HandleScope.SHARED, path, size, size)
    return StreamHandle(s.scope, s.size, s.raw_size, s.checksum, s.compression, path=s.path, written_by=written_by)


GROUPS = KeyGroupRange(0, 1)


def delta(written_by: int | None, groups: KeyGroupRange = GROUPS) -> KeyedStateHandle:
    return KeyedStateHandle(groups, (8,) * len(groups), shared(written_by, path=f"d{written_by}.ksf"))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StreamHandle(HandleScope.EXCLUSIVE, 10, 10, "xxh3-64:" + "0" * 16, Compression.NONE, path="x",
                              written_by=3), "exclusive handle has no 'written_by'"),
        (lambda: StreamHandle(HandleScope.INLINE, 0, 0, "xxh3-64:" + "0" * 16, Compression.NONE, data=b"",
                              written_by=3), "inline handle has no 'written_by'"),
        (lambda: shared(-1), "written_by must be a checkpoint id"),
        (lambda: shared(MAX_ID + 1), "written_by must be a checkpoint id"),
        (lambda: shared(True), "written_by must be a checkpoint id"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), file_stream(HandleScope.EXCLUSIVE, "b", 100, 100), (delta(2),)),
         "its base must be a shared file"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(None), (delta(2),)), "its base must be a shared file"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(None),)),
         "must be a shared file with 'written_by'"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), (KeyedStateHandle(GROUPS, (8, 8),
            file_stream(HandleScope.EXCLUSIVE, "e", 100, 100)),)), "delta 0 of keyed handle"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(2, KeyGroupRange(0, 2)),)),
         "delta 0 covers key groups 0..2"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), (KeyedStateHandle(GROUPS, (8, 8), shared(2),
            (delta(3),)),)), "has deltas itself"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(3), (delta(3),)), "not after 3"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(3), (delta(2),)), "not after 3"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(5), delta(4))), "delta 1"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(5), delta(5))), "strictly increasing"),
        (lambda: KeyedStateHandle(GROUPS, (8, 8), shared(1), ("nope",)),  # type: ignore[arg-type]
         "not a keyed handle"),
        (lambda: OperatorStatistics(-1, 0, 0, 0), "'sync_duration_ms' must be an integer"),
        (lambda: OperatorStatistics(0, MAX_ID + 1, 0, 0), "'async_duration_ms'"),
        (lambda: OperatorStatistics(0, 0, 1.5, 0), "'alignment_duration_ms'"),  # type: ignore[arg-type]
        (lambda: OperatorStatistics(0, 0, 0, False), "'acknowledged_subtasks'"),
        (lambda: CheckpointStatistics(-5), "'duration_ms'"),
        (lambda: OperatorState("a", 2, 8, statistics=OperatorStatistics(0, 0, 0, 3)),
         "3 acknowledged subtasks, more than its parallelism 2"),
        (lambda: CheckpointMetadata(4, JOB, CheckpointKind.CHECKPOINT, 0, (OperatorState("a", 1, 8, subtasks=(
            SubtaskState(0, keyed=(KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(5),)),)),)),)),
         "was written by checkpoint 5, after this checkpoint 4"),
    ],
)  # fmt: skip
def test_invariants_of_version_2_models(build: Callable[[], object], message: str) -> None:
    with pytest.raises(MetadataError) as info:
        build()
    assert message in str(info.value)


def test_valid_incremental_handles() -> None:
    handle = KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(2), delta(7)))
    assert [h.written_by for h in handle.streams()] == [1, 2, 7]
    assert KeyedStateHandle(GROUPS, (8, 8), shared(MAX_ID)).streams().__next__().written_by == MAX_ID
    assert OperatorStatistics(0, 0, 0, 0).acknowledged_subtasks == 0


def test_end_to_end_duration_is_optional_and_checked() -> None:
    doc = v2_doc()
    totals = doc["operators"][2]["statistics"]
    assert parse(doc).operators[2].statistics == OperatorStatistics(5, 130, 17, 4, end_to_end_duration_ms=171)
    del totals["end_to_end_duration_ms"]  # a v2 file written before keystate recorded it
    assert parse(doc).operators[2].statistics == OperatorStatistics(5, 130, 17, 4)
    for bad in (-1, 1.5, "7", True, None, MAX_ID + 1):
        totals["end_to_end_duration_ms"] = bad
        with pytest.raises(MetadataError, match="end_to_end_duration_ms"):
            parse(doc)
    with pytest.raises(MetadataError, match="end_to_end_duration_ms"):
        OperatorStatistics(0, 0, 0, 0, end_to_end_duration_ms=-3)
    assert CheckpointStatistics(MAX_ID).duration_ms == MAX_ID


# --- writers refuse what readers would refuse ---------------------------------------------------------


def test_version_2_refuses_a_shared_file_without_written_by() -> None:
    with pytest.raises(MetadataError, match="has no 'written_by'; format version 2 requires"):
        dump_metadata(checkpoint_metadata())  # version 1's sample: a shared handle of unknown writer


def test_version_2_refuses_a_savepoint_with_shared_state() -> None:
    op = OperatorState("t", 1, 8, subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(GROUPS, (8, 8), shared(3)),)),))
    sp = CheckpointMetadata(3, JOB, CheckpointKind.SAVEPOINT, 0, (op,))
    with pytest.raises(MetadataError, match=r"savepoint refers to shared state 's\.ksf'"):
        dump_metadata(sp)
    doc = json.loads(dump_metadata(CheckpointMetadata(3, JOB, CheckpointKind.CHECKPOINT, 0, (op,))))
    doc["kind"] = "savepoint"
    with pytest.raises(MetadataError, match="savepoint refers to shared state") as info:
        parse(doc)
    assert str(info.value).startswith(WHERE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: CheckpointMetadata(m.checkpoint_id, m.job_id, m.kind, m.timestamp, (OperatorState(
            "a", 1, 8, subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(GROUPS, (8, 8), shared(1)),)),)),)),
         "format version 1 has no 'written_by'"),
        (lambda m: CheckpointMetadata(m.checkpoint_id, m.job_id, m.kind, m.timestamp, checkpoint_metadata().operators,
                                      statistics=CheckpointStatistics(1)), "no checkpoint statistics"),
        (lambda m: CheckpointMetadata(m.checkpoint_id, m.job_id, m.kind, m.timestamp, (OperatorState(
            "a", 1, 8, statistics=OperatorStatistics(0, 0, 0, 1)),)), "no operator statistics"),
        (lambda m: m, "format version 1 has no"),
    ],
)  # fmt: skip
def test_version_1_cannot_write_version_2_content(
    change: Callable[[CheckpointMetadata], CheckpointMetadata], message: str
) -> None:
    with pytest.raises(MetadataError, match=message):
        dump_v1(change(incremental_metadata()))
    deltas_only = KeyedStateHandle(GROUPS, (8, 8), shared(1), (delta(2),))
    op = OperatorState("t", 1, 8, subtasks=(SubtaskState(0, keyed=(deltas_only,)),))
    with pytest.raises(MetadataError):
        dump_v1(CheckpointMetadata(3, JOB, CheckpointKind.CHECKPOINT, 0, (op,)))


# --- version 1 documents do not accept version 2's fields ---------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(statistics=None), "statistics"),
        (lambda d: d["operators"][0].update(statistics=None), "statistics"),
        (lambda d: d["operators"][2]["subtasks"][0]["keyed"][0].update(deltas=[]), "deltas"),
        (lambda d: d["operators"][2]["subtasks"][1]["keyed"][0]["stream"].update(written_by=1), "written_by"),
    ],
)
def test_a_version_1_document_refuses_version_2_fields(change: Callable[[dict[str, Any]], None], field: str) -> None:
    doc = json.loads(golden("metadata_v1_checkpoint.json"))
    change(doc)
    with pytest.raises(MetadataError, match=f"unknown field '{field}'"):
        parse(doc)
    doc["format_version"] = 2  # the same field is fine in version 2 (other fields then are missing)
    with pytest.raises(MetadataError) as info:
        parse(doc)
    assert f"unknown field '{field}'" not in str(info.value)


# --- hostile version 2 documents (beyond the per-field mutations of test_metadata_hostile.py) ---------

INCREMENTAL = ("operators", 2, "subtasks", 1, "keyed", 0)


def at(doc: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    node: Any = doc
    for p in path:
        node = node[p]
    return node


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: at(d, INCREMENTAL)["stream"].pop("written_by"), "required field 'written_by' is missing"),
        (
            lambda d: d["operators"][3]["subtasks"][0]["keyed"][0]["stream"].update(written_by=43),
            "was written by checkpoint 43, after this checkpoint 42",
        ),
        (lambda d: at(d, INCREMENTAL)["stream"].update(written_by=2**63), "field 'written_by' must be an integer in"),
        (lambda d: at(d, INCREMENTAL)["stream"].update(written_by=41), "not after 41"),
        (lambda d: at(d, INCREMENTAL)["deltas"].reverse(), "not after 42"),
        (lambda d: at(d, INCREMENTAL)["deltas"][0]["stream"].update(scope="exclusive"), "unknown field 'written_by'"),
        (lambda d: at(d, INCREMENTAL)["deltas"][0]["stream"].update(written_by=None), "field 'written_by'"),
        (lambda d: at(d, INCREMENTAL)["deltas"][0].update(key_groups=[2, 3]), "unknown field 'key_groups'"),
        (lambda d: at(d, INCREMENTAL)["deltas"][0].update(deltas=[]), "unknown field 'deltas'"),
        (lambda d: at(d, INCREMENTAL)["deltas"][0].update(offsets=[8]), "has 1 offsets, expected 2"),
        (lambda d: at(d, INCREMENTAL)["deltas"][0].update(offsets=[8, 200]), "offset for key group 3 is 200"),
        (lambda d: at(d, INCREMENTAL)["deltas"].append(at(d, INCREMENTAL)["deltas"][1]), "not after 42"),
        (lambda d: at(d, INCREMENTAL).update(deltas={}), "field 'deltas' must be an array"),
        (lambda d: at(d, INCREMENTAL)["stream"].update(scope="inline", data=""), "unknown field 'path'"),
        (lambda d: d.update(statistics={"duration_ms": -1}), "field 'duration_ms' must be an integer in"),
        (lambda d: d.update(statistics={"duration_ms": 1.0}), "field 'duration_ms' must be an integer"),
        (lambda d: d.update(statistics={}), "required field 'duration_ms' is missing"),
        (lambda d: d.update(statistics=[]), "field 'statistics' must be an object or null"),
        (lambda d: d["operators"][2]["statistics"].update(acknowledged_subtasks=5), "more than its parallelism 4"),
        (lambda d: d["operators"][2]["statistics"].update(sync_duration_ms=True), "field 'sync_duration_ms'"),
        (lambda d: d["operators"][2]["statistics"].update(extra=1), "unknown field 'extra'"),
        (lambda d: d["operators"][2].update(statistics="none"), "field 'statistics' must be an object or null"),
    ],
)
def test_hostile_version_2_fields(change: Callable[[dict[str, Any]], None], message: str) -> None:
    doc = v2_doc()
    change(doc)
    with pytest.raises(MetadataError) as info:
        parse(doc)
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith(WHERE)


def test_too_many_deltas_are_refused_before_they_are_built() -> None:
    doc = v2_doc()
    deltas = at(doc, INCREMENTAL)["deltas"]
    at(doc, INCREMENTAL)["deltas"] = [deltas[0]] * (MAX_DELTAS + 1)
    with pytest.raises(MetadataError, match=f"field 'deltas' has {MAX_DELTAS + 1} entries, more than {MAX_DELTAS}"):
        parse(doc)


def test_the_longest_chain_parses_in_bounded_time() -> None:
    """MAX_DELTAS deltas (validation is linear in the chain), well inside the document limits."""
    base = at(v2_doc(), INCREMENTAL)
    delta_form = base["deltas"][0]
    doc = v2_doc()
    at(doc, INCREMENTAL)["stream"]["written_by"] = 0
    chain = []
    for i in range(MAX_DELTAS):
        form = json.loads(json.dumps(delta_form))
        form["stream"]["written_by"] = i + 1
        form["stream"]["path"] = f"totals/1/delta-{i}.ksf"
        chain.append(form)
    at(doc, INCREMENTAL)["deltas"] = chain
    doc["checkpoint_id"] = MAX_DELTAS + 1
    for st in doc["operators"][3]["subtasks"]:
        for k in st["keyed"]:
            k["stream"]["written_by"] = MAX_DELTAS + 1
    data = json.dumps(doc).encode()
    started = time.perf_counter()
    parsed = parse_metadata(data, WHERE)
    elapsed = time.perf_counter() - started
    totals = parsed.operator("totals")
    assert totals is not None
    assert len(totals.subtasks[1].keyed[0].deltas) == MAX_DELTAS
    assert elapsed < 2.0, f"{MAX_DELTAS} deltas took {elapsed:.2f} s"
    assert dump_metadata(parsed) == json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
