"""Flink's state handles as frozen classes: what a ``_metadata`` says about where state bytes are.

Classes are named after Flink's (``KeyGroupsStateHandle`` is Flink's class of that name); where one class
stands for a few Flink classes (input channel / result subpartition, the file-merging variants),
``flink_class`` gives the Java class name. ``type_code`` is the handle's type byte in the file, and
``state_size`` is what Flink's ``getStateSize()`` returns, so sizes add up the way Flink reports them.
Nothing here reads files: a path is only a string, and inline bytes are the bytes the ``_metadata`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

from keystate.storage.format.keygroups import KeyGroupRange

__all__ = [
    "ByteStreamStateHandle",
    "ChangelogStateBackendHandle",
    "ChangelogStateHandleStreamImpl",
    "ChannelKind",
    "ChannelStateHandle",
    "EmptySegmentFileStateHandle",
    "FileStateHandle",
    "FlinkChannelHandle",
    "FlinkDistributionMode",
    "FlinkHandleType",
    "FlinkKeyedHandle",
    "FlinkStateScope",
    "FlinkStreamHandle",
    "HandleAndLocalPath",
    "InMemoryChangelogStateHandle",
    "IncrementalRemoteKeyedStateHandle",
    "KeyGroupsStateHandle",
    "MergedChannelStateHandle",
    "OperatorStateEntry",
    "OperatorStreamStateHandle",
    "RelativeFileStateHandle",
    "SegmentFileStateHandle",
]


class FlinkHandleType(IntEnum):
    """The handle type bytes of ``MetadataV2V3SerializerBase`` (Flink 2.3.0)."""

    NULL = 0
    BYTE_STREAM = 1
    FILE_STREAM = 2
    KEY_GROUPS = 3
    PARTITIONABLE_OPERATOR = 4
    INCREMENTAL_KEY_GROUPS = 5
    RELATIVE_STREAM = 6
    SAVEPOINT_KEY_GROUPS = 7
    CHANGELOG = 8
    CHANGELOG_BYTE_INCREMENT = 9
    CHANGELOG_FILE_INCREMENT = 10
    INCREMENTAL_KEY_GROUPS_V2 = 11
    KEY_GROUPS_V2 = 12
    CHANGELOG_FILE_INCREMENT_V2 = 13
    CHANGELOG_V2 = 14
    SEGMENT_FILE = 15
    EMPTY_SEGMENT_FILE = 16
    SEGMENT_PARTITIONABLE_OPERATOR = 17


class FlinkDistributionMode(IntEnum):
    """How Flink redistributes operator list state on restore (``OperatorStateHandle.Mode``, by ordinal)."""

    SPLIT_DISTRIBUTE = 0
    UNION = 1
    BROADCAST = 2


class FlinkStateScope(IntEnum):
    """``CheckpointedStateScope`` of a file-merging segment, by ordinal."""

    SHARED = 0
    EXCLUSIVE = 1


class ChannelKind(IntEnum):
    """Which side of a network channel an unaligned checkpoint's in-flight data belongs to."""

    INPUT_CHANNEL = 1
    RESULT_SUBPARTITION = 2


# --- stream handles: the bytes of one file or blob ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ByteStreamStateHandle:
    """State small enough to be stored inside ``_metadata`` (type 1)."""

    type_code: ClassVar[FlinkHandleType] = FlinkHandleType.BYTE_STREAM
    flink_class: ClassVar[str] = "ByteStreamStateHandle"
    handle_name: str
    """The URI the file would have had (``file:/.../chk-3/<uuid>``); for coordinator state the operator ID."""
    data: bytes

    @property
    def state_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class FileStateHandle:
    """A whole file at an absolute Flink path (type 2): shared files, or any file with entropy injection."""

    type_code: ClassVar[FlinkHandleType] = FlinkHandleType.FILE_STREAM
    flink_class: ClassVar[str] = "FileStateHandle"
    path: str
    """A Flink ``Path`` string such as ``file:/data/ck/<jobId>/shared/<uuid>`` or ``s3://bucket/...``."""
    size: int

    @property
    def state_size(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True)
class RelativeFileStateHandle:
    """A file in the checkpoint's own directory, named relative to it (type 6): relocatable."""

    type_code: ClassVar[FlinkHandleType] = FlinkHandleType.RELATIVE_STREAM
    flink_class: ClassVar[str] = "RelativeFileStateHandle"
    relative_path: str
    """Resolved by Flink as ``<directory of _metadata>/<relative_path>``."""
    size: int

    @property
    def state_size(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True)
