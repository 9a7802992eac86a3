"""``_metadata`` format version 2: version 1 plus incremental handles and checkpoint statistics.

Version 2 is version 1's layout (``_metadata_v1.CodecV1``) with four fields added, each after version 1's keys
of its object (docs/format.md section 4, "Version 2"):

* ``written_by`` on every ``shared`` stream handle (required there, refused on ``exclusive`` and ``inline``):
  the id of the checkpoint that wrote the file, at most the document's ``checkpoint_id``;
* ``deltas`` on every keyed handle (required, ``[]`` for a full handle): the delta files applied after the
  base, each ``{"offsets": [...], "stream": {...}}`` with the base's key groups (so they are not repeated);
* ``statistics`` on every operator entry and at the top level (required, ``null`` when not recorded).

A savepoint references no shared file. Everything else is version 1's, field for field.
"""

from __future__ import annotations

from typing import Any

from keystate.storage.errors import MetadataError
from keystate.storage.format._metadata_v1 import HANDLE_KINDS, CodecV1, parse_int_list
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, KeyGroupRange
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStatistics,
    HandleScope,
    KeyedStateHandle,
    OperatorState,
    OperatorStateHandle,
    OperatorStatistics,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.format.validation import check_keys, req_int, req_list

__all__ = [
    "MAX_DELTAS",
    "CodecV2",
    "dump_handle_v2",
    "dump_subtask_v2",
    "dump_v2",
    "parse_handle_v2",
    "parse_subtask_v2",
    "parse_v2",
]

MAX_DELTAS = 1024
"""Deltas per keyed handle a reader accepts (a writer materializes long before: ``max_chain_length``)."""

_OPERATOR_STATISTICS = ("sync_duration_ms", "async_duration_ms", "alignment_duration_ms", "acknowledged_subtasks")
_END_TO_END = "end_to_end_duration_ms"
"""Optional: ``_metadata`` v2 files written before keystate recorded it lack it."""


