"""What tasks and the checkpoint coordinator exchange: acknowledgements, failure reasons, the task gateway."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from keystate.runtime.events import CheckpointOptions
from keystate.runtime.plan import SubtaskStatus
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle

__all__ = ["CheckpointFailureReason", "PartialFinishingNotSupportedError", "SubtaskSnapshot", "TaskGateway"]


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
    """A task's acknowledgement: its state handles and FLIP-147 flags."""

    keyed: tuple[KeyedStateHandle, ...] = ()
    operator: tuple[OperatorStateHandle, ...] = ()
    finished_operators: bool = False
    """The task had finished its operators (endData) when it took this snapshot (``isTaskFinished``)."""
    finished_on_restore: bool = False
    """The task was deployed finished-on-restore (``FINISHED_ON_RESTORE``): it reports no state."""


class TaskGateway(Protocol):
    """What the coordinator needs from a task."""

    @property
    def status(self) -> SubtaskStatus: ...

    def trigger_checkpoint(self, checkpoint_id: int, options: CheckpointOptions) -> bool:
        """Ask a task with no running predecessor to checkpoint; False if it no longer runs."""

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None: ...

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None: ...


class PartialFinishingNotSupportedError(Exception):
    """Union list state while only part of an operator's subtasks finished (docs/flink-rules.md#d3)."""
