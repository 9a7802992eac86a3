"""``_metadata`` format version 1: JSON serialization and field-by-field parsing.

``keystate.storage.format._metadata_versions`` pops ``format_version`` and dispatches to a version's parser; a later
version adds its own module beside this one and an entry in that registry. The layout is :class:`CodecV1`,
whose ``_*_extra`` hooks a later version overrides to add fields (``_metadata_v2.CodecV2``: version 2 is
version 1 plus fields); version 1 itself accepts none of them and refuses to write a model that needs them.
Every field has one small parser whose error names the file and the JSON path of the field.
The ``*_handle_v1`` and ``*_subtask_v1`` functions give the same layout and parsers to a handle or a
subtask entry on its own: the JSON forms ``keystate.storage.format.transfer`` ships between processes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, TypeVar

from keystate.storage.errors import MetadataError
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, KeyGroupRange
from keystate.storage.format.metadata import (
    CHECKSUM_PATTERN,
    JOB_ID_PATTERN,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.format.statefile import Compression
from keystate.storage.format.topology import UID_PATTERN, parse_input_edge
from keystate.storage.format.validation import (
    check_keys,
    req_bool,
    req_int,
    req_list,
    req_obj,
    req_str,
    safe_relative_path,
)

__all__ = [
    "HANDLE_KINDS",
    "CodecV1",
    "dump_handle_v1",
    "dump_subtask_v1",
    "dump_v1",
    "parse_handle_v1",
    "parse_subtask_v1",
    "parse_v1",
]
T = TypeVar("T")


def _build(where: str, make: Callable[[], T]) -> T:
    """Construct a model object; its invariant errors get the file/field context prefixed."""
    try:
        return make()
    except MetadataError as exc:
        raise type(exc)(f"{where}: {exc}") from exc


HANDLE_KINDS: dict[str, type[StreamHandle | KeyedStateHandle | OperatorStateHandle]] = {
    "stream": StreamHandle,
    "keyed": KeyedStateHandle,
    "operator": OperatorStateHandle,
}
"""The ``handle`` field of a handle's JSON form: which class the rest of the object describes."""


# --- version 1 ------------------------------------------------------------------------------------------


