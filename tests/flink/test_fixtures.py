"""Real Flink 2.3.0 checkpoints, parsed and compared field by field with what Flink's own loader read.

The oracle is each fixture's ``flink-dump.json`` (``Checkpoints.loadCheckpointMetadata`` of Flink 2.3.0),
which lists operators sorted by ID; the parsed operators keep the file's order.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from keystate.storage.format import CheckpointKind, KeyGroupRange, OperatorStatus
from keystate.storage.format.flink import (
    ByteStreamStateHandle,
    FileStateHandle,
    FlinkCheckpointMetadata,
    FlinkHandleType,
    FlinkKeyedHandle,
    FlinkOperatorState,
    FlinkStreamHandle,
    FlinkSubtaskState,
    FullyFinishedOperatorState,
    IncrementalRemoteKeyedStateHandle,
    KeyGroupsStateHandle,
    OperatorStreamStateHandle,
    RelativeFileStateHandle,
    flink_operator_id,
    looks_like_flink_metadata,
    parse_flink_metadata,
)
from tests.flink import _writer
from tests.flink._support import NAMES, Fixture, fixture, normalise_handle_name


def parsed(name: str) -> tuple[Fixture, FlinkCheckpointMetadata]:
    fx = fixture(name)
    return fx, parse_flink_metadata(fx.data, location=str(fx.metadata_path))


def stream_view(handle: FlinkStreamHandle, job_id: str) -> dict[str, Any]:
    assert isinstance(handle, ByteStreamStateHandle), "every delegate and meta handle in the fixtures is inline"
    return {
        "type": handle.flink_class,
        "stateSize": handle.state_size,
        "handleName": normalise_handle_name(handle.handle_name, job_id),
    }


def keyed_view(handle: FlinkKeyedHandle, job_id: str) -> dict[str, Any]:
    view: dict[str, Any] = {
        "type": handle.flink_class,
        "stateSize": handle.state_size,
        "checkpointedSize": handle.checkpointed_size,
        "keyGroupRange": [handle.key_groups.start, handle.key_groups.end],
    }
    if isinstance(handle, KeyGroupsStateHandle):
        view["delegate"] = stream_view(handle.delegate, job_id)
    else:
        assert isinstance(handle, IncrementalRemoteKeyedStateHandle)
        view["sharedFiles"] = len(handle.shared_state)
        view["privateFiles"] = len(handle.private_state)
        view["metaState"] = stream_view(handle.meta_state, job_id)
    return view


def operator_handle_view(handle: OperatorStreamStateHandle, job_id: str) -> dict[str, Any]:
    return {
        "type": handle.flink_class,
        "stateSize": handle.state_size,
        "delegate": stream_view(handle.delegate, job_id),
        "states": {e.name: {"mode": e.mode.name, "offsets": list(e.offsets)} for e in handle.states},
    }


def subtask_view(s: FlinkSubtaskState, job_id: str) -> dict[str, Any]:
    return {
        "class": "FinishedOperatorSubtaskState" if s.finished else "OperatorSubtaskState",
        "finished": s.finished,
        "hasState": s.has_state,
        "stateSize": s.state_size,
        "managedKeyed": [] if s.managed_keyed_state is None else [keyed_view(s.managed_keyed_state, job_id)],
        "managedOperator": []
        if s.managed_operator_state is None
        else [operator_handle_view(s.managed_operator_state, job_id)],
        "rawKeyed": int(s.raw_keyed_state is not None),
        "rawOperator": int(s.raw_operator_state is not None),
        "inputChannelState": len(s.input_channel_state),
        "resultSubpartitionState": len(s.result_subpartition_state),
    }


def operator_view(op: FlinkOperatorState, job_id: str) -> dict[str, Any]:
    coordinator = op.coordinator_state
    return {
        "operatorID": op.operator_id,
        "name": op.name,
        "uid": op.uid,
        "class": "FullyFinishedOperatorState" if isinstance(op, FullyFinishedOperatorState) else "OperatorState",
        "fullyFinished": op.fully_finished,
        "parallelism": op.parallelism,
        "maxParallelism": op.max_parallelism,
        "stateSize": op.state_size,
        "coordinatorState": None if coordinator is None else stream_view(coordinator, job_id),
        "subtasks": {str(s.index): subtask_view(s, job_id) for s in op.subtasks},
    }


def properties_view(m: FlinkCheckpointMetadata) -> str:
    """The parsed properties as Flink's ``CheckpointProperties.toString()`` prints them."""
    p = m.properties
    assert p is not None

    def flag(name: str) -> str:
        return str(p.flag(name)).lower()

    type_class = (p.snapshot_type_class or "").rsplit(".", 1)[-1]
    snapshot = f"{type_class}{{name='{p.type_name}', sharingFilesStrategy={p.sharing_files_strategy}}}"
    return (
        f"CheckpointProperties{{forced={flag('forced')}, checkpointType={snapshot}, "
        f"discardSubsumed={flag('discardSubsumed')}, discardFinished={flag('discardFinished')}, "
        f"discardCancelled={flag('discardCancelled')}, discardFailed={flag('discardFailed')}, "
        f"discardSuspended={flag('discardSuspended')}}}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_header_matches_flinks_view(name: str) -> None:
    fx, m = parsed(name)
    assert looks_like_flink_metadata(fx.data[:8])
    assert fx.dump["magic"] == "0x4960672d"
    assert fx.dump["fileSize"] == len(fx.data)
    assert m.format_version == fx.dump["metadataVersion"] == 6
    assert m.checkpoint_id == fx.dump["checkpointId"]
    assert len(m.master_states) == fx.dump["masterStates"] == 0
    assert m.location == str(fx.metadata_path)
    assert fx.metadata_path.parent.name == f"chk-{m.checkpoint_id}"


@pytest.mark.parametrize("name", NAMES)
def test_every_operator_matches_flinks_view_field_by_field(name: str) -> None:
    fx, m = parsed(name)
    ours = sorted((operator_view(op, fx.job_id) for op in m.operators), key=lambda v: v["operatorID"])
    theirs = fx.dump["operators"]
    assert [v["operatorID"] for v in ours] == [v["operatorID"] for v in theirs]
    for mine, flinks in zip(ours, theirs, strict=True):
        for key in flinks:
            assert mine[key] == flinks[key], f"{name}: operator {flinks['operatorID']}: {key}"
        assert mine.keys() == flinks.keys()


@pytest.mark.parametrize("name", NAMES)
def test_the_properties_trailer_matches_flinks_view(name: str) -> None:
    fx, m = parsed(name)
    assert m.properties is not None
    assert properties_view(m) == fx.dump["checkpointProperties"]
    assert m.kind is CheckpointKind.CHECKPOINT
    assert len(m.properties.raw) == 604
    assert fx.data.endswith(m.properties.raw)
    assert m.properties.raw.startswith(b"\xac\xed\x00\x05")


@pytest.mark.parametrize("name", NAMES)
def test_the_test_writer_rebuilds_every_fixture_byte_for_byte(name: str) -> None:
    """Nothing of the file is lost: encoding the parsed model again gives Flink's exact bytes."""
    fx, m = parsed(name)
    assert _writer.metadata(m) == fx.data


@pytest.mark.parametrize("name", NAMES)
def test_every_uid_hashes_to_its_operator_id(name: str) -> None:
    _, m = parsed(name)
    for op in m.operators:
        assert op.uid is not None
        assert flink_operator_id(op.uid) == op.operator_id
        assert m.operator_for_uid(op.uid) is op
        assert m.operator(op.operator_id.upper()) is op


def test_operators_keep_the_file_order() -> None:
    _, m = parsed("hashmap-fully-finished")
    assert [op.uid for op in m.operators] == [
        "bounded-keyed-sum",
        "unbounded-keyed-count",
        "bounded-source",
        "unbounded-source",
        "sink",
    ]


def test_finished_markers_and_statuses() -> None:
    _, m = parsed("hashmap-partially-finished-p3")
    source = m.operator(flink_operator_id("unbounded-source"))
    assert source.status is OperatorStatus.PARTIALLY_FINISHED
    assert source.finished_subtasks == (2,)
    assert [s.index for s in source.subtasks] == [0, 1, 2]
    finished = source.subtask(2)
    assert finished is not None
    assert finished.finished
    assert not finished.has_state
    for uid in ("bounded-source", "bounded-keyed-sum"):
        op = m.operator(flink_operator_id(uid))
        assert isinstance(op, FullyFinishedOperatorState)
        assert op.status is OperatorStatus.FULLY_FINISHED
        assert (op.parallelism, op.max_parallelism, op.subtasks, op.coordinator_state) == (3, 128, (), None)
        assert not op.has_state
    sink = m.operator(flink_operator_id("sink"))
    assert sink.status is OperatorStatus.RUNNING
    assert sink.subtasks == ()
    assert not sink.has_state
    counts = m.operator(flink_operator_id("unbounded-keyed-count"))
    ranges = [s.managed_keyed_state.key_groups for s in counts.subtasks if s.managed_keyed_state is not None]
    assert ranges == [KeyGroupRange(0, 42), KeyGroupRange(43, 85), KeyGroupRange(86, 127)]


def test_key_group_offsets_of_a_hashmap_checkpoint() -> None:
    _, m = parsed("hashmap-all-running")
    op = m.operator(flink_operator_id("bounded-keyed-sum"))
    handle = op.subtasks[1].managed_keyed_state
    assert isinstance(handle, KeyGroupsStateHandle)
    assert handle.type_code is FlinkHandleType.KEY_GROUPS_V2
    assert handle.key_groups == KeyGroupRange(64, 127)
    assert len(handle.offsets) == 64
    assert list(handle.offsets) == sorted(handle.offsets)
    assert all(0 <= o < handle.state_size for o in handle.offsets)
    assert handle.offset_for(64) == handle.offsets[0]
    assert handle.state_handle_id
    with pytest.raises(KeyError):
        handle.offset_for(3)


def test_source_reader_state_offsets_and_coordinator_state() -> None:
    _, running = parsed("hashmap-all-running")
    _, final = parsed("hashmap-final-bounded")
    source_id = flink_operator_id("bounded-source")
    before = running.operator(source_id).subtasks[0].managed_operator_state
    after = final.operator(source_id).subtasks[0].managed_operator_state
    assert before is not None
    assert after is not None
    assert before.state("SourceReaderState").offsets == (234,)
    assert after.state("SourceReaderState").offsets == ()
    assert (before.state_size, after.state_size) == (265, 234)
    coordinator = running.operator(source_id).coordinator_state
    assert coordinator is not None
    assert coordinator.handle_name == source_id
    assert coordinator.state_size == 16


@pytest.mark.parametrize("name", ["rocksdb-full", "rocksdb-incremental"])
def test_rocksdb_handles_name_files_that_exist_with_the_stated_size(name: str) -> None:
    fx, m = parsed(name)
    op = m.operator(flink_operator_id("unbounded-keyed-count"))
    files: list[tuple[str, FlinkStreamHandle]] = []
    for s in op.subtasks:
        handle = s.managed_keyed_state
        assert isinstance(handle, IncrementalRemoteKeyedStateHandle)
        assert handle.type_code is FlinkHandleType.INCREMENTAL_KEY_GROUPS_V2
        assert handle.checkpoint_id == m.checkpoint_id
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", handle.backend_identifier)
        files += [(f.local_path, f.handle) for f in (*handle.shared_state, *handle.private_state)]
    on_disk = [(local, h) for local, h in files if not isinstance(h, ByteStreamStateHandle)]
    assert [local for local, _ in on_disk] == ["OPTIONS-000013", "OPTIONS-000013"]
    for _, h in on_disk:
        if name == "rocksdb-full":
            assert isinstance(h, RelativeFileStateHandle)
            path = fx.metadata_path.parent / h.relative_path
        else:
            assert isinstance(h, FileStateHandle)
            path = fx.directory / normalise_handle_name(h.path, fx.job_id).removeprefix("<checkpoint-root>/")
        assert path.stat().st_size == h.state_size


def test_an_incremental_checkpoint_has_shared_files() -> None:
    _, m = parsed("rocksdb-incremental")
    handles = [s.managed_keyed_state for s in m.operator(flink_operator_id("unbounded-keyed-count")).subtasks]
    assert all(isinstance(h, IncrementalRemoteKeyedStateHandle) for h in handles)
    shared = [len(h.shared_state) for h in handles if isinstance(h, IncrementalRemoteKeyedStateHandle)]
    sizes = [h.checkpointed_size for h in handles if isinstance(h, IncrementalRemoteKeyedStateHandle)]
    assert (shared, sizes) == ([7, 4], [25006, 24776])


def test_state_sizes_add_up() -> None:
    _, m = parsed("hashmap-partially-finished-p3")
    assert m.state_size == sum(op.state_size for op in m.operators) == 6021 + 546
