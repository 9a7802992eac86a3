"""A test-only writer of Flink ``_metadata`` bytes, written from the format's layout, not from the reader.

It encodes the reader's model classes the way Flink's ``MetadataV3..V6Serializer`` would, so a test can
build any structure in any format version, parse it back, and compare; and re-encode a parsed real file
byte for byte. ``java_properties`` builds a small ``CheckpointProperties`` Java serialization stream.
"""

from __future__ import annotations

import struct

from keystate.storage.format.flink import (
    FLINK_METADATA_MAGIC,
    ByteStreamStateHandle,
    ChangelogStateBackendHandle,
    ChangelogStateHandleStreamImpl,
    ChannelKind,
    ChannelStateHandle,
    EmptySegmentFileStateHandle,
    FileStateHandle,
    FlinkChannelHandle,
    FlinkCheckpointMetadata,
    FlinkHandleType,
    FlinkKeyedHandle,
    FlinkMasterState,
    FlinkOperatorState,
    FlinkStreamHandle,
    FlinkSubtaskState,
    HandleAndLocalPath,
    IncrementalRemoteKeyedStateHandle,
    InMemoryChangelogStateHandle,
    KeyGroupsStateHandle,
    MergedChannelStateHandle,
    OperatorStreamStateHandle,
    RelativeFileStateHandle,
    SegmentFileStateHandle,
)

MASTER_STATE_MAGIC = 0xC96B1696


def i8(v: int) -> bytes:
    return struct.pack(">B", v)


def i16(v: int) -> bytes:
    return struct.pack(">h", v)


def i32(v: int) -> bytes:
    return struct.pack(">i", v)


def i64(v: int) -> bytes:
    return struct.pack(">q", v)


def utf(text: str) -> bytes:
    """``DataOutputStream.writeUTF``: u16 length, then modified UTF-8 of each UTF-16 code unit."""
    units = struct.unpack(
        f"<{len(text.encode('utf-16-le', 'surrogatepass')) // 2}H", text.encode("utf-16-le", "surrogatepass")
    )
    out = bytearray()
    for u in units:
        if 0 < u < 0x80:
            out.append(u)
        elif u < 0x800:
            out += bytes([0xC0 | (u >> 6), 0x80 | (u & 0x3F)])
        else:
            out += bytes([0xE0 | (u >> 12), 0x80 | ((u >> 6) & 0x3F), 0x80 | (u & 0x3F)])
    return struct.pack(">H", len(out)) + bytes(out)


def _key_groups(start: int, count: int) -> bytes:
    return i32(start) + i32(count)


def stream(h: FlinkStreamHandle | None) -> bytes:
    if h is None:
        return i8(0)
    if isinstance(h, ByteStreamStateHandle):
        return i8(1) + utf(h.handle_name) + i32(len(h.data)) + h.data
    if isinstance(h, FileStateHandle):
        return i8(2) + i64(h.size) + utf(h.path)
    if isinstance(h, RelativeFileStateHandle):
        return i8(6) + utf(h.relative_path) + i64(h.size)
    if isinstance(h, SegmentFileStateHandle):
        return i8(15) + i64(h.start_pos) + i64(h.size) + i32(int(h.scope)) + utf(h.file_path) + utf(h.logical_file_id)
    if isinstance(h, EmptySegmentFileStateHandle):
        return i8(16)
    assert h.type_code is FlinkHandleType.KEY_GROUPS, "only type 3 is a stream handle among the keyed ones"
    return keyed(h)


def _files(files: tuple[HandleAndLocalPath, ...]) -> bytes:
    return i32(len(files)) + b"".join(utf(f.local_path) + stream(f.handle) for f in files)