class SegmentFileStateHandle:
    """The bytes ``[start_pos, start_pos + size)`` of a merged file (type 15, file merging, Flink 1.20+)."""

    type_code: ClassVar[FlinkHandleType] = FlinkHandleType.SEGMENT_FILE
    flink_class: ClassVar[str] = "SegmentFileStateHandle"
    file_path: str
    start_pos: int
    size: int
    scope: FlinkStateScope
    logical_file_id: str

    @property
    def state_size(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True)
class EmptySegmentFileStateHandle:
    """A placeholder segment with no bytes (type 16, file merging)."""

    type_code: ClassVar[FlinkHandleType] = FlinkHandleType.EMPTY_SEGMENT_FILE
    flink_class: ClassVar[str] = "EmptySegmentFileStateHandle"

    @property
    def state_size(self) -> int:
        return 0


# --- keyed state handles --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyGroupsStateHandle:
    """Keyed state of a key-group range in one stream, with each key group's offset into it.

    Type 12 (Flink 1.15+ full snapshots, with a state handle ID), 3 (older writers; also legal as a
    stream handle) or 7 (``KeyGroupsSavepointStateHandle``, canonical savepoints).
    """

    type_code: FlinkHandleType
    key_groups: KeyGroupRange
    offsets: tuple[int, ...]
    """One offset per key group of ``key_groups``, in key-group order: ``len(offsets) == len(key_groups)``."""
    delegate: FlinkStreamHandle
    state_handle_id: str | None = None
    """Only type 12 stores it."""

    @property
    def flink_class(self) -> str:
        if self.type_code is FlinkHandleType.SAVEPOINT_KEY_GROUPS:
            return "KeyGroupsSavepointStateHandle"
        return "KeyGroupsStateHandle"

    @property
    def state_size(self) -> int:
        return self.delegate.state_size

    @property
    def checkpointed_size(self) -> int:
        return self.state_size

    def offset_for(self, key_group: int) -> int:
        """The offset of ``key_group`` in the delegate stream; KeyError if the range does not hold it."""
        if key_group not in self.key_groups:
            raise KeyError(f"key group {key_group} is not in this handle's range {self.key_groups}")
        return self.offsets[key_group - self.key_groups.start]


@dataclass(frozen=True, slots=True)
class HandleAndLocalPath:
    """One file of a RocksDB snapshot: its local file name (``000014.sst``, ``MANIFEST-000005``) and bytes."""

    local_path: str
    handle: FlinkStreamHandle


@dataclass(frozen=True, slots=True)
class IncrementalRemoteKeyedStateHandle:
    """A RocksDB snapshot (type 11; type 5 from older writers), incremental or full.

    ``shared_state`` files may be referenced by later checkpoints; ``private_state`` files belong to this
    one. Flink 2.x also writes full RocksDB snapshots this way, with no shared files.
    """

    type_code: FlinkHandleType
    flink_class: ClassVar[str] = "IncrementalRemoteKeyedStateHandle"
    checkpoint_id: int
    backend_identifier: str
    """The RocksDB backend's UUID as text (older writers may have stored another string)."""
    key_groups: KeyGroupRange
    checkpointed_size: int | None
    """Bytes new in this checkpoint (type 11); None for type 5, which does not store it."""
    meta_state: FlinkStreamHandle
    shared_state: tuple[HandleAndLocalPath, ...]
    private_state: tuple[HandleAndLocalPath, ...]
    state_handle_id: str | None = None
    """Only type 11 stores it."""

    @property
    def state_size(self) -> int:
        files = sum(f.handle.state_size for f in self.shared_state) + sum(
            f.handle.state_size for f in self.private_state
        )
        return self.meta_state.state_size + files


@dataclass(frozen=True, slots=True)
class ChangelogStateBackendHandle:
    """The changelog state backend's handle (type 14; 8 from older writers): materialized + changelog parts."""

    type_code: FlinkHandleType
    flink_class: ClassVar[str] = "ChangelogStateBackendHandleImpl"
    key_groups: KeyGroupRange
    checkpointed_size: int
    materialized: tuple[FlinkKeyedHandle, ...]
    non_materialized: tuple[InMemoryChangelogStateHandle | ChangelogStateHandleStreamImpl, ...]
    materialization_id: int
    checkpoint_id: int
    """Type 8 does not store it: there it equals ``materialization_id``, as Flink reads it."""
    state_handle_id: str

    @property
    def state_size(self) -> int:
        return sum(h.state_size for h in self.materialized) + sum(h.state_size for h in self.non_materialized)


