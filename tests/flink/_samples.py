"""A synthetic checkpoint that holds every handle type (0-17), for any format version (3-6).

Built from the reader's model classes and encoded by the test writer; shared by the version tests and the
hostile-input tests.
"""

from __future__ import annotations

import dataclasses

from keystate.storage.format import KeyGroupRange
from keystate.storage.format.flink import (
    ByteStreamStateHandle,
    ChangelogStateBackendHandle,
    ChangelogStateHandleStreamImpl,
    ChannelKind,
    ChannelStateHandle,
    EmptySegmentFileStateHandle,
    FileStateHandle,
    FlinkChannelHandle,
    FlinkCheckpointMetadata,
    FlinkCheckpointProperties,
    FlinkDistributionMode,
    FlinkHandleType,
    FlinkMasterState,
    FlinkOperatorState,
    FlinkStateScope,
    FlinkSubtaskState,
    FullyFinishedOperatorState,
    HandleAndLocalPath,
    IncrementalRemoteKeyedStateHandle,
    InMemoryChangelogStateHandle,
    KeyGroupsStateHandle,
    MergedChannelStateHandle,
    OperatorStateEntry,
    OperatorStreamStateHandle,
    RelativeFileStateHandle,
    SegmentFileStateHandle,
    flink_operator_id,
    parse_flink_metadata,
)
from tests.flink import _writer

T = FlinkHandleType
INLINE = ByteStreamStateHandle("file:/ck/4635591fc76af4447d9450ba3a37a9ff/chk-9/0b5e", b"\x00\x01\x02 state")
ABSOLUTE = FileStateHandle("s3://bucket/ck/4635591fc76af4447d9450ba3a37a9ff/shared/7c1d", 123_456)
RELATIVE = RelativeFileStateHandle("d4dd0a87-287e-4ba5-ac18-b3cfa1da3078", 21291)
SEGMENT = SegmentFileStateHandle("file:/ck/job/chk-9/merged-1", 64, 32, FlinkStateScope.EXCLUSIVE, "logical-1")
LEGACY_STREAM = KeyGroupsStateHandle(T.KEY_GROUPS, KeyGroupRange(0, 1), (0, 7), INLINE)  # type 3 as a stream

KEY_GROUPS_V2 = KeyGroupsStateHandle(T.KEY_GROUPS_V2, KeyGroupRange(0, 3), (0, 4, 9, 9), INLINE, "kg-id-1")
KEY_GROUPS_V1 = KeyGroupsStateHandle(T.KEY_GROUPS, KeyGroupRange(4, 5), (0, 10), ABSOLUTE)
SAVEPOINT_KEY_GROUPS = KeyGroupsStateHandle(T.SAVEPOINT_KEY_GROUPS, KeyGroupRange(6, 7), (3, 5), RELATIVE)
EMPTY_KEY_GROUPS = KeyGroupsStateHandle(T.KEY_GROUPS_V2, KeyGroupRange.empty(), (), INLINE, "kg-id-empty")
ROCKSDB = IncrementalRemoteKeyedStateHandle(
    T.INCREMENTAL_KEY_GROUPS_V2,
    checkpoint_id=9,
    backend_identifier="8f0b6a52-0c77-4a43-9e51-4ad0f1b1c0de",
    key_groups=KeyGroupRange(0, 63),
    checkpointed_size=4096,
    meta_state=INLINE,
    shared_state=(HandleAndLocalPath("000014.sst", ABSOLUTE), HandleAndLocalPath("000015.sst", LEGACY_STREAM)),
    private_state=(HandleAndLocalPath("MANIFEST-000005", INLINE), HandleAndLocalPath("OPTIONS-000013", RELATIVE)),
    state_handle_id="rocks-id",
)
ROCKSDB_V1 = IncrementalRemoteKeyedStateHandle(
    T.INCREMENTAL_KEY_GROUPS, 3, "legacy-backend-id", KeyGroupRange(64, 127), None, INLINE, (), (), None
)
IN_MEMORY_CHANGES = InMemoryChangelogStateHandle(KeyGroupRange(0, 9), 10, 20, ((-1, b"meta"), (3, b"x")), "mem")
DSTL = ChangelogStateHandleStreamImpl(
    T.CHANGELOG_FILE_INCREMENT_V2, KeyGroupRange(0, 9), ((ABSOLUTE, 0), (INLINE, 17)), 99, 50, "dstl", "s3-dstl"
)
DSTL_V1 = dataclasses.replace(DSTL, type_code=T.CHANGELOG_FILE_INCREMENT, storage_identifier="filesystem")
CHANGELOG = ChangelogStateBackendHandle(
    T.CHANGELOG_V2, KeyGroupRange(0, 9), 77, (KEY_GROUPS_V2, ROCKSDB), (IN_MEMORY_CHANGES, DSTL), 4, 9, "cl-id"
)
CHANGELOG_V1 = ChangelogStateBackendHandle(T.CHANGELOG, KeyGroupRange(0, 9), 7, (), (DSTL_V1,), 5, 5, "cl-id-1")

