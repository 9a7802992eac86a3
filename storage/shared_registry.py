"""Which shared state files are still needed (Flink's ``SharedStateRegistry``).

Incremental checkpoints write their delta files, and the bases they build on, under the job's
``shared/`` directory, and later checkpoints reference them again. A shared file may be deleted only
when none of these still needs it:

* a **retained** completed checkpoint (one :class:`~keystate.storage.retention.CompletedCheckpointStore`
  keeps) references it;
* a **received acknowledgement of a pending checkpoint** references it (the checkpoint may still
  complete, and its ``_metadata`` would then point at the file);
* a subtask may still **build on** a completed checkpoint that references it. Each acknowledgement
  reports the subtask's ``based_on`` (the completed checkpoint whose chain its snapshot extended). A
  backend only ever moves its chain forward, so that id is a lower bound for everything the subtask
  snapshots later. Completed checkpoints with an id at or above the lowest bound over the subtasks (the
  *low watermark*) keep their files even after retention subsumed them. Until every subtask of a new
  deployment has reported (its first checkpoint completed), every completed checkpoint counts as built on.

Subsumed checkpoints whose files are still needed are remembered here ("subsumed, not released") and
released once nothing needs them. The registry holds no checkpoints of its own: the retention store
registers and subsumes them (one place of truth for what is retained), the coordinator reports
acknowledgements, pending checkpoints that ended, finished tasks and deployments.

Files that no retained checkpoint references when a job (re)starts, left by checkpoints that never
completed or by a crash in the middle of a subsumption, are *orphans*. Another process may still be
writing some of them: a zombie driver of an earlier run, its workers, or a second submit of the same job
id, whose checkpoint would commit a ``_metadata`` that references them. So, like Flink's registry, which
never deletes a file it did not register, the removal is conservative. Every shared file's path names
the checkpoint that wrote it (``by-chk-<id>/...``, :func:`~keystate.storage.checkpoint_writer.shared_file_path`);
with ``L`` the newest completed checkpoint recovered, :meth:`SharedStateRegistry.remove_orphans` deletes
an unreferenced file written by a checkpoint ``<= L`` (checkpoint ``L`` is committed, so no writer can
commit that id again, and a lower id that commits now is subsumed at once) and keeps one written by a
checkpoint ``> L``: that checkpoint may still be in flight, and it may complete. Such files are deleted
later by :meth:`SharedStateRegistry.release`, once a checkpoint with an id at or above theirs has
completed. Files whose path names no checkpoint are never deleted. The commit closes the remaining gap:
``CheckpointWriter.commit`` refuses metadata whose shared files are not all in the store with their
recorded sizes. Everything goes through the ``ObjectStore`` API (local disk and S3).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable

from keystate.storage.base import join_key
from keystate.storage.checkpoint_writer import shared_file_writer
from keystate.storage.checkpoints import SHARED_DIR, CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import HandleScope, StreamHandle

__all__ = ["SharedStateRegistry", "shared_paths"]

log = logging.getLogger(__name__)


def shared_paths(handles: Iterable[StreamHandle]) -> frozenset[str]:
    """The paths (relative to the job's ``shared/`` directory) of the shared handles among ``handles``."""
    return frozenset(h.path for h in handles if h.scope is HandleScope.SHARED and h.path is not None)


class SharedStateRegistry:
    """The shared files of one job and what keeps each of them alive. Thread-safe.

    Args:
        storage: where the job's checkpoints live.
        job_id: the job (its ``shared/`` directory is ``<job_id>/shared/``).
    """

    def __init__(self, storage: CheckpointStorage, job_id: str) -> None:
        self._storage = storage
        self._job_id = job_id
        self._directory = join_key(storage.job_directory(job_id), SHARED_DIR)
        self._lock = threading.Lock()
        self._retained: dict[int, frozenset[str]] = {}
        self._subsumed: dict[int, frozenset[str]] = {}
        """Completed checkpoints retention dropped whose files a subtask may still build on."""
        self._pending: dict[int, set[str]] = {}
        """Shared paths referenced by the acknowledgements received so far, per pending checkpoint."""
        self._marks: dict[Hashable, int] = {}
        """Per incremental subtask: the lowest completed checkpoint id it may still build on."""
        self._pinned = False
        """A deployment started and not every subtask has reported yet: every completed checkpoint counts.
        (A registry no runtime reports to, a retention store used on its own, releases at once.)"""
        self._deferred: dict[str, int] = {}
        """Orphans :meth:`remove_orphans` kept because a checkpoint above the latest completed one wrote
        them (it may have been in flight): path -> that checkpoint id. :meth:`release` deletes each once a
        checkpoint with that id or a higher one is registered."""
        self.deleted = 0
        """Shared files deleted so far (for tests and logs)."""

    @property
    def directory(self) -> str:
        """The job's ``shared/`` directory (a key in the store)."""
        return self._directory

    def key(self, path: str) -> str:
        """The object key of a shared path."""
        return join_key(self._directory, path)

    # --- completed checkpoints (called by the retention store) --------------------------------------

    def register(self, checkpoint: CompletedCheckpoint) -> None:
        """A completed checkpoint is retained: its shared files stay. Savepoints reference none."""
        paths = shared_paths(checkpoint.metadata.handles())
        with self._lock:
            self._retained[checkpoint.checkpoint_id] = paths
            self._pending.pop(checkpoint.checkpoint_id, None)

    def subsume(self, checkpoint: CompletedCheckpoint) -> None:
        """Retention no longer keeps ``checkpoint`` (or never did: it completed after a newer one). Its
        files stay while a subtask may build on it; :meth:`release` deletes them once nothing needs them."""
        paths = shared_paths(checkpoint.metadata.handles())
        with self._lock:
            self._retained.pop(checkpoint.checkpoint_id, None)
            self._pending.pop(checkpoint.checkpoint_id, None)
            self._subsumed[checkpoint.checkpoint_id] = paths

    # --- what the coordinator reports ----------------------------------------------------------------

    def acknowledged(
        self,
        checkpoint_id: int,
        subtask: Hashable,
        handles: Iterable[StreamHandle],
        *,
        incremental: bool,
        based_on: int | None,
    ) -> None:
        """A subtask acknowledged pending checkpoint ``checkpoint_id`` with ``handles``.

        Args:
            incremental: the subtask takes incremental snapshots (it may build on completed checkpoints);
                a subtask that does not never holds the low watermark back.
            based_on: the completed checkpoint its snapshot extended (``None``: a full snapshot, which
                says nothing about what it builds on next, so its earlier bound stays).
        """
        paths = shared_paths(handles)
        with self._lock:
            if paths:
                self._pending.setdefault(checkpoint_id, set()).update(paths)
            if not incremental:
                self._marks.pop(subtask, None)
            else:
                previous = self._marks.get(subtask, 0)
                self._marks[subtask] = max(previous, based_on or 0)

    def pending_ended(self, checkpoint_id: int) -> None:
        """A pending checkpoint was aborted: its acknowledgements keep nothing alive any more. (A completed
        one is handed over by :meth:`register` or :meth:`subsume`.)"""
        with self._lock:
            self._pending.pop(checkpoint_id, None)

    def completed_in_deployment(self) -> None:
        """A checkpoint of the current deployment completed: every running subtask has reported its bound."""
        with self._lock:
            self._pinned = False

    def task_finished(self, subtask: Hashable) -> None:
        """A subtask finished: it never snapshots again."""
        with self._lock:
            self._marks.pop(subtask, None)

    def deployment_started(self) -> None:
        """A (new) deployment is attached: until its subtasks report, they may build on any completed checkpoint."""
        with self._lock:
            self._marks.clear()
            self._pinned = True

    def deployment_ended(self) -> None:
        """The deployment went away (failover, stop, end): no subtask builds on anything any more. A new
        deployment restores from a retained checkpoint and starts pinned again."""
        with self._lock:
            self._marks.clear()
            self._pinned = False

    # --- deleting ------------------------------------------------------------------------------------

    @property
    def low_watermark(self) -> int | None:
        """The lowest completed checkpoint id a subtask may still build on (``None``: none builds on any)."""
        with self._lock:
            return self._watermark()

    def _watermark(self) -> int | None:
        if self._pinned:
            return 0
        return min(self._marks.values(), default=None)

    def _live(self) -> set[str]:
        live: set[str] = set()
        for paths in self._retained.values():
            live |= paths
        for paths in self._subsumed.values():
            live |= paths
        for pending in self._pending.values():
            live |= pending
        return live

    def referenced(self) -> frozenset[str]:
        """Every shared path something still keeps alive."""
        with self._lock:
            return frozenset(self._live())

    def release(self) -> list[str]:
        """Delete the files of subsumed checkpoints that nothing needs any more.

        Returns:
            The object keys deleted.

        Raises:
            StorageError: a delete failed; the files not deleted are orphans for :meth:`remove_orphans`.
        """
        with self._lock:
            watermark = self._watermark()
            released = [cid for cid in self._subsumed if watermark is None or cid < watermark]
            candidates: set[str] = set()
            for cid in released:
                candidates |= self._subsumed.pop(cid)
            live = self._live()
            doomed = sorted(candidates - live)
            latest = self._latest_completed()
            late = sorted(
                p for p, cid in self._deferred.items() if latest is not None and cid <= latest and p not in live
            )
            for path in late:
                del self._deferred[path]
        keys = [self.key(p) for p in doomed]
        if keys:
            log.debug("job %s: deleting %d shared files no checkpoint needs (subsumed %s)", self._job_id,
                      len(keys), ", ".join(map(str, sorted(released))))  # fmt: skip
        late_keys = [self.key(p) for p in late]
        if late_keys:
            log.info("job %s: deleting %d orphaned shared files of checkpoints that can no longer complete "
                     "(checkpoint %s completed)", self._job_id, len(late_keys), latest)  # fmt: skip
        keys += late_keys
        if keys:
            self._storage.store.delete_many(keys)
            self.deleted += len(keys)
        return keys

    def _latest_completed(self) -> int | None:
        return max((*self._retained, *self._subsumed), default=None)

    def remove_orphans(self) -> list[str]:
        """Delete the files under ``shared/`` that nothing keeps alive and that no checkpoint still being
        written can reference: left by checkpoints that never completed, or by a subsumption a crash
        interrupted. Run it only when no checkpoint of this run is pending and nothing is deployed (a
        job's start, before the first deployment), after every completed checkpoint of the job was
        registered.

        Another process may still be at work on this job (a zombie driver, its workers, a second submit of
        the job id). With ``L`` the newest registered checkpoint, an unreferenced file is deleted only if
        the checkpoint that wrote it (the ``by-chk-<id>`` its path starts with) is ``<= L``. One above
        ``L`` may still complete and reference it: it is kept, and :meth:`release` deletes it once a
        checkpoint with its writer's id or a higher one is registered. A file whose path names no
        checkpoint is never deleted, nor anything when no checkpoint is registered.

        Returns:
            The object keys deleted.

        Raises:
            StorageError: the directory could not be listed or a file not deleted.
        """
        with self._lock:
            live = self._live()
            latest = self._latest_completed()
        prefix = self._directory + "/"
        orphans: list[str] = []
        later: dict[str, int] = {}
        unnamed = 0
        for info in self._storage.store.list_objects(self._directory):
            path = info.key[len(prefix) :]
            if not info.key.startswith(prefix) or path in live:
                continue
            writer = shared_file_writer(path)
            if writer is None:
                unnamed += 1
            elif latest is not None and writer <= latest:
                orphans.append(info.key)
            else:
                later[path] = writer
        if unnamed:
            log.warning("job %s: keeping %d unreferenced files under %s whose names do not say which checkpoint "
                        "wrote them; delete them by hand once no run of the job is active", self._job_id, unnamed,
                        self._storage.store.describe(self._directory))  # fmt: skip
        if later:
            log.info("job %s: keeping %d unreferenced shared files of checkpoints after the latest completed one "
                     "(%s): they may still complete; deleted once a later checkpoint completes", self._job_id,
                     len(later), latest)  # fmt: skip
        with self._lock:
            self._deferred.update(later)
        if orphans:
            log.info("job %s: deleting %d orphaned shared files (no completed checkpoint references them)",
                     self._job_id, len(orphans))  # fmt: skip
            self._storage.store.delete_many(orphans)
            self.deleted += len(orphans)
        return orphans
