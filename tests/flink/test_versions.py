"""Synthesized ``_metadata`` of every format version (3-6) and every handle type (0-17).

The real fixtures are all format 6 with handle types 1, 2, 4, 6, 11 and 12. These files come from the
test writer (``tests/flink/_writer.py``, written from the format's layout) so that each version's
differences are covered: formats 3-4 store no name/uid, 3 has no properties trailer, 4+ must have one,
6 alone has type bytes (and merged handles) in channel state; finished markers are the same in all.
"""

from __future__ import annotations

import dataclasses

import pytest

from keystate.storage.format import CheckpointKind, OperatorStatus
from keystate.storage.format.flink import (
    ChannelKind,
    ChannelStateHandle,
    FlinkCheckpointMetadata,
    FlinkHandleType,
    FlinkMasterState,
    FlinkMetadataError,
    FlinkOperatorState,
    FlinkSubtaskState,
    FullyFinishedOperatorState,
    TruncatedFlinkMetadataError,
    flink_operator_id,
    parse_flink_metadata,
)
from tests.flink import _writer
from tests.flink._samples import (
    ABSOLUTE,
    CHANGELOG,
    DSTL,
    EMPTY_MERGED_OPERATOR_STATE,
    INLINE,
    KEY_GROUPS_V2,
    LEGACY_STREAM,
    RELATIVE,
    ROCKSDB,
    checkpoint,
)

T = FlinkHandleType


def check_round_trip(m: FlinkCheckpointMetadata) -> FlinkCheckpointMetadata:
    parsed = parse_flink_metadata(_writer.metadata(m), location="synthetic/_metadata")
    assert parsed == dataclasses.replace(m, location="synthetic/_metadata")
    return parsed


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_every_handle_type_round_trips_in_every_version(version: int) -> None:
    parsed = check_round_trip(checkpoint(version))
    keyed = parsed.operators[0]
    assert keyed.status is OperatorStatus.PARTIALLY_FINISHED
    assert keyed.finished_subtasks == (2,)
    assert parsed.operators[3].status is OperatorStatus.FULLY_FINISHED
    assert parsed.master_states == (FlinkMasterState("hook", 2, b"payload"),)
    seen = {h.type_code for s in keyed.subtasks for h in s.handles() if hasattr(h, "type_code")}
    assert {T.PARTITIONABLE_OPERATOR, T.SEGMENT_PARTITIONABLE_OPERATOR, T.KEY_GROUPS_V2} <= seen


@pytest.mark.parametrize("version", [3, 4])
def test_formats_3_and_4_store_no_name_or_uid(version: int) -> None:
    m = parse_flink_metadata(_writer.metadata(checkpoint(version)))
    assert all(op.name is None and op.uid is None for op in m.operators)


def test_format_5_stores_name_and_uid_before_the_operator_id_and_empty_means_none() -> None:
    op = FlinkOperatorState(flink_operator_id("u"), "Source: s", "u", 1, 128, None, ())
    v4 = _writer.operator(op, 4)
    v5 = _writer.operator(op, 5)
    assert v5 == _writer.utf("Source: s") + _writer.utf("u") + v4
    anonymous = dataclasses.replace(op, name=None, uid=None)
    assert _writer.operator(anonymous, 5) == b"\x00\x00\x00\x00" + v4
    m = parse_flink_metadata(_writer.header(5) + _writer.body(1, (anonymous,), 5) + _writer.java_properties())
    assert (m.operators[0].name, m.operators[0].uid) == (None, None)


def test_names_in_modified_utf8_round_trip() -> None:
    """writeUTF encodes U+0000 as C0 80 and a supplementary character as two 3-byte surrogates."""
    name = "nul\x00-käse-流-😀"
    encoded = _writer.utf(name)
    assert b"\xc0\x80" in encoded
    assert b"\xed\xa0\xbd\xed\xb8\x80" in encoded
    op = FlinkOperatorState(flink_operator_id(name), name, name, 1, 128, None, ())
    m = parse_flink_metadata(_writer.header(6) + _writer.body(1, (op,), 6) + _writer.java_properties())
    assert m.operators[0].name == name == m.operators[0].uid


def test_format_4_is_format_3_plus_the_properties_trailer() -> None:
    v3, v4 = checkpoint(3), checkpoint(4)
    body = _writer.body(v3.checkpoint_id, v3.operators, 3, v3.master_states)
    assert _writer.metadata(v3) == _writer.header(3) + body
    assert v4.properties is not None
    assert _writer.metadata(v4) == _writer.header(4) + body + v4.properties.raw


def test_format_3_has_no_trailer_and_format_4_needs_one() -> None:
    v3 = _writer.metadata(checkpoint(3))
    with pytest.raises(FlinkMetadataError, match=r"end of file .*format 3 has nothing after it"):
        parse_flink_metadata(v3 + _writer.java_properties())
    with pytest.raises(TruncatedFlinkMetadataError, match="ends with the serialized CheckpointProperties"):
        parse_flink_metadata(_writer.header(4) + v3[8:])
    assert parse_flink_metadata(v3).properties is None
    assert parse_flink_metadata(v3).kind is None


