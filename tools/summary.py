"""What ``keystate inspect`` and ``keystate list`` compute: summaries of checkpoints (verification is in
``keystate.tools.verification``, re-exported here).

These functions return data; ``keystate.tools.render`` turns it into tables, JSON or graphs. Every
location may hold a keystate checkpoint or an Apache Flink one (detected from ``_metadata``'s first
bytes, ``keystate.storage.flink_checkpoints``); a Flink checkpoint is summarized by
:class:`FlinkCheckpointSummary`, which has the same ``--json`` contract fields.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.errors import CheckpointNotFoundError, KeystateError
from keystate.storage.flink_checkpoints import (
    AnyCheckpoint,
    FlinkCheckpoint,
    SourceFormat,
    open_checkpoint,
    resolve_checkpoint,
    stream_handles,
)
from keystate.storage.format.flink import FlinkOperatorState
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import (
    CheckpointStatistics,
    OperatorState,
    OperatorStatistics,
    OperatorStatus,
)
from keystate.storage.uri import Location, open_storage, parse_location
from keystate.tools.errors import UsageError
from keystate.tools.verification import HandleCheck, VerifyReport, verify_checkpoint

__all__ = [
    "CheckpointListing",
    "CheckpointSummary",
    "FlinkCheckpointSummary",
    "FlinkOperatorSummary",
    "HandleCheck",
    "OperatorSummary",
    "VerifyReport",
    "inspect_checkpoint",
    "list_checkpoints",
    "load_location",
    "summarize_any",
    "verify_checkpoint",
]


def load_location(location: str, *, endpoint_url: str | None = None) -> AnyCheckpoint:
    """The checkpoint a CLI ``LOCATION`` names: a checkpoint or savepoint directory, its
    ``_metadata``, a job directory or a storage root (then the newest one), as a path or URI; keystate's
    or Apache Flink's (:class:`~keystate.storage.flink_checkpoints.FlinkCheckpoint`), detected.

    Raises:
        InvalidURIError, CheckpointNotFoundError, MetadataError, StorageError: see their messages.
    """
    return resolve_checkpoint(open_storage(location, endpoint_url=endpoint_url))


def coverage(op: OperatorState) -> tuple[int, list[KeyGroupRange]]:
    """Key groups covered by the operator's keyed handles, and the maximal covered ranges."""
    groups: set[int] = set()
    for st in op.subtasks:
        for handle in st.keyed:
            groups.update(handle.key_groups)
    return _ranges(groups)


def _ranges(groups: set[int]) -> tuple[int, list[KeyGroupRange]]:
    ranges: list[KeyGroupRange] = []
    for kg in sorted(groups):
        if ranges and ranges[-1].end == kg - 1:
            ranges[-1] = KeyGroupRange(ranges[-1].start, kg)
        else:
            ranges.append(KeyGroupRange(kg, kg))
    return len(groups), ranges


def operator_statistics_dict(stats: OperatorStatistics | None) -> dict[str, int | None] | None:
    """An operator's ``statistics`` in ``inspect --json`` (``None``: not recorded, or a Flink checkpoint);
    ``end_to_end_duration_ms`` is ``None`` in a ``_metadata`` written before keystate recorded it."""
    if stats is None:
        return None
    return {
        "sync_duration_ms": stats.sync_duration_ms,
        "async_duration_ms": stats.async_duration_ms,
        "alignment_duration_ms": stats.alignment_duration_ms,
        "acknowledged_subtasks": stats.acknowledged_subtasks,
        "end_to_end_duration_ms": stats.end_to_end_duration_ms,
    }


def checkpoint_statistics_dict(stats: CheckpointStatistics | None) -> dict[str, int] | None:
    return None if stats is None else {"duration_ms": stats.duration_ms}


