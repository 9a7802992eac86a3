"""Parse Flink's state handles (``MetadataV2V3SerializerBase``, ``ChannelStateHandleSerializerV1/V2``).

Every handle starts with a u8 type byte (``FlinkHandleType``); 0 is "no handle". Layouts, after it::

    stream handles
      1  BYTE_STREAM       utf handleName | i32 n | n bytes
      2  FILE_STREAM       i64 size | utf path                        (size first)
      6  RELATIVE_STREAM   utf relativePath | i64 size                (path first)
      3  KEY_GROUPS        as the keyed type 3 below
      15 SEGMENT_FILE      i64 startPos | i64 size | i32 scope | utf filePath | utf logicalFileId
      16 EMPTY_SEGMENT     (nothing)
    keyed handles
      3 / 7 / 12           i32 start | i32 count | count x i64 offset | stream delegate | [12: utf id]
      5 / 11               i64 checkpointId | utf backendId | i32 start | i32 count | [11: i64 checkpointedSize]
                           | stream meta | files shared | files private | [11: utf id]
                           files = i32 n | n x (utf localPath | stream handle)
      8 / 14               i32 start | i32 count | i64 checkpointedSize | i32 a | a x keyed | i32 b | b x keyed
                           | i64 materializationId | [14: i64 checkpointId] | utf id
      9                    i32 start | i32 count | i64 from | i64 to | i32 n | n x (i32 keyGroup | i32 len | bytes)
                           | utf id
      10 / 13              i32 start | i32 count | i32 n | n x (i64 offset | stream) | i64 size
                           | i64 checkpointedSize | utf id | [13: utf storageIdentifier]
    operator handles
      4 / 17               i32 n | n x (utf name | u8 mode | i32 k | k x i64 offset)
                           | [17: utf taskOwnedDir | utf sharedDir | bool isEmpty] | stream delegate
    channel handles (no type byte in formats 3-5; format 6 starts with u8 1/2 plain, 3/4 merged)
      plain                i32 subtaskIndex | i32 | i32 | i32 k | k x i64 offset | i64 size | stream delegate
      merged               i32 subtaskIndex | i64 size | stream delegate | i32 n | n bytes offsets (opaque)

A key-group range is ``[start, start + count - 1]``. Handles nest (a stream handle of type 3 has a
delegate, a changelog handle holds keyed handles), so the depth is bounded by ``MAX_HANDLE_DEPTH``.
"""

from __future__ import annotations

from keystate.storage.format.flink._cursor import CORRUPT, Cursor
from keystate.storage.format.flink._errors import UnsupportedFlinkHandleError
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
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, KeyGroupRange

__all__ = ["MAX_HANDLE_DEPTH", "HandleReader"]

MAX_HANDLE_DEPTH = 8
"""Real files nest at most 3 deep (changelog > RocksDB handle > file); anything deeper is hostile."""

_T = FlinkHandleType
_STREAM_TYPES = frozenset({_T.BYTE_STREAM, _T.FILE_STREAM, _T.RELATIVE_STREAM, _T.KEY_GROUPS, _T.SEGMENT_FILE})
_KEYED_TYPES = frozenset(
    {
        _T.KEY_GROUPS,
        _T.SAVEPOINT_KEY_GROUPS,
        _T.KEY_GROUPS_V2,
        _T.INCREMENTAL_KEY_GROUPS,
        _T.INCREMENTAL_KEY_GROUPS_V2,
        _T.CHANGELOG,
        _T.CHANGELOG_V2,
        _T.CHANGELOG_BYTE_INCREMENT,
        _T.CHANGELOG_FILE_INCREMENT,
        _T.CHANGELOG_FILE_INCREMENT_V2,
    }
)
_OPERATOR_TYPES = frozenset({_T.PARTITIONABLE_OPERATOR, _T.SEGMENT_PARTITIONABLE_OPERATOR})
# The smallest encoding of one list item, for count() checks: see the layouts in the module docstring.
_MIN_FILE_ENTRY = 3  # utf "" | u8 type
_MIN_OPERATOR_ENTRY = 7  # utf "" | u8 mode | i32 k
_MIN_CHANGE = 8  # i32 keyGroup | i32 len
_MIN_OFFSET_AND_STREAM = 9  # i64 offset | u8 type


def _type_list(types: frozenset[FlinkHandleType]) -> str:
    return ", ".join(f"{t.value} ({t.name})" for t in sorted(types))


