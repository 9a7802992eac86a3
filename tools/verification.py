"""``keystate verify`` (and ``inspect --verify``): read every file a checkpoint references and check it.

keystate checkpoints: every file whole (sizes, block checksums, trailer, whole-file checksum; an incremental
keyed handle's base and every delta, shared files included), then the payload's framing with the decoders a
restore uses. Flink checkpoints: every file exists with its stated size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keystate.storage.errors import KeystateError
from keystate.storage.flink_checkpoints import (
    AnyCheckpoint,
    CheckStatus,
    FlinkCheckpoint,
    SourceFormat,
    verify_flink_checkpoint,
)
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle, StreamHandle

__all__ = ["HandleCheck", "VerifyReport", "verify_checkpoint"]


# --- verification ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandleCheck:
    operator: str
    subtask: int
    handle: str
    size: int
    ok: bool
    error: str | None = None
    not_checkable: str | None = None
    """Why the handle could not be checked from here (a Flink handle's absolute path on another machine);
    such a handle counts as ``ok``: it is not known to be damaged."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"operator": self.operator, "subtask": self.subtask, "handle": self.handle,
                             "size": self.size, "ok": self.ok}  # fmt: skip
        if self.error is not None:
            d["error"] = self.error
        if self.not_checkable is not None:
            d["not_checkable"] = self.not_checkable
        return d


@dataclass(frozen=True)
class VerifyReport:
    checks: list[HandleCheck] = field(default_factory=list)
    source_format: SourceFormat = SourceFormat.KEYSTATE
    """A Flink checkpoint's handles are checked for existence and size only: its files carry no checksums."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[HandleCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def unchecked(self) -> list[HandleCheck]:
        """Handles that could not be checked from here (not damage)."""
        return [c for c in self.checks if c.not_checkable is not None]

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "ok": self.ok,
            "handles": len(self.checks),
            "bytes": sum(c.size for c in self.checks if c.not_checkable is None),
            "failures": [c.to_dict() for c in self.failures],
        }
        if self.unchecked:
            doc["not_checkable"] = [c.to_dict() for c in self.unchecked]
        return doc


def verify_checkpoint(
    checkpoint: AnyCheckpoint, progress: Callable[[int, int, int], None] | None = None
) -> VerifyReport:
    """Read every file fully (an incremental keyed handle's base and every delta, shared files included)
    and check its size, block checksums, trailer and whole-file checksum, then
    decode its payload's framing with the decoders a restore uses (``keystate.statebackend.inspection``):
    keyed snapshots (meta, key-group offsets, entries, composite keys, list frames, TTL headers) and
    operator-state elements. Nothing is deserialized, so nothing from the checkpoint runs; what
    passes here restores, short of the job's own serializers and configuration.

    A handle that cannot be read is damage only while the checkpoint still exists: after a failed
    handle the checkpoint's ``_metadata`` is checked again, and if it is gone (retention discarded the
    checkpoint while it was read, which it may do on a live root at any time) verification stops
    with :class:`CheckpointDiscardedError` instead of reporting damage.

    Args:
        checkpoint: what to verify.
        progress: called with (handles done, handles total, bytes done) after each handle.

    A Flink checkpoint is checked as :func:`~keystate.storage.flink_checkpoints.verify_flink_checkpoint`
    checks it: every file it names exists with the stated size (Flink's files have no checksums, and their
    Java-serialized contents are never decoded); a file on another machine is reported as not checkable.

    Raises:
        CheckpointDiscardedError: the checkpoint was discarded while it was read; the error names the
            newest checkpoint of the job left.
    """
    if isinstance(checkpoint, FlinkCheckpoint):
        return _verify_flink(checkpoint, progress)
    # Loaded here, not at import: the other commands need no state backend.
    from keystate.statebackend.inspection import check_keyed_handle, check_operator_handle

    todo: list[tuple[str, int, KeyedStateHandle | OperatorStateHandle]] = []
    for op in checkpoint.metadata.operators:
        for st in op.subtasks:
            todo += [(op.uid, st.index, h) for h in st.keyed]
            todo += [(op.uid, st.index, h) for h in st.operator]
    # One check per file: an incremental keyed handle is its base and every delta (shared files included).
    total = sum(len(list(h.streams())) if isinstance(h, KeyedStateHandle) else 1 for _, _, h in todo)
    checks: list[HandleCheck] = []
    done_bytes = 0

    def record(uid: str, index: int, handle: StreamHandle, error: str | None) -> None:
        nonlocal done_bytes
        checks.append(HandleCheck(uid, index, handle.describe, handle.size, error is None, error))
        done_bytes += handle.size
        if progress is not None:
            progress(len(checks), total, done_bytes)

    for uid, index, typed in todo:
        if isinstance(typed, OperatorStateHandle):
            try:
                check_operator_handle(checkpoint, typed, uid)  # reads (and checks) the whole file once
                record(uid, index, typed.stream, None)
            except KeystateError as exc:
                checkpoint.raise_if_discarded(exc)
                record(uid, index, typed.stream, str(exc))
            continue
        # Every file whole first (the framing pass reads ranges), then the framing of the merged handle
        # (base and deltas, as a restore reads them); a framing error is reported on the base's line.
        errors: list[str | None] = []
        for stream in typed.streams():
            try:
                checkpoint.open_state(stream).verify()
                errors.append(None)
            except KeystateError as exc:
                checkpoint.raise_if_discarded(exc)
                errors.append(str(exc))
        if all(e is None for e in errors):
            try:
                check_keyed_handle(checkpoint, typed, uid)
            except KeystateError as exc:
                checkpoint.raise_if_discarded(exc)
                errors[0] = str(exc)
        for stream, error in zip(typed.streams(), errors, strict=True):
            record(uid, index, stream, error)
    return VerifyReport(checks)


def _verify_flink(checkpoint: FlinkCheckpoint, progress: Callable[[int, int, int], None] | None) -> VerifyReport:
    checks = []
    for c in verify_flink_checkpoint(checkpoint, progress):
        damaged = c.status is CheckStatus.DAMAGED
        unchecked = c.detail if c.status is CheckStatus.NOT_CHECKABLE else None
        checks.append(HandleCheck(c.operator, c.subtask, c.handle, c.size, not damaged, c.detail if damaged else None,
                                  unchecked))  # fmt: skip
    return VerifyReport(checks, SourceFormat.FLINK)
