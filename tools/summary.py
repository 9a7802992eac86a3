"""What ``keystate inspect`` and ``keystate list`` compute: summaries of checkpoints, and verification.

These functions return data; ``keystate.tools.render`` turns it into tables, JSON or graphs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.keygroups import KeyGroupRange
from keystate.storage.metadata import OperatorState, OperatorStatus, StreamHandle
from keystate.storage.uri import open_storage

__all__ = [
    "CheckpointListing",
    "CheckpointSummary",
    "HandleCheck",
    "OperatorSummary",
    "VerifyReport",
    "inspect_checkpoint",
    "list_checkpoints",
    "load_location",
    "verify_checkpoint",
]


def load_location(location: str, *, endpoint_url: str | None = None) -> CompletedCheckpoint:
    """The checkpoint a CLI ``LOCATION`` names: a checkpoint or savepoint directory, its
    ``_metadata``, a job directory or a storage root (then the newest one), as a path or URI.

    Raises:
        InvalidURIError, CheckpointNotFoundError, MetadataError, StorageError: see their messages.
    """
    return open_storage(location, endpoint_url=endpoint_url).resolve()


def coverage(op: OperatorState) -> tuple[int, list[KeyGroupRange]]:
    """Key groups covered by the operator's keyed handles, and the maximal covered ranges."""
    groups: set[int] = set()
    for st in op.subtasks:
        for handle in st.keyed:
            groups.update(handle.key_groups)
    ranges: list[KeyGroupRange] = []
    for kg in sorted(groups):
        if ranges and ranges[-1].end == kg - 1:
            ranges[-1] = KeyGroupRange(ranges[-1].start, kg)
        else:
            ranges.append(KeyGroupRange(kg, kg))
    return len(groups), ranges


@dataclass(frozen=True)
class OperatorSummary:
    uid: str
    parallelism: int
    max_parallelism: int
    status: OperatorStatus
    finished_subtasks: list[int]
    state_bytes: int
    raw_state_bytes: int
    handles: int
    inputs: list[dict[str, str]]
    keyed: bool
    key_groups_covered: int
    key_group_ranges: list[KeyGroupRange]

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "parallelism": self.parallelism,
            "max_parallelism": self.max_parallelism,
            "status": self.status.value,
            "finished_subtasks": self.finished_subtasks,
            "state_bytes": self.state_bytes,
            "handles": self.handles,
            "inputs": self.inputs,
            "raw_state_bytes": self.raw_state_bytes,
            "key_groups": {
                "covered": self.key_groups_covered,
                "ranges": [[r.start, r.end] for r in self.key_group_ranges],
            }
            if self.keyed
            else None,
        }


@dataclass(frozen=True)
class CheckpointSummary:
    """``keystate inspect``'s data; ``to_dict`` is the ``--json`` contract of DESIGN.md section 8."""

    checkpoint: CompletedCheckpoint
    operators: list[OperatorSummary]

    @property
    def metadata(self) -> Any:
        return self.checkpoint.metadata

    @property
    def total_state_bytes(self) -> int:
        return sum(o.state_bytes for o in self.operators)

    @property
    def total_raw_bytes(self) -> int:
        return sum(o.raw_state_bytes for o in self.operators)

    def to_dict(self) -> dict[str, Any]:
        m = self.checkpoint.metadata
        return {
            "format_version": m.FORMAT_VERSION,
            "checkpoint_id": m.checkpoint_id,
            "job_id": m.job_id,
            "kind": m.kind.value,
            "timestamp": m.timestamp,
            "location": self.checkpoint.location,
            "total_state_bytes": self.total_state_bytes,
            "operators": [o.to_dict() for o in self.operators],
            "properties": {"synchronous": m.properties.synchronous, "drain": m.properties.drain},
            "total_raw_state_bytes": self.total_raw_bytes,
        }


def summarize(checkpoint: CompletedCheckpoint) -> CheckpointSummary:
    operators = []
    for op in checkpoint.metadata.operators:
        handles = list(op.handles())
        covered, ranges = coverage(op)
        operators.append(
            OperatorSummary(
                uid=op.uid,
                parallelism=op.parallelism,
                max_parallelism=op.max_parallelism,
                status=op.status,
                finished_subtasks=op.finished_subtasks,
                state_bytes=op.state_bytes,
                raw_state_bytes=sum(h.raw_size for h in handles),
                handles=len(handles),
                inputs=[e.to_dict() for e in op.inputs],
                keyed=op.has_keyed_state or any(e.partitioning.value == "hash" for e in op.inputs),
                key_groups_covered=covered,
                key_group_ranges=ranges,
            )
        )
    return CheckpointSummary(checkpoint, operators)


