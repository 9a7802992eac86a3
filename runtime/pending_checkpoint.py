"""A pending checkpoint of the coordinator, and the ``_metadata`` built from it once complete: its
operators' state with the finished status fulfilled (rules D3, D4 of docs/flink-rules.md) and the
statistics aggregated from the acknowledgements (maxima of the subtasks' sync, async and alignment
durations per operator; the checkpoint's duration from trigger to completion); and what the coordinator
does with its files: commit the ``_metadata``, remove the files of an aborted one or of a late acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from keystate.runtime import faults
from keystate.runtime.checkpoint_protocol import (
    CheckpointFailureReason,
    PartialFinishingNotSupportedError,
    SubtaskSnapshot,
)
from keystate.runtime.errors import CheckpointFailedError
from keystate.runtime.events import CheckpointOptions
from keystate.runtime.plan import CheckpointPlan, SubtaskId
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    CheckpointStatistics,
    OperatorState,
    OperatorStatistics,
    SubtaskState,
)
from keystate.storage.format.topology import Topology

__all__ = [
    "PendingCheckpoint",
    "abort_writer",
    "build_metadata",
    "commit_metadata",
    "discard_late",
    "operator_statistics",
]

log = logging.getLogger("keystate.runtime.coordinator")  # the coordinator's messages, under its logger


@dataclass
class PendingCheckpoint:
    """A checkpoint or savepoint triggered and not yet completed or aborted: what it collects."""

    checkpoint_id: int
    timestamp: int
    options: CheckpointOptions
    plan: CheckpointPlan
    writer: CheckpointWriter
    future: asyncio.Future[CompletedCheckpoint]
    acks: dict[SubtaskId, SubtaskSnapshot] = field(default_factory=dict)
    acked_at: dict[SubtaskId, float] = field(default_factory=dict)
    """When each acknowledgement arrived (``time.monotonic()``), for the end-to-end durations."""
    timer: asyncio.TimerHandle | None = None
    finalizing: bool = False
    started: float = field(default_factory=time.monotonic)

    def fail(self, reason: CheckpointFailureReason, message: str) -> None:
        """Fail the future (if nobody settled it yet) and mark its exception retrieved: callers awaiting it
        still get it, and asyncio does not log it as never retrieved."""
        if not self.future.done():
            self.future.set_exception(CheckpointFailedError(reason, message))
            self.future.exception()


def build_metadata(job_id: str, topology: Topology, pending: PendingCheckpoint) -> CheckpointMetadata:
    """The ``_metadata`` of a pending checkpoint whose every awaited acknowledgement arrived: the
    finished status fulfilled (fully finished operators, finished-subtask markers), each operator's
    statistics aggregated, and the checkpoint's duration from trigger to now.

    Raises:
        PartialFinishingNotSupportedError: an operator with union list state is partly finished (D3).
    """
    plan = pending.plan
    on_restore = {sub.uid for sub, snap in pending.acks.items() if snap.finished_on_restore}
    fully = plan.fully_finished_operators | on_restore
    partly = {sub.uid for sub in plan.finished_tasks} - fully
    finished_reports = Counter(sub.uid for sub, snap in pending.acks.items() if snap.finished_operators)
    operators: list[OperatorState] = []
    for op in topology.operators:
        max_p = op.effective_max_parallelism
        if op.uid in fully:  # no state and no statistics (rule D3.4 replaces the whole operator)
            operators.append(OperatorState(op.uid, op.parallelism, max_p, op.inputs, fully_finished=True))
            continue
        subtasks: list[SubtaskState] = []
        for index in range(op.parallelism):
            sub = SubtaskId(op.uid, index)
            if sub in plan.finished_tasks:
                subtasks.append(SubtaskState(index, finished=True))
                continue
            snap = pending.acks.get(sub)
            if snap is not None and (snap.keyed or snap.operator):
                subtasks.append(SubtaskState(index, keyed=snap.keyed, operator=snap.operator))
        state = OperatorState(
            op.uid, op.parallelism, max_p, op.inputs, False, tuple(subtasks), operator_statistics(pending, op.uid)
        )
        if state.uses_union_state():
            if op.uid in partly:
                raise PartialFinishingNotSupportedError(
                    f"The vertex {op.uid} (id = {op.uid}) has used UnionListState, but part of its tasks are FINISHED."
                )
            if 0 < finished_reports[op.uid] != op.parallelism:
                raise PartialFinishingNotSupportedError(
                    f"The vertex {op.uid} (id = {op.uid}) has used UnionListState, but part of its tasks has "
                    "called operators' finish method."
                )
        operators.append(state)
    kind = CheckpointKind.SAVEPOINT if pending.options.is_savepoint else CheckpointKind.CHECKPOINT
    properties = CheckpointProperties(pending.options.synchronous, pending.options.drain)
    statistics = CheckpointStatistics(max(0, round((time.monotonic() - pending.started) * 1000)))
    return CheckpointMetadata(
        pending.checkpoint_id, job_id, kind, pending.timestamp, tuple(operators), properties, statistics
    )


def operator_statistics(pending: PendingCheckpoint, uid: str) -> OperatorStatistics | None:
    """Maxima over the operator's acknowledgements (``None``: no subtask of it acknowledged)."""
    acks = [snap for sub, snap in pending.acks.items() if sub.uid == uid]
    if not acks:
        return None
    arrived = [at for sub, at in pending.acked_at.items() if sub.uid == uid]
    return OperatorStatistics(
        sync_duration_ms=max(a.sync_duration_ms for a in acks),
        async_duration_ms=max(a.async_duration_ms for a in acks),
        alignment_duration_ms=max(a.alignment_duration_ms for a in acks),
        acknowledged_subtasks=len(acks),
        end_to_end_duration_ms=max(0, round((max(arrived) - pending.started) * 1000)) if arrived else None,
    )


def commit_metadata(pending: PendingCheckpoint, metadata: CheckpointMetadata) -> CompletedCheckpoint:
    """Write the ``_metadata`` of a pending checkpoint whose every acknowledgement arrived (blocking)."""
    faults.point("metadata.commit.before", checkpoint_id=pending.checkpoint_id)
    return pending.writer.commit(metadata)


def abort_writer(writer: CheckpointWriter) -> None:
    """Remove the files of an aborted checkpoint; a failure to (a full disk, say) is logged, not raised."""
    try:
        writer.abort()
    except (KeystateError, OSError) as exc:  # the checkpoint is aborted all the same
        log.warning("could not remove the files of aborted checkpoint %s: %s", writer.location, exc)


def discard_late(writer: CheckpointWriter, snapshot: SubtaskSnapshot) -> None:
    """Remove the files of an acknowledgement that arrived after its checkpoint was aborted."""
    try:  # only the files this checkpoint wrote: not the earlier shared files its handles reference
        writer.discard(snapshot.streams())
    except KeystateError as exc:
        log.warning("could not remove late state files of aborted checkpoint %s: %s", writer.location, exc)
