"""Retention of completed checkpoints (Flink's ``DefaultCompletedCheckpointStore``).

The store keeps the newest ``num_retained`` checkpoints of a job and discards older ones as new ones
are added, oldest first. Savepoints are never added and never deleted by retention. Shared state
files are the :class:`~keystate.storage.shared_registry.SharedStateRegistry`'s: the store registers every
checkpoint it retains and hands over every one it subsumes, and the registry deletes a shared file only
when no retained checkpoint, no pending acknowledgement and no subtask still building on a checkpoint
needs it. Discarding a checkpoint here deletes its ``_metadata`` first, then its exclusive files; its
shared files go (later) through the registry.
"""

from __future__ import annotations

import logging

from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.metadata import CheckpointKind
from keystate.storage.shared_registry import SharedStateRegistry, shared_paths

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
        self.registry = SharedStateRegistry(storage, job_id)
        """What keeps the job's shared files alive; the coordinator reports acknowledgements to it."""
        self._recovered_all = False
        """:meth:`recover` loaded every completed checkpoint it found (orphans can then be told apart)."""

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
        complete = True
        for pointer in self._storage.list_checkpoints(self._job_id):
            try:
                checkpoint = self._storage.load(pointer.directory)
            except KeystateError as exc:
                log.warning("cannot recover checkpoint %s: %s", self._storage.store.describe(pointer.directory), exc)
                complete = False
                continue
            by_id[checkpoint.checkpoint_id] = checkpoint
        for checkpoint in self._checkpoints:
            by_id[checkpoint.checkpoint_id] = checkpoint
        self._checkpoints = [by_id[i] for i in sorted(by_id)]
        for checkpoint in self._checkpoints:
            self.registry.register(checkpoint)
        self._recovered_all = complete
        return list(self._checkpoints)

    def remove_orphans(self) -> list[str]:
        """After :meth:`recover` and before anything is deployed: delete the shared files no recovered
        checkpoint references (written by checkpoints that never completed, or left by a subsumption a
        crash interrupted). Nothing is deleted if some completed checkpoint could not be loaded: its
        files cannot be told apart from orphans.

        Returns:
            The object keys deleted.

        Raises:
            StorageError: the shared directory could not be listed or a file not deleted.
        """
        if not self._recovered_all:
            log.warning("job %s: not removing orphaned shared files: some completed checkpoint could not be "
                        "loaded, and the files it references look like orphans", self._job_id)  # fmt: skip
            return []
        return self.registry.remove_orphans()

    def add(self, checkpoint: CompletedCheckpoint) -> list[CompletedCheckpoint]:
        """Add a newly completed checkpoint and discard what falls out of retention.

        Savepoints are not retained here and never deleted. Discard failures are logged, not raised:
        a checkpoint that cannot be cleaned up is still complete (what is left is an orphan, removed when
        the job starts again).

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
        self.registry.register(checkpoint)
        discarded: list[CompletedCheckpoint] = []
        while len(self._checkpoints) > self._num_retained:
            oldest = self._checkpoints.pop(0)
            self._discard(oldest)
            discarded.append(oldest)
        self.release_shared()
        return discarded

    def discard_unretained(self, checkpoint: CompletedCheckpoint) -> None:
        """Discard a checkpoint that completed but is not retained (a newer one completed first): its
        ``_metadata`` and exclusive files go now, its shared files through the registry like a subsumed
        one's (they may be a retained checkpoint's too). Failures are logged."""
        self._discard(checkpoint)
        self.release_shared()

    def _discard(self, checkpoint: CompletedCheckpoint) -> None:
        self.registry.subsume(checkpoint)
        try:
            self._storage.discard(checkpoint, keep_shared=set(shared_paths(checkpoint.metadata.handles())))
        except KeystateError as exc:
            log.warning("could not discard subsumed checkpoint %s: %s", checkpoint.location, exc)

    def release_shared(self) -> list[str]:
        """Delete the shared files nothing needs any more (:meth:`SharedStateRegistry.release`); failures
        are logged (the files left are orphans, removed when the job starts again).

        Returns:
            The object keys deleted.
        """
        try:
            return self.registry.release()
        except KeystateError as exc:
            log.warning("job %s: could not delete shared files no checkpoint needs: %s", self._job_id, exc)
            return []