# Sizes as Flink's web UI shows them: "Checkpointed Data Size" (incremental_state_bytes: the bytes this
# checkpoint wrote, i.e. exclusive and inline files and the shared files it wrote itself) and "Full
# Checkpoint Data Size" (full_state_bytes: every file it references, shared files of earlier checkpoints
# included). For a full checkpoint they are equal.


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
    incremental_state_bytes: int | None = None
    """Bytes this checkpoint wrote for the operator (Flink's "Checkpointed Data Size")."""
    full_state_bytes: int = 0
    """Bytes of every file the operator's state references (Flink's "Full Checkpoint Data Size")."""
    statistics: OperatorStatistics | None = None

    def to_dict(self) -> dict[str, Any]:
        return _operator_dict(self, self.inputs, self.raw_state_bytes)


@dataclass(frozen=True)
class CheckpointSummary:
    """``keystate inspect``'s data; ``to_dict`` is the ``--json`` contract
    (docs/architecture.md#inspect-json-output)."""

    checkpoint: CompletedCheckpoint
    operators: list[OperatorSummary]
    source_format = SourceFormat.KEYSTATE

    @property
    def metadata(self) -> Any:
        return self.checkpoint.metadata

    def find_operator(self, name: str) -> OperatorSummary | None:
        """The operator with uid ``name``, or None."""
        return next((o for o in self.operators if o.uid == name), None)

    @property
    def total_state_bytes(self) -> int:
        return sum(o.state_bytes for o in self.operators)

    @property
    def total_raw_bytes(self) -> int:
        return sum(o.raw_state_bytes for o in self.operators)

    @property
    def incremental_state_bytes(self) -> int:
        """Bytes this checkpoint wrote (Flink's "Checkpointed Data Size")."""
        return int(self.checkpoint.metadata.incremental_state_bytes)

    @property
    def full_state_bytes(self) -> int:
        """Bytes of every referenced file (Flink's "Full Checkpoint Data Size"); equals ``total_state_bytes``."""
        return int(self.checkpoint.metadata.full_state_bytes)

    @property
    def incremental(self) -> bool:
        """Whether the checkpoint builds on earlier ones (deltas, or shared files an earlier one wrote)."""
        return bool(self.checkpoint.metadata.is_incremental)

    @property
    def format_version(self) -> int:
        """The ``_metadata`` version the checkpoint was read from."""
        m = self.checkpoint.metadata
        return int(m.source_version or m.FORMAT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        m = self.checkpoint.metadata
        return {
            "format_version": self.format_version,
            "checkpoint_id": m.checkpoint_id,
            "job_id": m.job_id,
            "kind": m.kind.value,
            "timestamp": m.timestamp,
            "location": self.checkpoint.location,
            "total_state_bytes": self.total_state_bytes,
            "operators": [o.to_dict() for o in self.operators],
            "properties": {"synchronous": m.properties.synchronous, "drain": m.properties.drain},
            "total_raw_state_bytes": self.total_raw_bytes,
            "source_format": self.source_format.value,
            "incremental_state_bytes": self.incremental_state_bytes,
            "full_state_bytes": self.full_state_bytes,
            "incremental": self.incremental,
            "statistics": checkpoint_statistics_dict(m.statistics),
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
                incremental_state_bytes=op.incremental_state_bytes(checkpoint.metadata.checkpoint_id),
                full_state_bytes=op.full_state_bytes,
                statistics=op.statistics,
            )
        )
    return CheckpointSummary(checkpoint, operators)


