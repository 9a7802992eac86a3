"""Read Apache Flink's own ``_metadata`` files (format versions 3-6: Flink 1.11 to 2.3), with no I/O and no JVM.

::

    from keystate.storage.format.flink import looks_like_flink_metadata, parse_flink_metadata

    data = path.read_bytes()
    if looks_like_flink_metadata(data[:8]):
        checkpoint = parse_flink_metadata(data, location=str(path))
        for op in checkpoint.operators:
            print(op.operator_id, op.uid, op.status, op.state_size)

``flink_operator_id(uid)`` gives the operator ID Flink derives from a ``.uid()``, to match a topology's
uids to the operators of a checkpoint (formats 3-4 store no uid). The reader never deserializes Java
objects, and its time and memory are linear in the file's size whatever the bytes claim.
"""

from keystate.storage.format.flink._errors import (
    SUPPORTED_FLINK_METADATA_VERSIONS,
    FlinkMetadataError,
    NotFlinkMetadataError,
    TruncatedFlinkMetadataError,
    UnsupportedFlinkHandleError,
    UnsupportedFlinkMetadataVersionError,
)
from keystate.storage.format.flink._handles import (
    ByteStreamStateHandle,
    ChangelogStateBackendHandle,
    ChangelogStateHandleStreamImpl,
    ChannelKind,
    ChannelStateHandle,
    EmptySegmentFileStateHandle,
    FileStateHandle,
    FlinkChannelHandle,
    FlinkDistributionMode,
    FlinkHandleType,
    FlinkKeyedHandle,
    FlinkStateScope,
    FlinkStreamHandle,
    HandleAndLocalPath,
    IncrementalRemoteKeyedStateHandle,
    InMemoryChangelogStateHandle,
    KeyGroupsStateHandle,
    MergedChannelStateHandle,
    OperatorStateEntry,
    OperatorStreamStateHandle,
    RelativeFileStateHandle,
    SegmentFileStateHandle,
)
from keystate.storage.format.flink._model import (
    FlinkCheckpointMetadata,
    FlinkCheckpointProperties,
    FlinkMasterState,
    FlinkOperatorState,
    FlinkSubtaskState,
    FullyFinishedOperatorState,
)
from keystate.storage.format.flink._murmur import flink_operator_id, murmur3_x64_128
from keystate.storage.format.flink._reader import FLINK_METADATA_MAGIC, looks_like_flink_metadata, parse_flink_metadata

__all__ = [
    "FLINK_METADATA_MAGIC",
    "SUPPORTED_FLINK_METADATA_VERSIONS",
    "ByteStreamStateHandle",
    "ChangelogStateBackendHandle",
    "ChangelogStateHandleStreamImpl",
    "ChannelKind",
    "ChannelStateHandle",
    "EmptySegmentFileStateHandle",
    "FileStateHandle",
    "FlinkChannelHandle",
    "FlinkCheckpointMetadata",
    "FlinkCheckpointProperties",
    "FlinkDistributionMode",
    "FlinkHandleType",
    "FlinkKeyedHandle",
    "FlinkMasterState",
    "FlinkMetadataError",
    "FlinkOperatorState",
    "FlinkStateScope",
    "FlinkStreamHandle",
    "FlinkSubtaskState",
    "FullyFinishedOperatorState",
    "HandleAndLocalPath",
    "InMemoryChangelogStateHandle",
    "IncrementalRemoteKeyedStateHandle",
    "KeyGroupsStateHandle",
    "MergedChannelStateHandle",
    "NotFlinkMetadataError",
    "OperatorStateEntry",
    "OperatorStreamStateHandle",
    "RelativeFileStateHandle",
    "SegmentFileStateHandle",
    "TruncatedFlinkMetadataError",
    "UnsupportedFlinkHandleError",
    "UnsupportedFlinkMetadataVersionError",
    "flink_operator_id",
    "looks_like_flink_metadata",
    "murmur3_x64_128",
    "parse_flink_metadata",
]
