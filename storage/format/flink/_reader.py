"""Parse the bytes of a Flink ``_metadata`` (format versions 3-6, Flink 1.11-2.3); no I/O. Layout::

    >i magic 0x4960672d | >i version (3, 4, 5 or 6)
    >q checkpoint id (>= 0)
    >i m (>= 0) | m x master state
    >i n (>= 0) | n x operator state, in the writer's hash-map order
    formats 4-6: a Java serialization stream of CheckpointProperties, to the end of the file

    master state    >i magic 0xc96b1696 | >i len (> 0) | len bytes = { >i version | utf name | >i k | k bytes }
    operator state  formats 5-6: utf name | utf uid                          ("" = none)
                    16 bytes operator ID (lower part, upper part: OperatorID.toHexString() order)
                    | >i parallelism | >i max parallelism
                    | stream handle: coordinator state (0 = none, else type 1, ByteStreamStateHandle)
                    | >i s: negative = fully finished, nothing follows (Flink writes -1)
                    |       else s x { >i idx: idx >= 0 = subtask state of subtask idx follows,
                    |                          idx <  0 = subtask -(idx + 1) finished, nothing follows }
    subtask state   >i flag | (flag != 0) operator handle           managed operator state
                    | >i flag | (flag != 0) operator handle         raw operator state
                    | keyed handle | keyed handle                   managed, raw keyed state (type 0 = none)
                    | >i c | c x input channel handle | >i d | d x result subpartition handle

Handle layouts are in :mod:`keystate.storage.format.flink._handle_reader`, the properties walk in
:mod:`keystate.storage.format.flink._javaser`. Format 5 adds the name and uid; format 6 changes only the
channel handles. Nothing after the last operator (format 3) or after the properties object is allowed.
"""

from __future__ import annotations

import struct

from keystate.storage.format.flink._cursor import TRUNCATED, Cursor
from keystate.storage.format.flink._errors import (
    SUPPORTED_FLINK_METADATA_VERSIONS,
    NotFlinkMetadataError,
    TruncatedFlinkMetadataError,
    UnsupportedFlinkMetadataVersionError,
)
from keystate.storage.format.flink._handle_reader import HandleReader
from keystate.storage.format.flink._handles import ByteStreamStateHandle, ChannelKind
from keystate.storage.format.flink._javaser import EnumConstant, JavaObject, walk_java_stream
from keystate.storage.format.flink._model import (
    FlinkCheckpointMetadata,
    FlinkCheckpointProperties,
    FlinkMasterState,
    FlinkOperatorState,
    FlinkSubtaskState,
    FullyFinishedOperatorState,
)
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM

__all__ = ["FLINK_METADATA_MAGIC", "looks_like_flink_metadata", "parse_flink_metadata"]

FLINK_METADATA_MAGIC = 0x4960672D
"""``Checkpoints.HEADER_MAGIC_NUMBER``: the first four bytes of every Flink ``_metadata``."""
_MASTER_STATE_MAGIC = 0xC96B1696
_HEADER = struct.Struct(">ii")  # >i magic | >i version
_MAGIC_BYTES = FLINK_METADATA_MAGIC.to_bytes(4, "big")
_PROPERTIES_CLASS = "org.apache.flink.runtime.checkpoint.CheckpointProperties"
# The smallest encoding of one item, for the count checks: master state = magic, len, version, utf "", k;
# operator = [utf "", utf ""] + ID + parallelism + max parallelism + coordinator type + count.
_MIN_MASTER_STATE = 18
_MIN_SUBTASK_ENTRY = 4


def looks_like_flink_metadata(prefix: bytes) -> bool:
    """Whether bytes starting with ``prefix`` (at least the first 8) are a Flink ``_metadata`` of any version.

    True for versions this reader refuses too (2, 7, ...), so that :func:`parse_flink_metadata` can say
    why; False for keystate's JSON metadata, an empty file or fewer than 8 bytes.
    """
    if len(prefix) < _HEADER.size:
        return False
    magic, version = _HEADER.unpack_from(prefix)
    return bool(magic == FLINK_METADATA_MAGIC and 0 < version <= 0xFFFF)