class CodecV1:
    """The JSON layout of ``_metadata`` version 1. A subclass adds fields through the ``_*_extra`` hooks:
    each ``_dump_*_extra`` appends keys after version 1's (key order is part of the format), each
    ``_*_keys_extra`` names them for the unknown-field check and each ``_parse_*_extra`` reads them."""

    version: int = 1

    # --- extension hooks (version 1: no extra fields) ---

    def _dump_stream_extra(self, h: StreamHandle, d: dict[str, Any]) -> None:
        if h.written_by is not None:
            raise MetadataError(f"format version {self.version} has no 'written_by' (handle {h.describe})")

    def _stream_keys_extra(self, scope: HandleScope) -> tuple[str, ...]:
        return ()

    def _parse_stream_extra(self, raw: dict[str, Any], scope: HandleScope, where: str) -> dict[str, Any]:
        return {}

    def _dump_keyed_extra(self, k: KeyedStateHandle, d: dict[str, Any]) -> None:
        if k.deltas:
            raise MetadataError(f"format version {self.version} has no incremental (delta) keyed handles")

    def _keyed_keys_extra(self) -> tuple[str, ...]:
        return ()

    def _parse_keyed_extra(
        self, raw: dict[str, Any], key_groups: KeyGroupRange, where: str
    ) -> tuple[KeyedStateHandle, ...]:
        return ()

    def _dump_operator_extra(self, op: OperatorState, d: dict[str, Any]) -> None:
        if op.statistics is not None:
            raise MetadataError(f"format version {self.version} has no operator statistics")

    def _operator_keys_extra(self) -> tuple[str, ...]:
        return ()

    def _parse_operator_extra(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        return {}

    def _dump_checkpoint_extra(self, m: CheckpointMetadata, d: dict[str, Any]) -> None:
        if m.statistics is not None:
            raise MetadataError(f"format version {self.version} has no checkpoint statistics")

    def _checkpoint_keys_extra(self) -> tuple[str, ...]:
        return ()

    def _parse_checkpoint_extra(self, doc: dict[str, Any], where: str) -> dict[str, Any]:
        return {}

    def _check_document(self, m: CheckpointMetadata, where: str) -> None:
        """Whole-document rules beyond the model's."""

    # --- serialization ---

    def stream_to_json(self, h: StreamHandle) -> dict[str, Any]:
        d: dict[str, Any] = {"scope": h.scope.value}
        if h.scope is HandleScope.INLINE:
            assert h.data is not None
            d["data"] = base64.b64encode(h.data).decode("ascii")
        else:
            d["path"] = h.path
        d.update(size=h.size, raw_size=h.raw_size, checksum=h.checksum, compression=h.compression.value)
        self._dump_stream_extra(h, d)
        return d

    def keyed_to_json(self, k: KeyedStateHandle) -> dict[str, Any]:
        d = {"key_groups": [k.key_groups.start, k.key_groups.end], "offsets": list(k.offsets),
             "stream": self.stream_to_json(k.stream)}  # fmt: skip
        self._dump_keyed_extra(k, d)
        return d

    def operator_handle_to_json(self, o: OperatorStateHandle) -> dict[str, Any]:
        return {"states": [{"name": e.name, "mode": e.mode.value, "offsets": list(e.offsets),
                            "serializer": e.serializer} for e in o.states],
                "stream": self.stream_to_json(o.stream)}  # fmt: skip

    def subtask_to_json(self, st: SubtaskState) -> dict[str, Any]:
        if st.finished:
            return {"index": st.index, "finished": True}
        return {
            "index": st.index,
            "keyed": [self.keyed_to_json(k) for k in st.keyed],
            "operator": [self.operator_handle_to_json(o) for o in st.operator],
        }

    def operator_to_json(self, op: OperatorState) -> dict[str, Any]:
        d = {
            "uid": op.uid,
            "parallelism": op.parallelism,
            "max_parallelism": op.max_parallelism,
            "inputs": [e.to_dict() for e in op.inputs],
            "fully_finished": op.fully_finished,
            "subtasks": [self.subtask_to_json(st) for st in op.subtasks],
        }
        self._dump_operator_extra(op, d)
        return d

    def dump(self, m: CheckpointMetadata) -> bytes:
        """Serialize metadata as compact, deterministic UTF-8 JSON with a trailing newline."""
        doc: dict[str, Any] = {
            "format_version": self.version,
            "checkpoint_id": m.checkpoint_id,
            "job_id": m.job_id,
            "kind": m.kind.value,
            "timestamp": m.timestamp,
            "properties": {"synchronous": m.properties.synchronous, "drain": m.properties.drain},
        }
        self._dump_checkpoint_extra(m, doc)
        doc["operators"] = [self.operator_to_json(op) for op in m.operators]
        self._check_document(m, "metadata to write")
        return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")

    # --- parsing ---

    def parse_stream(self, raw: object, where: str) -> StreamHandle:
        if not isinstance(raw, dict):
            raise MetadataError(f"{where}: a stream handle must be an object")
        scope = HandleScope(req_str(raw, "scope", where, choices=[s.value for s in HandleScope]))
        common = ("scope", "size", "raw_size", "checksum", "compression")
        check_keys(
            raw, where, (*common, "data" if scope is HandleScope.INLINE else "path", *self._stream_keys_extra(scope))
        )
        size = req_int(raw, "size", where)
        raw_size = req_int(raw, "raw_size", where)
        checksum = req_str(raw, "checksum", where, pattern=CHECKSUM_PATTERN)
        compression = Compression(req_str(raw, "compression", where, choices=[c.value for c in Compression]))
        extra = self._parse_stream_extra(raw, scope, where)
        if scope is HandleScope.INLINE:
            text = req_str(raw, "data", where, max_len=1 << 30)
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MetadataError(f"{where}: field 'data' is not valid base64 ({exc})") from exc
            return _build(where, lambda: StreamHandle(scope, size, raw_size, checksum, compression, data=data, **extra))
        path = safe_relative_path(raw.get("path"), where)
        return _build(where, lambda: StreamHandle(scope, size, raw_size, checksum, compression, path=path, **extra))

    def parse_keyed(self, raw: object, where: str) -> KeyedStateHandle:
        if not isinstance(raw, dict):
            raise MetadataError(f"{where}: a keyed handle must be an object")
        check_keys(raw, where, ("key_groups", "offsets", "stream", *self._keyed_keys_extra()))
        bounds = raw["key_groups"]
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or any(
                isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < UPPER_BOUND_MAX_PARALLELISM
                for b in bounds
            )
            or bounds[0] > bounds[1]
        ):
            raise MetadataError(
                f"{where}: field 'key_groups' must be [start, end] with 0 <= start <= end < "
                f"{UPPER_BOUND_MAX_PARALLELISM}, found {bounds!r}"[:300]
            )
        key_groups = KeyGroupRange(bounds[0], bounds[1])
        offsets = parse_int_list(raw["offsets"], where, "offsets", UPPER_BOUND_MAX_PARALLELISM)
        stream = self.parse_stream(raw["stream"], f"{where}.stream")
        deltas = self._parse_keyed_extra(raw, key_groups, where)
        return _build(where, lambda: KeyedStateHandle(key_groups, offsets, stream, deltas))

    def parse_operator_handle(self, raw: object, where: str) -> OperatorStateHandle:
        if not isinstance(raw, dict):
            raise MetadataError(f"{where}: an operator state handle must be an object")
        check_keys(raw, where, ("states", "stream"))
        entries: list[OperatorStateEntry] = []
        for i, e in enumerate(req_list(raw, "states", where)):
            w = f"{where}.states[{i}]"
            if not isinstance(e, dict):
                raise MetadataError(f"{w}: an operator state entry must be an object")
            check_keys(e, w, ("name", "mode", "offsets", "serializer"))
            name = req_str(e, "name", w, max_len=1024)
            mode = DistributionMode(req_str(e, "mode", w, choices=[m.value for m in DistributionMode]))
            offsets = parse_int_list(e["offsets"], w, "offsets", 1 << 24)
            serializer = req_str(e, "serializer", w, max_len=256)
            entries.append(_build(w, lambda: OperatorStateEntry(name, mode, offsets, serializer)))  # noqa: B023
        stream = self.parse_stream(raw["stream"], f"{where}.stream")
        return _build(where, lambda: OperatorStateHandle(tuple(entries), stream))

    def parse_subtask(self, raw: object, where: str) -> SubtaskState:
        if not isinstance(raw, dict):
            raise MetadataError(f"{where}: a subtask entry must be an object")
        index = req_int(raw, "index", where, max_value=UPPER_BOUND_MAX_PARALLELISM - 1)
        if "finished" in raw:
            check_keys(raw, where, ("index", "finished"))
            if req_bool(raw, "finished", where) is not True:
                raise MetadataError(f"{where}: field 'finished' may only be true (omit it for a running subtask)")
            return SubtaskState(index, finished=True)
        check_keys(raw, where, ("index", "keyed", "operator"))
        keyed = tuple(self.parse_keyed(k, f"{where}.keyed[{i}]") for i, k in enumerate(req_list(raw, "keyed", where)))
        ops = tuple(
            self.parse_operator_handle(o, f"{where}.operator[{i}]")
            for i, o in enumerate(req_list(raw, "operator", where))
        )
        return _build(where, lambda: SubtaskState(index, keyed=keyed, operator=ops))

    def parse_operator(self, raw: object, where: str) -> OperatorState:
        if not isinstance(raw, dict):
            raise MetadataError(f"{where}: an operator entry must be an object")
        check_keys(
            raw,
            where,
            ("uid", "parallelism", "max_parallelism", "inputs", "fully_finished", "subtasks",
             *self._operator_keys_extra()),
        )  # fmt: skip
        uid = req_str(raw, "uid", where, pattern=UID_PATTERN)
        parallelism = req_int(raw, "parallelism", where, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM)
        max_p = req_int(raw, "max_parallelism", where, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM)
        inputs = tuple(
            parse_input_edge(e, f"{where}.inputs[{i}]", MetadataError)
            for i, e in enumerate(req_list(raw, "inputs", where))
        )
        fully_finished = req_bool(raw, "fully_finished", where)
        subtasks = tuple(
            self.parse_subtask(s, f"{where}.subtasks[{i}]") for i, s in enumerate(req_list(raw, "subtasks", where))
        )
        extra = self._parse_operator_extra(raw, where)
        return _build(where, lambda: OperatorState(uid, parallelism, max_p, inputs, fully_finished, subtasks, **extra))

    def parse(self, doc: dict[str, Any], where: str) -> CheckpointMetadata:
        """Parse a document of this version (``format_version`` already removed)."""
        check_keys(
            doc,
            where,
            ("checkpoint_id", "job_id", "kind", "timestamp", "properties", "operators", *self._checkpoint_keys_extra()),
        )
        checkpoint_id = req_int(doc, "checkpoint_id", where)
        job_id = req_str(doc, "job_id", where, pattern=JOB_ID_PATTERN)
        kind = CheckpointKind(req_str(doc, "kind", where, choices=[k.value for k in CheckpointKind]))
        timestamp = req_int(doc, "timestamp", where)
        props_raw = req_obj(doc, "properties", where)
        check_keys(props_raw, f"{where}: properties", ("synchronous", "drain"))
        synchronous = req_bool(props_raw, "synchronous", f"{where}: properties")
        drain = req_bool(props_raw, "drain", f"{where}: properties")
        properties = _build(where, lambda: CheckpointProperties(synchronous, drain))
        extra = self._parse_checkpoint_extra(doc, where)
        operators = tuple(
            self.parse_operator(o, f"{where}: operators[{i}]") for i, o in enumerate(req_list(doc, "operators", where))
        )
        metadata = _build(
            where,
            lambda: CheckpointMetadata(
                checkpoint_id, job_id, kind, timestamp, operators, properties, **extra, source_version=self.version
            ),
        )
        self._check_document(metadata, where)
        return metadata

    # --- the parts on their own (keystate.storage.format.transfer) ---

    def dump_handle(self, handle: StreamHandle | KeyedStateHandle | OperatorStateHandle) -> dict[str, Any]:
        """A handle as ``_metadata`` writes it where it appears, tagged with its kind in ``handle``."""
        if isinstance(handle, KeyedStateHandle):
            return {"handle": "keyed", **self.keyed_to_json(handle)}
        if isinstance(handle, OperatorStateHandle):
            return {"handle": "operator", **self.operator_handle_to_json(handle)}
        if isinstance(handle, StreamHandle):
            return {"handle": "stream", **self.stream_to_json(handle)}
        raise TypeError(
            f"expected a StreamHandle, KeyedStateHandle or OperatorStateHandle, found {type(handle).__name__}"
        )

    def parse_handle(
        self, doc: dict[str, Any], where: str, kinds: tuple[str, ...] = tuple(HANDLE_KINDS)
    ) -> StreamHandle | KeyedStateHandle | OperatorStateHandle:
        """Parse a handle's JSON form (``format_version`` already removed) whose kind is in ``kinds``."""
        kind = req_str(doc, "handle", where, choices=kinds)
        rest = {k: v for k, v in doc.items() if k != "handle"}
        if kind == "keyed":
            return self.parse_keyed(rest, where)
        if kind == "operator":
            return self.parse_operator_handle(rest, where)
        return self.parse_stream(rest, where)


