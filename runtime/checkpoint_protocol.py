"""What tasks and the checkpoint coordinator exchange: acknowledgements, failure reasons, the task gateway."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from keystate.runtime.events import CheckpointOptions
from keystate.runtime.plan import SubtaskId, SubtaskStatus
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle, StreamHandle

if TYPE_CHECKING:
    from keystate.storage.checkpoints import CheckpointWriter

__all__ = [
    "CheckpointFailureReason",
    "PartialFinishingNotSupportedError",
    "SubtaskSnapshot",
    "TaskCoordinator",
    "TaskGateway",
]


class CheckpointFailureReason(StrEnum):
    """Why a checkpoint failed (Flink's ``CheckpointFailureReason``); ``counted`` ones use up the tolerance."""

    NOT_ALL_REQUIRED_TASKS_RUNNING = "not_all_required_tasks_running"
    TASK_CHECKPOINT_FAILURE = "task_checkpoint_failure"
    CHECKPOINT_DECLINED = "checkpoint_declined"
    CHECKPOINT_DECLINED_TASK_CLOSING = "checkpoint_declined_task_closing"
    CHECKPOINT_ASYNC_EXCEPTION = "checkpoint_async_exception"
    CHECKPOINT_EXPIRED = "checkpoint_expired"
    FINALIZE_CHECKPOINT_FAILURE = "finalize_checkpoint_failure"
    JOB_FAILOVER = "job_failover"
    COORDINATOR_SHUTDOWN = "coordinator_shutdown"
    CHECKPOINT_SUBSUMED = "checkpoint_subsumed"
    """A newer checkpoint completed first; not counted, as in Flink's ``CheckpointFailureManager``."""

    @property
    def counted(self) -> bool:
        return self in (
            CheckpointFailureReason.CHECKPOINT_DECLINED,
            CheckpointFailureReason.CHECKPOINT_ASYNC_EXCEPTION,
            CheckpointFailureReason.CHECKPOINT_EXPIRED,
            CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE,
        )


@dataclass(frozen=True)
class SubtaskSnapshot:
    """A task's acknowledgement: its state handles, FLIP-147 flags, the incremental chain it extended and
    how long its parts took. Every field is a handle tuple or a plain JSON value (acks cross processes)."""

    keyed: tuple[KeyedStateHandle, ...] = ()
    operator: tuple[OperatorStateHandle, ...] = ()
    finished_operators: bool = False
    """The task had finished its operators (endData) when it took this snapshot (``isTaskFinished``)."""
    finished_on_restore: bool = False
    """The task was deployed finished-on-restore (``FINISHED_ON_RESTORE``): it reports no state."""
    incremental: bool = False
    """The subtask takes incremental keyed snapshots: it may build on completed checkpoints' shared files."""
    based_on: int | None = None
    """The completed checkpoint whose chain the keyed snapshot extended (``None``: a full snapshot). The
    coordinator's :class:`~keystate.storage.shared_registry.SharedStateRegistry` keeps the files of
    completed checkpoints from the lowest such id on."""
    sync_duration_ms: int = 0
    """The synchronous part: operator snapshot, freezing state and sending the barrier."""
    async_duration_ms: int = 0
    """The asynchronous part: writing the state files, until the acknowledgement is sent."""
    alignment_duration_ms: int = 0
    """From the first barrier of the checkpoint received to the last one (0: a source, or one input)."""

    def streams(self) -> tuple[StreamHandle, ...]:
        """Every state file the acknowledgement references (keyed bases and deltas, operator state)."""
        return tuple(s for h in self.keyed for s in h.streams()) + tuple(h.stream for h in self.operator)


class TaskGateway(Protocol):
    """What the coordinator needs from a task."""

    @property
    def status(self) -> SubtaskStatus: ...

    def trigger_checkpoint(self, checkpoint_id: int, options: CheckpointOptions) -> bool:
        """Ask a task with no running predecessor to checkpoint; False if it no longer runs."""

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None: ...

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None: ...


class TaskCoordinator(Protocol):
    """What a task needs from the checkpoint coordinator (an executor may hand tasks a proxy of it)."""

    def writer_for(self, checkpoint_id: int) -> CheckpointWriter | None:
        """Where the state files of pending checkpoint ``checkpoint_id`` go (``None``: it is no longer pending)."""

    def acknowledge(self, sub: SubtaskId, checkpoint_id: int, snapshot: SubtaskSnapshot) -> None: ...

    def decline(self, sub: SubtaskId, checkpoint_id: int, error: BaseException) -> None: ...

    def report_end_of_data(self, sub: SubtaskId) -> None: ...


class PartialFinishingNotSupportedError(Exception):
    """Union list state while only part of an operator's subtasks finished (docs/flink-rules.md#d3)."""