def keyed(h: FlinkKeyedHandle | None) -> bytes:
    if h is None:
        return i8(0)
    code = i8(int(h.type_code))
    kg = _key_groups(h.key_groups.start, len(h.key_groups))
    if isinstance(h, KeyGroupsStateHandle):
        body = kg + b"".join(i64(o) for o in h.offsets) + stream(h.delegate)
        if h.type_code is FlinkHandleType.KEY_GROUPS_V2:
            assert h.state_handle_id is not None
            body += utf(h.state_handle_id)
        return code + body
    if isinstance(h, IncrementalRemoteKeyedStateHandle):
        v2 = h.type_code is FlinkHandleType.INCREMENTAL_KEY_GROUPS_V2
        body = i64(h.checkpoint_id) + utf(h.backend_identifier) + kg
        if v2:
            assert h.checkpointed_size is not None
            body += i64(h.checkpointed_size)
        body += stream(h.meta_state) + _files(h.shared_state) + _files(h.private_state)
        if v2:
            assert h.state_handle_id is not None
            body += utf(h.state_handle_id)
        return code + body
    if isinstance(h, ChangelogStateBackendHandle):
        body = kg + i64(h.checkpointed_size)
        body += i32(len(h.materialized)) + b"".join(keyed(m) for m in h.materialized)
        body += i32(len(h.non_materialized)) + b"".join(keyed(m) for m in h.non_materialized)
        body += i64(h.materialization_id)
        if h.type_code is FlinkHandleType.CHANGELOG_V2:
            body += i64(h.checkpoint_id)
        return code + body + utf(h.state_handle_id)
    if isinstance(h, InMemoryChangelogStateHandle):
        body = kg + i64(h.from_sequence) + i64(h.to_sequence) + i32(len(h.changes))
        body += b"".join(i32(g) + i32(len(c)) + c for g, c in h.changes)
        return code + body + utf(h.state_handle_id)
    assert isinstance(h, ChangelogStateHandleStreamImpl)
    body = kg + i32(len(h.handles_and_offsets)) + b"".join(i64(o) + stream(s) for s, o in h.handles_and_offsets)
    body += i64(h.size) + i64(h.checkpointed_size) + utf(h.state_handle_id)
    if h.type_code is FlinkHandleType.CHANGELOG_FILE_INCREMENT_V2:
        body += utf(h.storage_identifier)
    return code + body


def operator_handle(h: OperatorStreamStateHandle | None) -> bytes:
    if h is None:
        return i32(0)
    body = i32(1) + i8(int(h.type_code)) + i32(len(h.states))
    for e in h.states:
        body += utf(e.name) + i8(int(e.mode)) + i32(len(e.offsets)) + b"".join(i64(o) for o in e.offsets)
    if h.type_code is FlinkHandleType.SEGMENT_PARTITIONABLE_OPERATOR:
        assert h.task_owned_dir is not None
        assert h.shared_dir is not None
        body += utf(h.task_owned_dir) + utf(h.shared_dir) + i8(1 if h.is_empty else 0)
    return body + stream(h.delegate)


def channel(h: FlinkChannelHandle, version: int) -> bytes:
    if isinstance(h, MergedChannelStateHandle):
        assert version >= 6, "merged channel handles exist only in format 6"
        code = 3 if h.kind is ChannelKind.INPUT_CHANNEL else 4
        body = i32(h.subtask_index) + i64(h.size) + stream(h.delegate)
        return i8(code) + body + i32(len(h.serialized_channel_offsets)) + h.serialized_channel_offsets
    assert isinstance(h, ChannelStateHandle)
    body = i32(h.subtask_index) + i32(h.first_index) + i32(h.second_index)
    body += i32(len(h.offsets)) + b"".join(i64(o) for o in h.offsets) + i64(h.size) + stream(h.delegate)
    return (i8(int(h.kind)) if version >= 6 else b"") + body


def subtask(s: FlinkSubtaskState, version: int) -> bytes:
    if s.finished:
        return i32(-(s.index + 1))
    body = i32(s.index) + operator_handle(s.managed_operator_state) + operator_handle(s.raw_operator_state)
    body += keyed(s.managed_keyed_state) + keyed(s.raw_keyed_state)
    for handles in (s.input_channel_state, s.result_subpartition_state):
        body += i32(len(handles)) + b"".join(channel(h, version) for h in handles)
    return body


def operator(op: FlinkOperatorState, version: int) -> bytes:
    body = utf(op.name or "") + utf(op.uid or "") if version >= 5 else b""
    body += bytes.fromhex(op.operator_id) + i32(op.parallelism) + i32(op.max_parallelism)
    body += stream(op.coordinator_state)
    if op.fully_finished:
        return body + i32(-1)
    return body + i32(len(op.subtasks)) + b"".join(subtask(s, version) for s in op.subtasks)


def master(m: FlinkMasterState) -> bytes:
    inner = i32(m.version) + utf(m.name) + i32(len(m.payload)) + m.payload
    return struct.pack(">I", MASTER_STATE_MAGIC) + i32(len(inner)) + inner


def header(version: int) -> bytes:
    return i32(FLINK_METADATA_MAGIC) + i32(version)


def body(
    checkpoint_id: int,
    operators: tuple[FlinkOperatorState, ...],
    version: int,
    masters: tuple[FlinkMasterState, ...] = (),
) -> bytes:
    out = i64(checkpoint_id) + i32(len(masters)) + b"".join(master(m) for m in masters)
    return out + i32(len(operators)) + b"".join(operator(op, version) for op in operators)


