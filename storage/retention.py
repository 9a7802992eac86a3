"""Retention of completed checkpoints (Flink's ``DefaultCompletedCheckpointStore``).

The store keeps the newest ``num_retained`` checkpoints of a job and discards older ones as new ones
are added, oldest first. Savepoints are never added and never deleted by retention. A shared state
file is deleted only when no retained checkpoint references it any more.
"""

from __future__ import annotations

import logging

from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.metadata import CheckpointKind, HandleScope

__all__ = ["CompletedCheckpointStore"]

log = logging.getLogger(__name__)


class CompletedCheckpointStore:
    """The retained completed checkpoints of one job, oldest first.

    Args:
        storage: where the checkpoints live.
        job_id: the job.
        num_retained: how many completed checkpoints to keep (Flink's
            ``execution.checkpointing.num-retained``, default 1).
    """

    def __init__(self, storage: CheckpointStorage, job_id: str, num_retained: int = 1) -> None:
        if num_retained < 1:
            raise ValueError(f"num_retained must be at least 1, found {num_retained}")
        self._storage = storage
        self._job_id = job_id
        self._num_retained = num_retained
        self._checkpoints: list[CompletedCheckpoint] = []

    @property
    def checkpoints(self) -> list[CompletedCheckpoint]:
        return list(self._checkpoints)

    def latest(self) -> CompletedCheckpoint | None:
        return self._checkpoints[-1] if self._checkpoints else None

    def recover(self) -> list[CompletedCheckpoint]:
        """Take in the completed checkpoints under the job's directory (after a restart, or when a new run
        of the same job id starts), ordered by id, oldest first, as Flink's ``DefaultCompletedCheckpointStore``
        recovers them. Unreadable ones are logged and skipped; savepoints are never taken in.

        Nothing is discarded here: the ones beyond ``num_retained`` are subsumed by the next :meth:`add`,
        that is only once a newer checkpoint has completed. So the checkpoint a job restores from is kept
        until the restored job completes one of its own. Checkpoints already added stay retained.

        Returns:
            The retained checkpoints, oldest first.

        Raises:
            StorageError: the job's directory could not be listed.
        """
        by_id: dict[int, CompletedCheckpoint] = {}
        for pointer in self._storage.list_checkpoints(self._job_id):
            try:
                checkpoint = self._storage.load(pointer.directory)
            except KeystateError as exc:
                log.warning("cannot recover checkpoint %s: %s", self._storage.store.describe(pointer.directory), exc)
                continue
            by_id[checkpoint.checkpoint_id] = checkpoint
        for checkpoint in self._checkpoints:
            by_id[checkpoint.checkpoint_id] = checkpoint
        self._checkpoints = [by_id[i] for i in sorted(by_id)]
        return list(self._checkpoints)

    def add(self, checkpoint: CompletedCheckpoint) -> list[CompletedCheckpoint]:
        """Add a newly completed checkpoint and discard what falls out of retention.

        Savepoints are not retained here and never deleted. Discard failures are logged, not raised:
        a checkpoint that cannot be cleaned up is still complete.

        Returns:
            The checkpoints that were discarded.
        """
        if checkpoint.kind is CheckpointKind.SAVEPOINT:
            return []
        if self._checkpoints and checkpoint.checkpoint_id <= self._checkpoints[-1].checkpoint_id:
            raise ValueError(
                f"checkpoint {checkpoint.checkpoint_id} is not newer than the latest retained "
                f"{self._checkpoints[-1].checkpoint_id}; ids must increase"
            )
        self._checkpoints.append(checkpoint)
        discarded: list[CompletedCheckpoint] = []
        while len(self._checkpoints) > self._num_retained:
            oldest = self._checkpoints.pop(0)
            keep = {
                h.path
                for c in self._checkpoints
                for h in c.metadata.handles()
                if h.scope is HandleScope.SHARED and h.path is not None
            }
            try:
                self._storage.discard(oldest, keep_shared=keep)
            except KeystateError as exc:
                log.warning("could not discard subsumed checkpoint %s: %s", oldest.location, exc)
            discarded.append(oldest)
        return discarded