# --- Apache Flink checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlinkOperatorSummary:
    """One operator of a Flink checkpoint, with the contract fields of :class:`OperatorSummary`.

    Flink's ``_metadata`` stores no edges, so ``inputs`` is unknown (``None`` and ``inputs_known: false``
    in JSON), and no uncompressed size (``raw_state_bytes`` is ``None``).
    """

    uid: str
    """The uid when the checkpoint stores one (format 5+), else the operator ID."""
    operator_id: str
    name: str | None
    parallelism: int
    max_parallelism: int
    status: OperatorStatus
    finished_subtasks: list[int]
    state_bytes: int
    """Flink's ``getStateSize()``: what its handles state, coordinator state included."""
    handles: int
    """Stream handles: each a file, a part of one, or bytes inline in ``_metadata``."""
    keyed: bool
    key_groups_covered: int
    key_group_ranges: list[KeyGroupRange]
    state: FlinkOperatorState
    incremental_state_bytes: int | None = None
    """The sum of Flink's ``getCheckpointedSize()`` over the handles (what Flink's UI shows as "Checkpointed
    Data Size"); ``None`` when a handle does not store it (a RocksDB handle of type 5, Flink before 1.15)."""
    statistics: None = None
    """Flink's ``_metadata`` records no durations."""

    @property
    def full_state_bytes(self) -> int:
        return self.state_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**_operator_dict(self, None, None), "operator_id": self.operator_id, "name": self.name}


def _operator_dict(
    op: OperatorSummary | FlinkOperatorSummary, inputs: list[dict[str, str]] | None, raw_state_bytes: int | None
) -> dict[str, Any]:
    """An operator's ``inspect --json`` contract fields, for either source format (``inputs`` None: the
    format stores no edges, so they are unknown)."""
    return {
        "uid": op.uid,
        "parallelism": op.parallelism,
        "max_parallelism": op.max_parallelism,
        "status": op.status.value,
        "finished_subtasks": op.finished_subtasks,
        "state_bytes": op.state_bytes,
        "handles": op.handles,
        "inputs": inputs,
        "inputs_known": inputs is not None,
        "raw_state_bytes": raw_state_bytes,
        "key_groups": {
            "covered": op.key_groups_covered,
            "ranges": [[r.start, r.end] for r in op.key_group_ranges],
        }
        if op.keyed
        else None,
        "incremental_state_bytes": op.incremental_state_bytes,
        "full_state_bytes": op.full_state_bytes,
        "statistics": operator_statistics_dict(op.statistics),
    }


@dataclass(frozen=True)
class FlinkCheckpointSummary:
    """``keystate inspect``'s data for a Flink checkpoint or savepoint; ``to_dict`` has the contract fields
    of :class:`CheckpointSummary` (``format_version`` is Flink's ``_metadata`` version, also given as
    ``flink_metadata_version``; ``job_id`` and ``timestamp`` may be ``None``: Flink does not store them)."""

    checkpoint: FlinkCheckpoint
    operators: list[FlinkOperatorSummary]
    source_format = SourceFormat.FLINK

    @property
    def metadata(self) -> Any:
        return self.checkpoint.metadata

    @property
    def total_state_bytes(self) -> int:
        return sum(o.state_bytes for o in self.operators)

    @property
    def full_state_bytes(self) -> int:
        return self.total_state_bytes

    @property
    def incremental_state_bytes(self) -> int | None:
        """Flink's "Checkpointed Data Size": ``None`` when some handle does not record it."""
        sizes = [o.incremental_state_bytes for o in self.operators]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def incremental(self) -> bool | None:
        """Whether the checkpoint reuses files of earlier ones: it wrote less than it references (``None``:
        unknown, a handle does not record its checkpointed size)."""
        written = self.incremental_state_bytes
        return None if written is None else written < self.full_state_bytes

    def find_operator(self, name: str) -> FlinkOperatorSummary | None:
        """The operator with this uid or operator ID, or None."""
        return next((o for o in self.operators if name in (o.uid, o.operator_id)), None)

    def properties(self) -> dict[str, bool | None]:
        """keystate's ``properties``: a stop-with-savepoint is ``synchronous``, one that terminates ``drain``s."""
        props = self.checkpoint.metadata.properties
        if props is None or props.kind is None:
            return {"synchronous": None, "drain": None}
        action = props.post_checkpoint_action
        return {"synchronous": action in ("SUSPEND", "TERMINATE"), "drain": action == "TERMINATE"}

    def to_dict(self) -> dict[str, Any]:
        m = self.checkpoint.metadata
        props = m.properties
        return {
            "format_version": m.format_version,
            "checkpoint_id": m.checkpoint_id,
            "job_id": self.checkpoint.job_id,
            "kind": self.checkpoint.kind.value,
            "timestamp": None,
            "location": self.checkpoint.location,
            "total_state_bytes": self.total_state_bytes,
            "operators": [o.to_dict() for o in self.operators],
            "properties": self.properties(),
            "total_raw_state_bytes": None,
            "source_format": self.source_format.value,
            "incremental_state_bytes": self.incremental_state_bytes,
            "full_state_bytes": self.full_state_bytes,
            "incremental": self.incremental,
            "statistics": None,
            "flink_metadata_version": m.format_version,
            "job_id_prefix": self.checkpoint.job_id_prefix,
            "flink_properties": None
            if props is None
            else {
                "type": props.type_name,
                "sharing_files_strategy": props.sharing_files_strategy,
                "savepoint_format": props.savepoint_format,
                "post_checkpoint_action": props.post_checkpoint_action,
            },
        }