def metadata(m: FlinkCheckpointMetadata) -> bytes:
    """The whole file: header, body and (format 4+) the properties' raw bytes."""
    out = header(m.format_version) + body(m.checkpoint_id, m.operators, m.format_version, m.master_states)
    if m.format_version >= 4:
        assert m.properties is not None
        out += m.properties.raw
    return out


# --- a minimal Java serialization stream of CheckpointProperties ------------------------------------------------

_TC_NULL, _TC_REFERENCE, _TC_CLASSDESC, _TC_OBJECT, _TC_STRING, _TC_ENDBLOCKDATA, _TC_ENUM = (
    0x70, 0x71, 0x72, 0x73, 0x74, 0x78, 0x7E
)  # fmt: skip
_PACKAGE = "org.apache.flink.runtime.checkpoint."
_FLAGS = (
    "discardCancelled",
    "discardFailed",
    "discardFinished",
    "discardSubsumed",
    "discardSuspended",
    "forced",
    "unclaimed",
)


class _JavaStream:
    """Just enough of ``ObjectOutputStream`` for CheckpointProperties with a Checkpoint- or SavepointType."""

    def __init__(self) -> None:
        self.out = bytearray(b"\xac\xed\x00\x05")
        self.next_handle = 0x7E0000
        self.strings: dict[str, int] = {}

    def handle(self) -> int:
        self.next_handle += 1
        return self.next_handle - 1

    def string(self, text: str) -> None:
        if text in self.strings:
            self.out += i8(_TC_REFERENCE) + i32(self.strings[text])
            return
        self.strings[text] = self.handle()
        self.out += i8(_TC_STRING) + utf(text)

    def class_desc(self, name: str, uid: int, flags: int, fields: list[tuple[str, str, str | None]]) -> None:
        """fields: (type code, name, class signature for object fields)."""
        self.out += i8(_TC_CLASSDESC) + utf(name) + i64(uid)
        self.handle()
        self.out += i8(flags) + i16(len(fields))
        for code, field_name, signature in fields:
            self.out += code.encode() + utf(field_name)
            if signature is not None:
                self.string(signature)
        self.out += i8(_TC_ENDBLOCKDATA)

    def enum(self, class_name: str, constant: str) -> None:
        self.out += i8(_TC_ENUM)
        self.class_desc(class_name, 0, 0x12, [])
        self.class_desc("java.lang.Enum", 0, 0x12, [])
        self.out += i8(_TC_NULL)
        self.handle()
        self.string(constant)


def java_properties(kind: str = "checkpoint", *, forced: bool = False, format_type: str = "CANONICAL") -> bytes:
    """A ``CheckpointProperties`` stream with a CheckpointType (``kind="checkpoint"``) or a SavepointType."""
    s = _JavaStream()
    s.out += i8(_TC_OBJECT)
    s.class_desc(_PACKAGE + "CheckpointProperties", 2, 0x02, [("Z", f, None) for f in _FLAGS] + [
        ("L", "checkpointType", "Lorg/apache/flink/runtime/checkpoint/SnapshotType;")
    ])  # fmt: skip
    s.out += i8(_TC_NULL)  # no superclass
    s.handle()
    s.out += b"".join(i8(1 if (f == "forced" and forced) or f.startswith("discardS") else 0) for f in _FLAGS)
    s.out += i8(_TC_OBJECT)
    if kind == "checkpoint":
        s.class_desc(_PACKAGE + "CheckpointType", 7, 0x02, [
            ("L", "name", "Ljava/lang/String;"),
            ("L", "sharingFilesStrategy", "Lorg/apache/flink/runtime/checkpoint/SnapshotType$SharingFilesStrategy;"),
        ])  # fmt: skip
        s.out += i8(_TC_NULL)
        s.handle()
        s.string("Checkpoint")
        s.enum(_PACKAGE + "SnapshotType$SharingFilesStrategy", "FORWARD_BACKWARD")
    else:
        s.class_desc(_PACKAGE + "SavepointType", 8, 0x02, [
            ("L", "formatType", "Lorg/apache/flink/core/execution/SavepointFormatType;"),
            ("L", "name", "Ljava/lang/String;"),
            ("L", "postCheckpointAction", "Lorg/apache/flink/runtime/checkpoint/SavepointType$PostCheckpointAction;"),
        ])  # fmt: skip
        s.out += i8(_TC_NULL)
        s.handle()
        s.enum("org.apache.flink.core.execution.SavepointFormatType", format_type)
        s.string("Savepoint")
        s.enum(_PACKAGE + "SavepointType$PostCheckpointAction", "NONE")
    return bytes(s.out)