class HandleReader:
    """Reads handles from a :class:`Cursor`; ``format_version`` picks the channel-handle layout."""

    __slots__ = ("_cur", "_depth", "_format_version")

    def __init__(self, cursor: Cursor, format_version: int) -> None:
        self._cur = cursor
        self._format_version = format_version
        self._depth = 0

    # --- shared pieces ------------------------------------------------------------------------------

    def _type_byte(self, what: str, allowed: frozenset[FlinkHandleType]) -> FlinkHandleType | None:
        """The type byte of a handle in a position that accepts ``allowed`` (or 0 = none)."""
        cur = self._cur
        at = cur.pos
        code = cur.u8(f"{what} type")
        if code == 0:
            return None
        try:
            kind = FlinkHandleType(code)
        except ValueError:
            raise UnsupportedFlinkHandleError(
                f"{cur.describe(f'{what} type', at)}: state handle type byte {code} is none of the types 0-17 "
                f"that Flink 1.15-2.3 write; the file was written by a newer Flink, or {CORRUPT}",
                offset=at,
                type_byte=code,
            ) from None
        if kind not in allowed:
            raise cur.error(f"{what} type", f"expected one of {_type_list(allowed)}, found {code} ({kind.name})", at=at)
        return kind

    def _nested(self, what: str) -> None:
        if self._depth >= MAX_HANDLE_DEPTH:
            raise self._cur.error(what, f"state handles nest deeper than {MAX_HANDLE_DEPTH} levels")

    def key_group_range(self, what: str = "key groups") -> KeyGroupRange:
        cur = self._cur
        at = cur.pos
        start = cur.i32(f"{what} start")
        count = cur.i32(f"{what} count")
        if start < 0 or count < 0 or start + count > UPPER_BOUND_MAX_PARALLELISM:
            raise cur.error(
                what,
                f"expected key groups within 0..{UPPER_BOUND_MAX_PARALLELISM - 1}, found start {start} count {count}",
                at=at,
            )
        return KeyGroupRange(start, start + count - 1) if count else KeyGroupRange.empty()

    def _required_stream(self, what: str) -> FlinkStreamHandle:
        at = self._cur.pos
        handle = self.stream(what)
        if handle is None:
            raise self._cur.error(f"{what} type", "expected a stream handle, found none (type 0)", at=at)
        return handle

    # --- stream handles -----------------------------------------------------------------------------

    def stream(self, what: str, allowed: frozenset[FlinkHandleType] = _STREAM_TYPES) -> FlinkStreamHandle | None:
        cur = self._cur
        kind = self._type_byte(what, allowed | {_T.EMPTY_SEGMENT_FILE})
        if kind is None:
            return None
        with cur.scope(f"{what} ({kind.name})"):
            if kind is _T.BYTE_STREAM:
                name = cur.utf("handle name")
                length = cur.count("data length", item_bytes=1, item="bytes")
                return ByteStreamStateHandle(name, cur.raw(length, "data"))
            if kind is _T.FILE_STREAM:
                size = self._size("size")
                return FileStateHandle(cur.utf("path"), size)
            if kind is _T.RELATIVE_STREAM:
                path = cur.utf("relative path")
                return RelativeFileStateHandle(path, self._size("size"))
            if kind is _T.SEGMENT_FILE:
                start, size = self._size("start position"), self._size("size")
                scope_at = cur.pos
                scope = cur.i32("scope")
                if scope not in (0, 1):
                    raise cur.error("scope", f"expected 0 (SHARED) or 1 (EXCLUSIVE), found {scope}", at=scope_at)
                path = cur.utf("file path")
                return SegmentFileStateHandle(path, start, size, FlinkStateScope(scope), cur.utf("logical file id"))
            if kind is _T.EMPTY_SEGMENT_FILE:
                return EmptySegmentFileStateHandle()
            return self._key_groups(kind)  # KEY_GROUPS used as a stream handle (legacy)

    def _size(self, what: str) -> int:
        at = self._cur.pos
        value = self._cur.i64(what)
        if value < 0:
            raise self._cur.error(what, f"expected a size >= 0, found {value}", at=at)
        return value

    # --- keyed handles ------------------------------------------------------------------------------

    def keyed(self, what: str) -> FlinkKeyedHandle | None:
        kind = self._type_byte(what, _KEYED_TYPES)
        if kind is None:
            return None
        with self._cur.scope(f"{what} ({kind.name})"):
            if kind in (_T.KEY_GROUPS, _T.SAVEPOINT_KEY_GROUPS, _T.KEY_GROUPS_V2):
                return self._key_groups(kind)
            if kind in (_T.INCREMENTAL_KEY_GROUPS, _T.INCREMENTAL_KEY_GROUPS_V2):
                return self._incremental(kind)
            if kind in (_T.CHANGELOG, _T.CHANGELOG_V2):
                return self._changelog(kind)
            if kind is _T.CHANGELOG_BYTE_INCREMENT:
                return self._in_memory_changelog()
            return self._changelog_stream(kind)

    def _key_groups(self, kind: FlinkHandleType) -> KeyGroupsStateHandle:
        cur = self._cur
        key_groups = self.key_group_range()
        offsets = cur.i64_array(len(key_groups), "key-group offsets")
        self._nested("delegate")
        self._depth += 1
        try:
            delegate = self._required_stream("delegate")
        finally:
            self._depth -= 1
        handle_id = cur.utf("state handle id") if kind is _T.KEY_GROUPS_V2 else None
        return KeyGroupsStateHandle(kind, key_groups, offsets, delegate, handle_id)

    def _files(self, what: str) -> tuple[HandleAndLocalPath, ...]:
        cur = self._cur
        n = cur.count(f"{what} count", item_bytes=_MIN_FILE_ENTRY, item="files")
        files = []
        for i in range(n):
            with cur.scope(f"{what}[{i}]"):
                local_path = cur.utf("local path")
                files.append(HandleAndLocalPath(local_path, self._required_stream("file")))
        return tuple(files)

    def _incremental(self, kind: FlinkHandleType) -> IncrementalRemoteKeyedStateHandle:
        cur = self._cur
        v2 = kind is _T.INCREMENTAL_KEY_GROUPS_V2
        checkpoint_id = cur.i64("checkpoint id")
        backend_id = cur.utf("backend identifier")
        key_groups = self.key_group_range()
        checkpointed_size = self._size("checkpointed size") if v2 else None
        meta = self._required_stream("meta state")
        shared = self._files("shared state")
        private = self._files("private state")
        handle_id = cur.utf("state handle id") if v2 else None
        return IncrementalRemoteKeyedStateHandle(
            kind, checkpoint_id, backend_id, key_groups, checkpointed_size, meta, shared, private, handle_id
        )

    def _changelog(self, kind: FlinkHandleType) -> ChangelogStateBackendHandle:
        cur = self._cur
        key_groups = self.key_group_range()
        checkpointed_size = self._size("checkpointed size")
        self._nested("materialized state")
        self._depth += 1
        try:
            materialized: list[FlinkKeyedHandle] = []
            for i in range(cur.count("materialized count", item_bytes=1, item="handles")):
                handle = self.keyed(f"materialized[{i}]")
                if handle is not None:  # Flink skips a null here with a warning
                    materialized.append(handle)
            delta: list[InMemoryChangelogStateHandle | ChangelogStateHandleStreamImpl] = []
            for i in range(cur.count("non-materialized count", item_bytes=1, item="handles")):
                at = cur.pos
                changes = self.keyed(f"non-materialized[{i}]")
                if not isinstance(changes, InMemoryChangelogStateHandle | ChangelogStateHandleStreamImpl):
                    found = "none" if changes is None else changes.flink_class
                    raise cur.error(
                        f"non-materialized[{i}]",
                        f"expected a changelog handle (type 9, 10 or 13), found {found}",
                        at=at,
                    )
                delta.append(changes)
        finally:
            self._depth -= 1
        materialization_id = cur.i64("materialization id")
        checkpoint_id = cur.i64("checkpoint id") if kind is _T.CHANGELOG_V2 else materialization_id
        handle_id = cur.utf("state handle id")
        return ChangelogStateBackendHandle(
            kind, key_groups, checkpointed_size, tuple(materialized), tuple(delta), materialization_id, checkpoint_id,
            handle_id,
        )  # fmt: skip

    def _in_memory_changelog(self) -> InMemoryChangelogStateHandle:
        cur = self._cur
        key_groups = self.key_group_range()
        first, last = cur.i64("from sequence number"), cur.i64("to sequence number")
        changes = []
        for i in range(cur.count("change count", item_bytes=_MIN_CHANGE, item="changes")):
            key_group = cur.i32(f"change[{i}] key group")
            length = cur.count(f"change[{i}] length", item_bytes=1, item="bytes")
            changes.append((key_group, cur.raw(length, f"change[{i}] bytes")))
        return InMemoryChangelogStateHandle(key_groups, first, last, tuple(changes), cur.utf("state handle id"))

    def _changelog_stream(self, kind: FlinkHandleType) -> ChangelogStateHandleStreamImpl:
        cur = self._cur
        key_groups = self.key_group_range()
        pairs = []
        for i in range(cur.count("handle count", item_bytes=_MIN_OFFSET_AND_STREAM, item="handles")):
            offset = cur.i64(f"handle[{i}] offset")
            pairs.append((self._required_stream(f"handle[{i}]"), offset))
        size = self._size("size")
        checkpointed_size = self._size("checkpointed size")
        handle_id = cur.utf("state handle id")
        storage = cur.utf("storage identifier") if kind is _T.CHANGELOG_FILE_INCREMENT_V2 else "filesystem"
        return ChangelogStateHandleStreamImpl(
            kind, key_groups, tuple(pairs), size, checkpointed_size, handle_id, storage
        )

    # --- operator handles ---------------------------------------------------------------------------

    def operator(self, what: str) -> OperatorStreamStateHandle | None:
        cur = self._cur
        kind = self._type_byte(what, _OPERATOR_TYPES)
        if kind is None:
            return None
        with cur.scope(f"{what} ({kind.name})"):
            entries: list[OperatorStateEntry] = []
            seen: set[str] = set()
            for i in range(cur.count("state count", item_bytes=_MIN_OPERATOR_ENTRY, item="states")):
                at = cur.pos
                name = cur.utf(f"state[{i}] name")
                if name in seen:
                    raise cur.error(f"state[{i}] name", f"the state name {name!r} appears twice", at=at)
                seen.add(name)
                mode_at = cur.pos
                mode = cur.u8(f"state {name!r} mode")
                if mode > 2:
                    raise cur.error(
                        f"state {name!r} mode",
                        f"expected 0 (SPLIT_DISTRIBUTE), 1 (UNION) or 2 (BROADCAST), found {mode}",
                        at=mode_at,
                    )
                n = cur.count(f"state {name!r} offset count", item_bytes=8, item="offsets")
                offsets = cur.i64_array(n, f"state {name!r} offsets")
                entries.append(OperatorStateEntry(name, FlinkDistributionMode(mode), offsets))
            if kind is _T.PARTITIONABLE_OPERATOR:
                return OperatorStreamStateHandle(kind, tuple(entries), self._required_stream("delegate"))
            task_owned_dir = cur.utf("task-owned directory")
            shared_dir = cur.utf("shared directory")
            is_empty = cur.boolean("is empty")
            at = cur.pos
            delegate = self.stream("delegate", frozenset({_T.SEGMENT_FILE}))
            if delegate is None:
                raise cur.error("delegate type", "expected a segment file handle (type 15 or 16), found none", at=at)
            return OperatorStreamStateHandle(kind, tuple(entries), delegate, task_owned_dir, shared_dir, is_empty)

    # --- channel handles ----------------------------------------------------------------------------

    def channels(self, what: str, kind: ChannelKind) -> tuple[FlinkChannelHandle, ...]:
        """The i32-counted list of input-channel or result-subpartition handles of one subtask."""
        cur = self._cur
        v2 = self._format_version >= 6
        n = cur.count(f"{what} count", item_bytes=18 if v2 else 25, item="channel handles")
        handles: list[FlinkChannelHandle] = []
        for i in range(n):
            with cur.scope(f"{what}[{i}]"):
                merged = False
                if v2:
                    at = cur.pos
                    code = cur.u8("type")
                    plain, merged_code = (1, 3) if kind is ChannelKind.INPUT_CHANNEL else (2, 4)
                    if code not in (plain, merged_code):
                        raise cur.error(
                            "type", f"expected {plain} (plain) or {merged_code} (merged), found {code}", at=at
                        )
                    merged = code == merged_code
                handles.append(self._merged_channel(kind) if merged else self._channel(kind))
        return tuple(handles)

    def _channel(self, kind: ChannelKind) -> ChannelStateHandle:
        cur = self._cur
        subtask = cur.i32("subtask index")
        first, second = cur.i32("gate/partition index"), cur.i32("channel/subpartition index")
        n = cur.count("offset count", item_bytes=8, item="offsets")
        offsets = cur.i64_array(n, "offsets")
        size = self._size("size")
        return ChannelStateHandle(kind, subtask, first, second, offsets, size, self._required_stream("delegate"))

    def _merged_channel(self, kind: ChannelKind) -> MergedChannelStateHandle:
        cur = self._cur
        subtask = cur.i32("subtask index")
        size = self._size("size")
        delegate = self._required_stream("delegate")
        length = cur.count("channel offsets length", item_bytes=1, item="bytes")
        return MergedChannelStateHandle(kind, subtask, size, delegate, cur.raw(length, "channel offsets"))