def _header(data: bytes, where: str) -> int:
    if len(data) < _HEADER.size:
        if data and (_MAGIC_BYTES.startswith(data) or data.startswith(_MAGIC_BYTES)):
            raise TruncatedFlinkMetadataError(
                f"{where}: header (at byte 0): the file is {len(data)} bytes, shorter than the 8-byte header "
                f"(magic, version) of a Flink _metadata; {TRUNCATED}",
                offset=len(data),
            )
        found = "the file is empty" if not data else f"the file is {len(data)} bytes: {data.hex(' ')}"
        raise NotFlinkMetadataError(
            f"{where}: header (at byte 0): not a Flink _metadata: {found}; a Flink _metadata starts with the magic "
            "number 49 60 67 2d and a 4-byte version",
            offset=0,
        )
    magic, version = _HEADER.unpack_from(data)
    if magic != FLINK_METADATA_MAGIC:
        hint = " (it looks like JSON, e.g. keystate's own _metadata: read it with keystate's metadata loader)"
        raise NotFlinkMetadataError(
            f"{where}: header (at byte 0): not a Flink _metadata: expected the magic number 49 60 67 2d, found "
            f"{data[:4].hex(' ')}{hint if data.lstrip()[:1] in (b'{', b'[') else ''}",
            offset=0,
        )
    if version not in SUPPORTED_FLINK_METADATA_VERSIONS:
        raise UnsupportedFlinkMetadataVersionError(version, where)
    return int(version)


def parse_flink_metadata(data: bytes, *, location: str = "") -> FlinkCheckpointMetadata:
    """Parse the bytes of a Flink ``_metadata`` (format 3, 4, 5 or 6: Flink 1.11 to 2.3).

    No Java object is deserialized: the properties trailer of format 4+ is walked as a byte grammar
    and kept as opaque bytes. Time and memory are linear in ``len(data)`` whatever the bytes say.

    Args:
        data: the whole file.
        location: where the bytes came from (a path or URI); it prefixes every error message.

    Returns:
        The checkpoint, its operators in file order, and (format 4+) its properties.

    Raises:
        NotFlinkMetadataError: the bytes do not start with Flink's magic number (empty, JSON, other).
        UnsupportedFlinkMetadataVersionError: Flink's magic, but a version other than 3-6.
        TruncatedFlinkMetadataError: the file ends before its structure does.
        UnsupportedFlinkHandleError: a state handle type byte outside 0-17.
        FlinkMetadataError: any other violation of the format (the base class of all of the above).
    """
    data = bytes(data)
    where = location or "Flink _metadata"
    version = _header(data, where)
    cur = Cursor(data, where)
    cur.raw(_HEADER.size, "header")
    handles = HandleReader(cur, version)
    at = cur.pos
    checkpoint_id = cur.i64("checkpoint id")
    if checkpoint_id < 0:
        raise cur.error("checkpoint id", f"expected a checkpoint id >= 0, found {checkpoint_id}", at=at)
    masters = tuple(
        _master_state(cur, i)
        for i in range(cur.count("master state count", item_bytes=_MIN_MASTER_STATE, item="master states"))
    )
    min_operator = 29 + (4 if version >= 5 else 0)
    operators: list[FlinkOperatorState] = []
    seen: dict[str, int] = {}
    for i in range(cur.count("operator count", item_bytes=min_operator, item="operator states")):
        at = cur.pos
        op = _operator(cur, handles, version, i)
        if op.operator_id in seen:
            raise cur.error(
                f"operator #{i}",
                f"operator ID {op.operator_id} appears twice (first as operator #{seen[op.operator_id]})",
                at=at,
            )
        seen[op.operator_id] = i
        operators.append(op)
    properties = _properties(cur, data, version) if version >= 4 else None
    if cur.remaining:
        after = "the properties object" if version >= 4 else "the last operator (format 3 has nothing after it)"
        raise cur.error("end of file", f"expected the end of the file after {after}, found {cur.remaining} more bytes")
    return FlinkCheckpointMetadata(version, checkpoint_id, masters, tuple(operators), properties, location)


def _master_state(cur: Cursor, i: int) -> FlinkMasterState:
    with cur.scope(f"master state #{i}"):
        at = cur.pos
        magic = cur.i32("magic") & 0xFFFFFFFF
        if magic != _MASTER_STATE_MAGIC:
            raise cur.error("magic", f"expected c9 6b 16 96, found {magic:08x}", at=at)
        at = cur.pos
        length = cur.i32("length")
        if length <= 0:
            raise cur.error("length", f"expected a length > 0, found {length}", at=at)
        cur.need(length, "bytes")
        end = cur.pos + length
        version = cur.i32("version")
        name = cur.utf("name")
        payload = cur.raw(cur.count("payload length", item_bytes=1, item="bytes"), "payload")
        if cur.pos != end:
            raise cur.error(
                "length", f"the fields take {cur.pos - end + length} bytes, not the {length} announced", at=at
            )
        return FlinkMasterState(name, version, payload)