def summarize_flink(checkpoint: FlinkCheckpoint) -> FlinkCheckpointSummary:
    operators = []
    for op in checkpoint.metadata.operators:
        groups: set[int] = set()
        for st in op.subtasks:
            for keyed in (st.managed_keyed_state, st.raw_keyed_state):
                if keyed is not None:
                    groups.update(keyed.key_groups)
        covered, ranges = _ranges(groups)
        handles = sum(1 for st in op.subtasks for h in st.handles() for _ in stream_handles(h))
        # Flink's checkpointed size: getCheckpointedSize() of every handle, which is its state size except for
        # RocksDB incremental and changelog handles, which store it (a type-5 RocksDB handle does not: None).
        written: list[int | None] = [getattr(h, "checkpointed_size", h.state_size) for st in op.subtasks
                                     for h in st.handles()]  # fmt: skip
        coordinator = 0 if op.coordinator_state is None else op.coordinator_state.state_size
        checkpointed = None if None in written else coordinator + sum(w for w in written if w is not None)
        finished = list(range(op.parallelism)) if op.fully_finished else list(op.finished_subtasks)
        operators.append(
            FlinkOperatorSummary(
                uid=op.uid or op.operator_id,
                operator_id=op.operator_id,
                name=op.name,
                parallelism=op.parallelism,
                max_parallelism=op.max_parallelism,
                status=op.status,
                finished_subtasks=finished,
                state_bytes=op.state_size,
                handles=handles + (op.coordinator_state is not None),
                keyed=op.has_keyed_state,
                key_groups_covered=covered,
                key_group_ranges=ranges,
                state=op,
                incremental_state_bytes=checkpointed,
            )
        )
    return FlinkCheckpointSummary(checkpoint, operators)


def summarize_any(checkpoint: AnyCheckpoint) -> CheckpointSummary | FlinkCheckpointSummary:
    """The summary of a checkpoint of either format."""
    if isinstance(checkpoint, FlinkCheckpoint):
        return summarize_flink(checkpoint)
    return summarize(checkpoint)


def inspect_checkpoint(location: str, *, endpoint_url: str | None = None) -> CheckpointSummary | FlinkCheckpointSummary:
    """Load and summarize the checkpoint a location names (see :func:`load_location`)."""
    return summarize_any(load_location(location, endpoint_url=endpoint_url))


