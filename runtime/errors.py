"""Runtime errors, part of the keystate tree rooted at ``keystate.storage.errors.KeystateError``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keystate.storage.errors import KeystateError

if TYPE_CHECKING:
    from keystate.runtime.restore_rules import RestoreReport

__all__ = [
    "ChannelClosedError",
    "CheckpointFailedError",
    "IncompatibleRestoreError",
    "JobError",
    "JobFailedError",
    "JobGraphError",
    "StopWithSavepointError",
    "TaskFailedError",
]


class JobError(KeystateError):
    """A job could not be built, started or run."""


class JobGraphError(JobError, ValueError):
    """The job graph is invalid (duplicate uid, bad parallelism, unknown input, cycle)."""


class ChannelClosedError(JobError):
    """The other end of a channel was closed (its task failed or was canceled)."""


class TaskFailedError(JobError):
    """A task failed; the job fails over (restarts from the latest checkpoint) or fails."""


class JobFailedError(JobError):
    """The job failed for good: restarts exhausted, or an error that restarting cannot fix."""


class CheckpointFailedError(JobError):
    """A checkpoint or savepoint did not complete; ``reason`` is a ``CheckpointFailureReason``."""

    def __init__(self, reason: object, message: str) -> None:
        self.reason = reason
        super().__init__(f"{message} (reason: {reason})")


class StopWithSavepointError(JobError):
    """Stop-with-savepoint failed; the job keeps running (or fails over)."""


class IncompatibleRestoreError(JobError):
    """The checkpoint cannot be restored into this job graph (see ``report.violations``)."""

    def __init__(self, report: RestoreReport) -> None:
        self.report = report
        lines = "; ".join(f"[{v.rule}] {v.message}" for v in report.violations)
        super().__init__(f"cannot restore checkpoint {report.checkpoint_id} into this job: {lines}")