def _operator(cur: Cursor, handles: HandleReader, version: int, i: int) -> FlinkOperatorState:
    name = uid = None
    with cur.scope(f"operator #{i}"):
        if version >= 5:
            name = cur.utf("name") or None
            uid = cur.utf("uid") or None
        operator_id = cur.raw(16, "operator ID").hex()
    label = f"operator #{i} {operator_id}" + (f" ({uid or name})" if uid or name else "")
    with cur.scope(label):
        at = cur.pos
        parallelism = cur.i32("parallelism")
        max_parallelism = cur.i32("max parallelism")
        if not 1 <= parallelism <= max_parallelism <= UPPER_BOUND_MAX_PARALLELISM:
            raise cur.error(
                "parallelism",
                f"expected 1 <= parallelism <= max parallelism <= {UPPER_BOUND_MAX_PARALLELISM}, found parallelism "
                f"{parallelism} and max parallelism {max_parallelism}",
                at=at,
            )
        at = cur.pos
        coordinator = handles.stream("coordinator state")
        if coordinator is not None and not isinstance(coordinator, ByteStreamStateHandle):
            raise cur.error(
                "coordinator state",
                f"expected a ByteStreamStateHandle (type 1), found {coordinator.flink_class}",
                at=at,
            )
        at = cur.pos
        count = cur.i32("subtask count")
        if count < 0:
            if coordinator is not None:
                raise cur.error(
                    "subtask count", "a fully finished operator (count -1) must not have coordinator state", at=at
                )
            return FullyFinishedOperatorState(operator_id, name, uid, parallelism, max_parallelism, None, ())
        if count * _MIN_SUBTASK_ENTRY > cur.remaining:
            raise cur.truncated(
                "subtask count",
                f"announces {count} subtask entries of at least 4 bytes each, but only {cur.remaining} bytes follow",
                at=at,
            )
        subtasks: dict[int, FlinkSubtaskState] = {}
        for _ in range(count):
            at = cur.pos
            stored = cur.i32("subtask index")
            index = stored if stored >= 0 else -stored - 1
            if index >= parallelism or index in subtasks:
                problem = "appears twice" if index in subtasks else f"is not below the parallelism {parallelism}"
                raise cur.error("subtask index", f"subtask {index} (stored as {stored}) {problem}", at=at)
            if stored < 0:
                subtasks[index] = FlinkSubtaskState(index, finished=True)
            else:
                with cur.scope(f"subtask {index}"):
                    subtasks[index] = _subtask(cur, handles, index)
        entries = tuple(subtasks[k] for k in sorted(subtasks))
        return FlinkOperatorState(operator_id, name, uid, parallelism, max_parallelism, coordinator, entries)


def _subtask(cur: Cursor, handles: HandleReader, index: int) -> FlinkSubtaskState:
    managed_operator = handles.operator("managed operator state") if cur.i32("managed operator flag") else None
    raw_operator = handles.operator("raw operator state") if cur.i32("raw operator flag") else None
    managed_keyed = handles.keyed("managed keyed state")
    raw_keyed = handles.keyed("raw keyed state")
    inputs = handles.channels("input channel state", ChannelKind.INPUT_CHANNEL)
    outputs = handles.channels("result subpartition state", ChannelKind.RESULT_SUBPARTITION)
    return FlinkSubtaskState(index, False, managed_operator, raw_operator, managed_keyed, raw_keyed, inputs, outputs)


def _properties(cur: Cursor, data: bytes, version: int) -> FlinkCheckpointProperties:
    start = cur.pos
    if not cur.remaining:
        raise cur.truncated(
            "properties",
            f"format {version} ends with the serialized CheckpointProperties, but the file ends after the last "
            "operator",
            at=start,
        )
    obj = walk_java_stream(cur)
    if obj.class_name != _PROPERTIES_CLASS:
        raise cur.error(
            "properties", f"expected an object of class {_PROPERTIES_CLASS}, found {obj.class_name}", at=start
        )
    snapshot = obj.get("checkpointType")
    type_class = type_name = None
    enums: dict[str, str] = {}
    if isinstance(snapshot, JavaObject):
        type_class = snapshot.class_name
        name = snapshot.get("name")
        type_name = name if isinstance(name, str) else None
        enums = {key: value.name for key, value in snapshot.fields if isinstance(value, EnumConstant)}
    elif isinstance(snapshot, EnumConstant):  # before Flink 1.16, CheckpointType was an enum
        type_class, type_name = snapshot.class_name, snapshot.name
    return FlinkCheckpointProperties(
        raw=data[start : cur.pos],
        snapshot_type_class=type_class,
        type_name=type_name,
        sharing_files_strategy=enums.get("sharingFilesStrategy"),
        savepoint_format=enums.get("formatType"),
        post_checkpoint_action=enums.get("postCheckpointAction"),
        flags=tuple((key, value) for key, value in obj.fields if isinstance(value, bool)),
    )