SOURCE_STATE = OperatorStreamStateHandle(
    T.PARTITIONABLE_OPERATOR,
    (
        OperatorStateEntry("SourceReaderState", FlinkDistributionMode.SPLIT_DISTRIBUTE, (234,)),
        OperatorStateEntry("union", FlinkDistributionMode.UNION, (1, 2, 3)),
        OperatorStateEntry("broadcast", FlinkDistributionMode.BROADCAST, ()),
    ),
    INLINE,
)
MERGED_OPERATOR_STATE = OperatorStreamStateHandle(
    T.SEGMENT_PARTITIONABLE_OPERATOR, (OperatorStateEntry("s", FlinkDistributionMode.UNION, (0,)),), SEGMENT,
    "file:/ck/taskowned", "file:/ck/shared", False,
)  # fmt: skip
EMPTY_MERGED_OPERATOR_STATE = OperatorStreamStateHandle(
    T.SEGMENT_PARTITIONABLE_OPERATOR, (), EmptySegmentFileStateHandle(), "file:/ck/taskowned", "file:/ck/shared", True
)


def channel_handles(version: int) -> tuple[tuple[FlinkChannelHandle, ...], tuple[FlinkChannelHandle, ...]]:
    inputs: list[FlinkChannelHandle] = [ChannelStateHandle(ChannelKind.INPUT_CHANNEL, 0, 0, 1, (0, 5), 10, INLINE)]
    outputs: list[FlinkChannelHandle] = [ChannelStateHandle(ChannelKind.RESULT_SUBPARTITION, 0, 2, 3, (), 0, ABSOLUTE)]
    if version >= 6:
        inputs.append(MergedChannelStateHandle(ChannelKind.INPUT_CHANNEL, 0, 40, INLINE, b"\x00\x01opaque"))
        outputs.append(MergedChannelStateHandle(ChannelKind.RESULT_SUBPARTITION, 0, 8, SEGMENT, b""))
    return tuple(inputs), tuple(outputs)


def checkpoint(version: int, properties_kind: str = "checkpoint") -> FlinkCheckpointMetadata:
    """A checkpoint with every handle type, a finished subtask, a fully finished and an empty operator."""
    named = version >= 5
    inputs, outputs = channel_handles(version)
    keyed = FlinkOperatorState(
        flink_operator_id("keyed"), "keyed op" if named else None, "keyed" if named else None, 4, 128, None,
        (
            FlinkSubtaskState(0, False, SOURCE_STATE, MERGED_OPERATOR_STATE, KEY_GROUPS_V2, ROCKSDB, inputs, outputs),
            FlinkSubtaskState(1, False, EMPTY_MERGED_OPERATOR_STATE, None, CHANGELOG, KEY_GROUPS_V1),
            FlinkSubtaskState(2, finished=True),
            FlinkSubtaskState(3, False, None, None, SAVEPOINT_KEY_GROUPS, CHANGELOG_V1),
        ),
    )  # fmt: skip
    more = FlinkOperatorState(
        flink_operator_id("more"), "more" if named else None, None, 2, 256, None,
        (FlinkSubtaskState(0, False, None, None, ROCKSDB_V1, EMPTY_KEY_GROUPS), FlinkSubtaskState(1)),
    )  # fmt: skip
    coordinator = ByteStreamStateHandle(flink_operator_id("src"), b"\x00" * 16)
    source = FlinkOperatorState(flink_operator_id("src"), None, "src" if named else None, 1, 1, coordinator, ())
    done = FullyFinishedOperatorState(flink_operator_id("done"), None, None, 3, 32768, None, ())
    properties = parse_properties(properties_kind) if version >= 4 else None
    return FlinkCheckpointMetadata(
        version, 9, (FlinkMasterState("hook", 2, b"payload"),), (keyed, more, source, done), properties
    )


def parse_properties(kind: str) -> FlinkCheckpointProperties | None:
    """The properties as the reader returns them for ``_writer.java_properties(kind)``."""
    data = _writer.header(4) + _writer.body(1, (), 4) + _writer.java_properties(kind)
    return parse_flink_metadata(data).properties