def parse_int_list(raw: object, where: str, field: str, max_len: int) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise MetadataError(f"{where}: field '{field}' must be an array of integers")
    if len(raw) > max_len:
        raise MetadataError(f"{where}: field '{field}' has {len(raw)} entries, more than {max_len}")
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << 63):
            raise MetadataError(f"{where}: field '{field}[{i}]' must be a non-negative integer, found {v!r}")
    return tuple(raw)


_V1 = CodecV1()


def dump_v1(m: CheckpointMetadata) -> bytes:
    """Serialize metadata in version 1 (``MetadataError`` if it has deltas, ``written_by`` or statistics)."""
    return _V1.dump(m)


def parse_v1(doc: dict[str, Any], where: str) -> CheckpointMetadata:
    """Parse a version-1 document (``format_version`` already removed)."""
    return _V1.parse(doc, where)


def dump_handle_v1(handle: StreamHandle | KeyedStateHandle | OperatorStateHandle) -> dict[str, Any]:
    """A handle as ``_metadata`` v1 writes it where it appears, tagged with its kind in ``handle``."""
    return _V1.dump_handle(handle)


def parse_handle_v1(
    doc: dict[str, Any], where: str, kinds: tuple[str, ...] = tuple(HANDLE_KINDS)
) -> StreamHandle | KeyedStateHandle | OperatorStateHandle:
    """Parse a handle's version-1 JSON form (``format_version`` already removed) whose kind is in ``kinds``."""
    return _V1.parse_handle(doc, where, kinds)


def dump_subtask_v1(state: SubtaskState) -> dict[str, Any]:
    """A subtask entry as ``_metadata`` v1 writes it in its operator's ``subtasks``."""
    return _V1.subtask_to_json(state)


def parse_subtask_v1(doc: dict[str, Any], where: str) -> SubtaskState:
    """Parse a subtask entry's version-1 JSON form (``format_version`` already removed)."""
    return _V1.parse_subtask(doc, where)