def inspect_checkpoint(location: str, *, endpoint_url: str | None = None) -> CheckpointSummary:
    """Load and summarize the checkpoint a location names (see :func:`load_location`)."""
    return summarize(load_location(location, endpoint_url=endpoint_url))


# --- verification ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandleCheck:
    operator: str
    subtask: int
    handle: str
    size: int
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"operator": self.operator, "subtask": self.subtask, "handle": self.handle,
                             "size": self.size, "ok": self.ok}  # fmt: skip
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass(frozen=True)
class VerifyReport:
    checks: list[HandleCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[HandleCheck]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "handles": len(self.checks),
            "bytes": sum(c.size for c in self.checks),
            "failures": [c.to_dict() for c in self.failures],
        }


def verify_checkpoint(
    checkpoint: CompletedCheckpoint, progress: Callable[[int, int, int], None] | None = None
) -> VerifyReport:
    """Read every handle fully and check its size, block checksums, trailer and whole-file checksum.

    Args:
        checkpoint: what to verify.
        progress: called with (handles done, handles total, bytes done) after each handle.
    """
    todo: list[tuple[str, int, StreamHandle]] = [
        (op.uid, st.index, h) for op in checkpoint.metadata.operators for st in op.subtasks for h in st.handles()
    ]
    checks: list[HandleCheck] = []
    done_bytes = 0
    for i, (uid, index, handle) in enumerate(todo):
        name = handle.describe
        try:
            checkpoint.open_state(handle).verify()
            checks.append(HandleCheck(uid, index, name, handle.size, True))
        except KeystateError as exc:
            checks.append(HandleCheck(uid, index, name, handle.size, False, str(exc)))
        done_bytes += handle.size
        if progress is not None:
            progress(i + 1, len(todo), done_bytes)
    return VerifyReport(checks)


# --- listing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointListing:
    """One row of ``keystate list``: a loaded summary, or the error that prevented loading it."""

    location: str
    kind: str
    summary: CheckpointSummary | None
    error: str | None = None
    checkpoint_id: int | None = None

    def sort_key(self) -> tuple[int, int]:
        if self.summary is None:
            return (0, self.checkpoint_id or 0)
        m = self.summary.checkpoint.metadata
        return (m.timestamp, m.checkpoint_id)

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        if self.summary is None:
            return {"location": self.location, "kind": self.kind, "checkpoint_id": self.checkpoint_id,
                    "error": self.error}  # fmt: skip
        m = self.summary.checkpoint.metadata
        counts = {s.value: 0 for s in OperatorStatus}
        for op in self.summary.operators:
            counts[op.status.value] += 1
        return {
            "location": self.location,
            "kind": m.kind.value,
            "checkpoint_id": m.checkpoint_id,
            "job_id": m.job_id,
            "timestamp": m.timestamp,
            "age_seconds": max(0, (now_ms - m.timestamp) // 1000),
            "total_state_bytes": self.summary.total_state_bytes,
            "operators": counts,
            "properties": {"synchronous": m.properties.synchronous, "drain": m.properties.drain},
        }


def list_checkpoints(root: str, *, endpoint_url: str | None = None) -> list[CheckpointListing]:
    """Completed checkpoints and savepoints under ``root``, newest first (unreadable ones included,
    with their error, so a damaged checkpoint is visible rather than silently skipped)."""
    storage: CheckpointStorage = open_storage(root, endpoint_url=endpoint_url)
    rows: list[CheckpointListing] = []
    for pointer in storage.discover():
        location = storage.store.describe(pointer.directory)
        try:
            rows.append(CheckpointListing(location, pointer.kind.value, summarize(storage.load(pointer.directory))))
        except KeystateError as exc:
            rows.append(CheckpointListing(location, pointer.kind.value, None, str(exc), pointer.checkpoint_id))
    rows.sort(key=CheckpointListing.sort_key, reverse=True)
    return rows


def now_ms() -> int:
    return int(time.time() * 1000)