@dataclass(frozen=True, slots=True)
class InMemoryChangelogStateHandle:
    """State changes held inline (type 9): ``(key group, change bytes)`` pairs; key group -1 is metadata."""

    type_code: ClassVar[FlinkHandleType] = FlinkHandleType.CHANGELOG_BYTE_INCREMENT
    flink_class: ClassVar[str] = "InMemoryChangelogStateHandle"
    key_groups: KeyGroupRange
    from_sequence: int
    to_sequence: int
    changes: tuple[tuple[int, bytes], ...]
    state_handle_id: str

    @property
    def state_size(self) -> int:
        return sum(len(change) for _, change in self.changes)

    @property
    def checkpointed_size(self) -> int:
        return self.state_size


@dataclass(frozen=True, slots=True)
class ChangelogStateHandleStreamImpl:
    """State changes in DSTL files (type 13; 10 from older writers): ``(stream handle, offset)`` pairs."""

    type_code: FlinkHandleType
    flink_class: ClassVar[str] = "ChangelogStateHandleStreamImpl"
    key_groups: KeyGroupRange
    handles_and_offsets: tuple[tuple[FlinkStreamHandle, int], ...]
    size: int
    checkpointed_size: int
    state_handle_id: str
    storage_identifier: str
    """Type 10 does not store it: there it is ``"filesystem"``, as Flink reads it."""

    @property
    def state_size(self) -> int:
        return self.size


# --- operator (non-keyed) state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OperatorStateEntry:
    """One named operator state (list, union or broadcast state) inside an operator state handle."""

    name: str
    mode: FlinkDistributionMode
    offsets: tuple[int, ...]
    """Offset of each list element's partition in the delegate stream (empty when the list is empty)."""


@dataclass(frozen=True, slots=True)
class OperatorStreamStateHandle:
    """A subtask's operator state: named states with their offsets into one stream (type 4).

    Type 17 (``FileMergingOperatorStreamStateHandle``, Flink 1.20+ with file merging) adds the task-owned
    and shared directories and an ``is_empty`` flag, and its delegate is a segment handle (15 or 16).
    """

    type_code: FlinkHandleType
    states: tuple[OperatorStateEntry, ...]
    """In file order; names are unique."""
    delegate: FlinkStreamHandle
    task_owned_dir: str | None = None
    shared_dir: str | None = None
    is_empty: bool | None = None

    @property
    def flink_class(self) -> str:
        if self.type_code is FlinkHandleType.SEGMENT_PARTITIONABLE_OPERATOR:
            return (
                "EmptyFileMergingOperatorStreamStateHandle" if self.is_empty else "FileMergingOperatorStreamStateHandle"
            )
        return "OperatorStreamStateHandle"

    @property
    def state_size(self) -> int:
        return self.delegate.state_size

    def state(self, name: str) -> OperatorStateEntry:
        """The entry named ``name``; KeyError if the handle has none."""
        for entry in self.states:
            if entry.name == name:
                return entry
        raise KeyError(f"no operator state named {name!r}; the handle holds {[e.name for e in self.states]}")


# --- channel state (unaligned checkpoints) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelStateHandle:
    """In-flight data of one input channel or result subpartition (``InputChannelStateHandle`` / ...).

    ``first_index, second_index`` are (gate index, input channel index) for an input channel and
    (partition index, subpartition index) for a result subpartition.
    """

    kind: ChannelKind
    subtask_index: int
    first_index: int
    second_index: int
    offsets: tuple[int, ...]
    size: int
    delegate: FlinkStreamHandle

    @property
    def flink_class(self) -> str:
        return "InputChannelStateHandle" if self.kind is ChannelKind.INPUT_CHANNEL else "ResultSubpartitionStateHandle"

    @property
    def state_size(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True)
class MergedChannelStateHandle:
    """In-flight data of all channels of one side, merged (format 6 only); the channel offsets are opaque."""

    kind: ChannelKind
    subtask_index: int
    size: int
    delegate: FlinkStreamHandle
    serialized_channel_offsets: bytes

    @property
    def flink_class(self) -> str:
        if self.kind is ChannelKind.INPUT_CHANNEL:
            return "MergedInputChannelStateHandle"
        return "MergedResultSubpartitionStateHandle"

    @property
    def state_size(self) -> int:
        return self.size


FlinkStreamHandle: TypeAlias = (
    ByteStreamStateHandle
    | FileStateHandle
    | RelativeFileStateHandle
    | SegmentFileStateHandle
    | EmptySegmentFileStateHandle
    | KeyGroupsStateHandle
)
"""Any handle that stands for the bytes of one stream."""

FlinkKeyedHandle: TypeAlias = (
    KeyGroupsStateHandle
    | IncrementalRemoteKeyedStateHandle
    | ChangelogStateBackendHandle
    | InMemoryChangelogStateHandle
    | ChangelogStateHandleStreamImpl
)
"""Any handle of keyed state (managed or raw)."""

FlinkChannelHandle: TypeAlias = ChannelStateHandle | MergedChannelStateHandle