class CodecV2(CodecV1):
    version = 2

    # --- stream handle: written_by ---

    def _dump_stream_extra(self, h: StreamHandle, d: dict[str, Any]) -> None:
        if h.scope is HandleScope.SHARED:
            if h.written_by is None:
                raise MetadataError(
                    f"shared handle {h.describe} has no 'written_by'; format version 2 requires the id of the "
                    "checkpoint that wrote every shared file"
                )
            d["written_by"] = h.written_by

    def _stream_keys_extra(self, scope: HandleScope) -> tuple[str, ...]:
        return ("written_by",) if scope is HandleScope.SHARED else ()

    def _parse_stream_extra(self, raw: dict[str, Any], scope: HandleScope, where: str) -> dict[str, Any]:
        if scope is not HandleScope.SHARED:
            return {}
        return {"written_by": req_int(raw, "written_by", where)}

    # --- keyed handle: deltas ---

    def _dump_keyed_extra(self, k: KeyedStateHandle, d: dict[str, Any]) -> None:
        d["deltas"] = [{"offsets": list(x.offsets), "stream": self.stream_to_json(x.stream)} for x in k.deltas]

    def _keyed_keys_extra(self) -> tuple[str, ...]:
        return ("deltas",)

    def _parse_keyed_extra(
        self, raw: dict[str, Any], key_groups: KeyGroupRange, where: str
    ) -> tuple[KeyedStateHandle, ...]:
        items = req_list(raw, "deltas", where)
        if len(items) > MAX_DELTAS:
            raise MetadataError(f"{where}: field 'deltas' has {len(items)} entries, more than {MAX_DELTAS}")
        deltas = []
        for i, item in enumerate(items):
            w = f"{where}.deltas[{i}]"
            if not isinstance(item, dict):
                raise MetadataError(f"{w}: a delta must be an object")
            check_keys(item, w, ("offsets", "stream"))
            offsets = parse_int_list(item["offsets"], w, "offsets", UPPER_BOUND_MAX_PARALLELISM)
            stream = self.parse_stream(item["stream"], f"{w}.stream")
            try:
                deltas.append(KeyedStateHandle(key_groups, offsets, stream))
            except MetadataError as exc:
                raise MetadataError(f"{w}: {exc}") from exc
        return tuple(deltas)

    # --- statistics ---

    def _dump_operator_extra(self, op: OperatorState, d: dict[str, Any]) -> None:
        s = op.statistics
        if s is None:
            d["statistics"] = None
            return
        stats: dict[str, int] = {name: getattr(s, name) for name in _OPERATOR_STATISTICS}
        if s.end_to_end_duration_ms is not None:
            stats[_END_TO_END] = s.end_to_end_duration_ms
        d["statistics"] = stats

    def _operator_keys_extra(self) -> tuple[str, ...]:
        return ("statistics",)

    def _parse_operator_extra(self, raw: dict[str, Any], where: str) -> dict[str, Any]:
        stats = raw["statistics"]
        if stats is None:
            return {"statistics": None}
        w = f"{where}.statistics"
        if not isinstance(stats, dict):
            raise MetadataError(f"{where}: field 'statistics' must be an object or null")
        check_keys(stats, w, _OPERATOR_STATISTICS, (_END_TO_END,))
        values: dict[str, int | None] = {name: req_int(stats, name, w) for name in _OPERATOR_STATISTICS}
        values[_END_TO_END] = req_int(stats, _END_TO_END, w) if _END_TO_END in stats else None
        return {"statistics": OperatorStatistics(**values)}  # type: ignore[arg-type]

    def _dump_checkpoint_extra(self, m: CheckpointMetadata, d: dict[str, Any]) -> None:
        d["statistics"] = None if m.statistics is None else {"duration_ms": m.statistics.duration_ms}

    def _checkpoint_keys_extra(self) -> tuple[str, ...]:
        return ("statistics",)

    def _parse_checkpoint_extra(self, doc: dict[str, Any], where: str) -> dict[str, Any]:
        stats = doc["statistics"]
        if stats is None:
            return {"statistics": None}
        if not isinstance(stats, dict):
            raise MetadataError(f"{where}: field 'statistics' must be an object or null")
        check_keys(stats, f"{where}: statistics", ("duration_ms",))
        return {"statistics": CheckpointStatistics(req_int(stats, "duration_ms", f"{where}: statistics"))}

    # --- whole document ---

    def _check_document(self, m: CheckpointMetadata, where: str) -> None:
        if m.kind is CheckpointKind.SAVEPOINT:
            for h in m.handles():
                if h.scope is HandleScope.SHARED:
                    raise MetadataError(
                        f"{where}: savepoint refers to shared state {h.path!r}; savepoints must be self-contained"
                    )


_V2 = CodecV2()


def dump_v2(m: CheckpointMetadata) -> bytes:
    """Serialize metadata as version 2: compact, deterministic UTF-8 JSON with a trailing newline.

    Raises:
        MetadataError: a shared handle has no ``written_by``, or a savepoint references a shared file (a
            document no reader would accept).
    """
    return _V2.dump(m)


def parse_v2(doc: dict[str, Any], where: str) -> CheckpointMetadata:
    """Parse a version-2 document (``format_version`` already removed)."""
    return _V2.parse(doc, where)


def dump_handle_v2(handle: StreamHandle | KeyedStateHandle | OperatorStateHandle) -> dict[str, Any]:
    """A handle as ``_metadata`` v2 writes it where it appears, tagged with its kind in ``handle``."""
    return _V2.dump_handle(handle)


def parse_handle_v2(
    doc: dict[str, Any], where: str, kinds: tuple[str, ...] = tuple(HANDLE_KINDS)
) -> StreamHandle | KeyedStateHandle | OperatorStateHandle:
    """Parse a handle's version-2 JSON form (``format_version`` already removed) whose kind is in ``kinds``."""
    return _V2.parse_handle(doc, where, kinds)


def dump_subtask_v2(state: SubtaskState) -> dict[str, Any]:
    """A subtask entry as ``_metadata`` v2 writes it in its operator's ``subtasks``."""
    return _V2.subtask_to_json(state)


def parse_subtask_v2(doc: dict[str, Any], where: str) -> SubtaskState:
    """Parse a subtask entry's version-2 JSON form (``format_version`` already removed)."""
    return _V2.parse_subtask(doc, where)