def test_only_format_6_has_channel_type_bytes() -> None:
    """The same subtask, with channel state, read as format 5 and as format 6, differs in one byte per handle."""
    handle = ChannelStateHandle(ChannelKind.INPUT_CHANNEL, 1, 0, 2, (4,), 8, INLINE)
    assert _writer.channel(handle, 6) == b"\x01" + _writer.channel(handle, 5)
    op = FlinkOperatorState(
        flink_operator_id("c"), None, None, 2, 2, None, (FlinkSubtaskState(1, False, input_channel_state=(handle,)),)
    )
    v5 = _writer.header(5) + _writer.body(1, (op,), 5) + _writer.java_properties()
    assert parse_flink_metadata(v5).operators[0] == op
    with pytest.raises(FlinkMetadataError):
        parse_flink_metadata(_writer.header(6) + v5[8:])


def test_finished_markers_are_negative_indexes_in_every_version() -> None:
    op = FlinkOperatorState(
        flink_operator_id("f"), None, None, 3, 128, None, (FlinkSubtaskState(0, True), FlinkSubtaskState(2, True))
    )
    for version in (3, 4, 5, 6):
        encoded = _writer.operator(op, version)
        assert encoded.endswith(_writer.i32(2) + _writer.i32(-1) + _writer.i32(-3))
        trailer = _writer.java_properties() if version >= 4 else b""
        m = parse_flink_metadata(_writer.header(version) + _writer.body(1, (op,), version) + trailer)
        assert m.operators[0].finished_subtasks == (0, 2)
        assert m.operators[0].status is OperatorStatus.PARTIALLY_FINISHED


def test_fully_finished_is_count_minus_one_in_every_version() -> None:
    op = FullyFinishedOperatorState(flink_operator_id("ff"), None, None, 2, 128, None, ())
    for version in (3, 6):
        assert _writer.operator(op, version).endswith(b"\x00" + _writer.i32(-1))  # no coordinator, count -1
        trailer = _writer.java_properties() if version >= 4 else b""
        m = parse_flink_metadata(_writer.header(version) + _writer.body(1, (op,), version) + trailer)
        assert isinstance(m.operators[0], FullyFinishedOperatorState)
        assert m.operators[0].fully_finished


def test_a_savepoint_trailer_gives_the_savepoint_kind_and_format() -> None:
    m = check_round_trip(checkpoint(6, "savepoint"))
    assert m.kind is CheckpointKind.SAVEPOINT
    assert m.properties is not None
    assert (m.properties.type_name, m.properties.savepoint_format) == ("Savepoint", "CANONICAL")
    assert m.properties.post_checkpoint_action == "NONE"
    assert m.properties.sharing_files_strategy is None
    native = _writer.header(4) + _writer.body(1, (), 4) + _writer.java_properties("savepoint", format_type="NATIVE")
    assert parse_flink_metadata(native).properties is not None
    assert parse_flink_metadata(native).properties.savepoint_format == "NATIVE"  # type: ignore[union-attr]


def test_the_checkpoint_trailer_flags() -> None:
    data = _writer.header(4) + _writer.body(1, (), 4) + _writer.java_properties(forced=True)
    properties = parse_flink_metadata(data).properties
    assert properties is not None
    assert properties.kind is CheckpointKind.CHECKPOINT
    assert properties.flag("forced") is True
    assert properties.flag("discardSubsumed") is True
    assert properties.flag("discardFailed") is False
    assert properties.flag("nonexistent") is None


def test_sizes_follow_flinks_rules() -> None:
    assert ROCKSDB.state_size == INLINE.state_size * 2 + ABSOLUTE.size + LEGACY_STREAM.state_size + RELATIVE.size
    assert CHANGELOG.state_size == KEY_GROUPS_V2.state_size + ROCKSDB.state_size + 5 + DSTL.size
    assert EMPTY_MERGED_OPERATOR_STATE.state_size == 0
    m = checkpoint(6)
    keyed = m.operators[0]
    assert keyed.state_size == sum(s.state_size for s in keyed.subtasks)
    assert m.operators[2].state_size == 16  # coordinator state only
    assert m.state_size == sum(op.state_size for op in m.operators)
    assert keyed.has_keyed_state
    assert not m.operators[2].has_keyed_state
    assert m.operators[2].has_state


def type_codes(node: object) -> set[FlinkHandleType]:
    """Every handle type byte in a model, nested handles included."""
    found: set[FlinkHandleType] = set()
    if isinstance(node, tuple):
        for item in node:
            found |= type_codes(item)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        code = getattr(node, "type_code", None)
        if isinstance(code, FlinkHandleType):
            found.add(code)
        for f in dataclasses.fields(node):
            found |= type_codes(getattr(node, f.name))
    return found


def test_the_synthetic_checkpoint_covers_every_handle_type() -> None:
    assert type_codes(checkpoint(6)) == set(FlinkHandleType) - {FlinkHandleType.NULL}