# --- listing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointListing:
    """One row of ``keystate list``: a loaded summary, or the error that prevented loading it."""

    location: str
    kind: str
    summary: CheckpointSummary | FlinkCheckpointSummary | None
    error: str | None = None
    checkpoint_id: int | None = None

    def sort_key(self) -> tuple[int, int]:
        if self.summary is None:
            return (0, self.checkpoint_id or 0)
        if isinstance(self.summary, FlinkCheckpointSummary):
            return (-1, self.summary.checkpoint.checkpoint_id)  # no timestamp: before every keystate one
        m = self.summary.checkpoint.metadata
        return (m.timestamp, m.checkpoint_id)

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        if self.summary is None:
            return {"location": self.location, "kind": self.kind, "checkpoint_id": self.checkpoint_id,
                    "error": self.error}  # fmt: skip
        if isinstance(self.summary, FlinkCheckpointSummary):
            return self._flink_dict(self.summary)
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
            "source_format": SourceFormat.KEYSTATE.value,
            "incremental": self.summary.incremental,
            "incremental_state_bytes": self.summary.incremental_state_bytes,
            "full_state_bytes": self.summary.full_state_bytes,
            "statistics": checkpoint_statistics_dict(m.statistics),
        }

    def _flink_dict(self, summary: FlinkCheckpointSummary) -> dict[str, Any]:
        counts = {s.value: 0 for s in OperatorStatus}
        for op in summary.operators:
            counts[op.status.value] += 1
        return {
            "location": self.location,
            "kind": summary.checkpoint.kind.value,
            "checkpoint_id": summary.checkpoint.checkpoint_id,
            "job_id": summary.checkpoint.job_id,
            "timestamp": None,
            "age_seconds": None,
            "total_state_bytes": summary.total_state_bytes,
            "operators": counts,
            "properties": summary.properties(),
            "source_format": SourceFormat.FLINK.value,
            "incremental": summary.incremental,
            "incremental_state_bytes": summary.incremental_state_bytes,
            "full_state_bytes": summary.full_state_bytes,
            "statistics": None,
            "flink_metadata_version": summary.checkpoint.metadata.format_version,
            "job_id_prefix": summary.checkpoint.job_id_prefix,
        }


def _check_local_root(root: str, location: Location) -> None:
    """Refuse a local root that is missing or a file: the stores list a missing directory as empty
    (right for a prefix), but a user who mistyped a path must not be told "no checkpoints"."""
    if location.scheme != "file":
        return
    path = str(location)
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise UsageError(
            f"Cannot list '{root}': it is not a directory; give a storage root, a job directory or a "
            "savepoints directory"
        )
    raise CheckpointNotFoundError(f"Cannot list checkpoints at '{root}': no such directory")


def list_checkpoints(root: str, *, endpoint_url: str | None = None) -> list[CheckpointListing]:
    """Completed checkpoints and savepoints under ``root``, newest first (unreadable ones included,
    with their error, so a damaged checkpoint is visible rather than silently skipped). One that was
    complete when listed but whose ``_metadata`` is gone when read was discarded meanwhile (retention on
    a live root): it is left out, not shown as unreadable.

    Raises:
        CheckpointNotFoundError: a local ``root`` that does not exist (an existing, empty one lists
            nothing; an S3 prefix has no existence of its own, so an empty one lists nothing too).
        UsageError: a local ``root`` that is a file, not a directory.
    """
    storage: CheckpointStorage = open_storage(root, endpoint_url=endpoint_url)
    _check_local_root(root, parse_location(root))
    rows: list[CheckpointListing] = []
    for pointer in storage.discover():
        location = storage.store.describe(pointer.directory)
        try:
            summary = summarize_any(open_checkpoint(storage, pointer.directory))
            rows.append(CheckpointListing(location, pointer.kind.value, summary))
        except CheckpointNotFoundError:
            continue  # discarded since it was listed
        except KeystateError as exc:
            rows.append(CheckpointListing(location, pointer.kind.value, None, str(exc), pointer.checkpoint_id))
    rows.sort(key=CheckpointListing.sort_key, reverse=True)
    return rows


def now_ms() -> int:
    return int(time.time() * 1000)
