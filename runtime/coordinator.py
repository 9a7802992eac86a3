"""The checkpoint coordinator (Flink's ``CheckpointCoordinator`` with FLIP-147).

It follows rules B, C7, D, G, H and I of docs/flink-rules.md; the ids below are that page's.

One checkpoint: compute the plan from task statuses -> trigger the planned tasks (finished tasks are
recorded, not asked) -> collect one acknowledgement per awaited task -> fulfil the finished status
(fully finished operators, finished-subtask markers, the union-list-state declines of D3) -> write
``_metadata`` last and create-only -> add to retention -> notify the tasks that were running, so
two-phase-commit sinks commit. A timeout, a decline, a storage error or a failed commit aborts the
checkpoint: tasks are told, its files are removed, completed checkpoints are untouched, and counted
failures beyond the tolerance fail the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from keystate.runtime import faults
from keystate.runtime.checkpoint_protocol import (
    CheckpointFailureReason,
    PartialFinishingNotSupportedError,
    SubtaskSnapshot,
    TaskGateway,
)
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.errors import CheckpointFailedError, JobFailedError, StopWithSavepointError
from keystate.runtime.events import CheckpointOptions
from keystate.runtime.pending_checkpoint import (
    PendingCheckpoint,
    abort_writer,
    build_metadata,
    commit_metadata,
    discard_late,
)
from keystate.runtime.plan import PlanRejectedError, SubtaskId, SubtaskStatus, calculate_plan
from keystate.storage.checkpoints import CheckpointStorage, CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import CommitOutcomeUnknownError, KeystateError
from keystate.storage.format.metadata import CheckpointKind, CheckpointMetadata
from keystate.storage.format.topology import Topology
from keystate.storage.retention import CompletedCheckpointStore
from keystate.storage.retry import RetryPolicy

__all__ = ["CheckpointCoordinator", "CheckpointFailureReason", "SubtaskSnapshot", "TaskGateway"]

log = logging.getLogger(__name__)

_FINAL_RETRY_DELAY = 0.1
"""Seconds before a failed final checkpoint is retried (instead of waiting for the next periodic one)."""
_RACE_RETRIES = 20
"""Times a stop-with-savepoint is triggered again after the race of rule B7 (a triggered task finished)."""
_RACE_SETTLE = 2.0
"""Seconds a retried stop-with-savepoint waits for the refusing task's FINISHED to be reported."""
_ABORTED_KEPT = 64
"""Aborted checkpoints whose late acknowledgements are still cleaned up."""
_Pending = PendingCheckpoint
"""The name the pending checkpoint had when it lived here (tests build pending checkpoints with it)."""


def _log_failure(task: asyncio.Task[object]) -> None:
    """Retrieve the exception of a background step nobody awaits, and log it once as a warning (else
    asyncio prints "Task exception was never retrieved" and a traceback when the task is collected)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("background step %s failed: %s: %s", task.get_name(), type(exc).__name__, exc)


class CheckpointCoordinator:
    """Triggers, collects and completes checkpoints of one job (across its restarts).

    Args:
        job_id: the job.
        topology: the job's topology with effective max parallelism per operator.
        storage: checkpoint storage.
        config: checkpointing options.
        on_fatal: called with an error that must stop the running deployment: a ``JobFailedError``
            (checkpoint failures exceeded the tolerance, a commit outcome stayed unknown) ends the
            job; anything else fails it over.
        next_checkpoint_id: the first id to use (restored id + 1 after a restore).
    """

    def __init__(
        self,
        *,
        job_id: str,
        topology: Topology,
        storage: CheckpointStorage,
        config: CheckpointConfig,
        on_fatal: Callable[[BaseException], None],
        next_checkpoint_id: int = 1,
    ) -> None:
        self.job_id = job_id
        self.topology = topology
        self.storage = storage
        self.config = config
        self.store = CompletedCheckpointStore(storage, job_id, config.num_retained)
        self._on_fatal = on_fatal
        self._next_id = next_checkpoint_id
        self._tasks: dict[SubtaskId, TaskGateway] = {}
        self._pending: dict[int, PendingCheckpoint] = {}
        self._end_of_data: set[SubtaskId] = set()
        self._final_requested = False
        self._final_after: int | None = None
        """Every task had reached end of data when this was the next checkpoint id; cleared once a
        checkpoint with this id or a later one completes (it is then every task's final checkpoint)."""
        self._final_retry: asyncio.TimerHandle | None = None
        self._periodic_stopped = False
        self._failures = 0
        self._last_completion = 0.0
        self._background: set[asyncio.Task[object]] = set()
        self._finalizers: set[asyncio.Task[object]] = set()
        self._store_lock = asyncio.Lock()
        self._aborted_writers: dict[int, CheckpointWriter] = {}
        """Writers of recently aborted checkpoints, to discard the files of acknowledgements that come late."""
        self.listeners: list[Callable[[CompletedCheckpoint], None]] = []
        self.failure_listeners: list[Callable[[int, CheckpointFailureReason, str], None]] = []
        self.completed = 0
        self.latest: CompletedCheckpoint | None = None
        self.latest_checkpoint: CompletedCheckpoint | None = None
        """The newest checkpoint (not savepoint) this coordinator completed and retained: what a failover
        restores. Checkpoints recovered from earlier runs of the job id are retained but never this."""
        self._recovered = False
        self._recover_lock = asyncio.Lock()
        self._refused: dict[int, SubtaskId] = {}
        """Checkpoint id -> the triggered task that had finished when its trigger arrived (rule B7)."""
        self._unnotified_sync: dict[int, frozenset[SubtaskId]] = {}
        """Synchronous savepoints aborted by the race of rule B7 whose tasks were not told (the savepoint is
        retried and the tasks take the retry instead); told if the stop-with-savepoint gives up."""

    # --- tasks ---------------------------------------------------------------------------------------

    def attach(self, tasks: dict[SubtaskId, TaskGateway]) -> None:
        """Start coordinating a (new) deployment of the job's tasks."""
        self._tasks = dict(tasks)
        # Until its subtasks report what they build on, they may build on any completed checkpoint.
        self.store.registry.deployment_started()
        self._end_of_data.clear()  # restarted subtasks report end of data again (C7)
        self._final_requested = False
        self._final_after = None
        self._cancel_final_retry()

    def detach(self) -> None:
        """The deployment is going away (failover, cancel): abort what is pending, uncounted.

        A checkpoint that has every acknowledgement and is writing its ``_metadata`` is left to finish
        (:meth:`settle` waits for it): once written it is complete, so a restart must restore from it
        rather than from an older one (whose transactions its sinks would replay and commit again).
        """
        self._final_after = None
        self._cancel_final_retry()
        self._unnotified_sync.clear()  # the tasks that took them are going away
        for pending in list(self._pending.values()):
            if not pending.finalizing:
                self._abort(pending, CheckpointFailureReason.JOB_FAILOVER, "the job is failing over or stopping")
        self._tasks = {}
        # No subtask builds on anything now; the next deployment restores from a retained checkpoint.
        self.store.registry.deployment_ended()
        self._spawn(asyncio.to_thread(self.store.release_shared), "release-shared")

    async def settle(self) -> None:
        """Wait for checkpoints that were completing when the deployment went away (see :meth:`detach`)."""
        if self._finalizers:
            await asyncio.gather(*self._finalizers, return_exceptions=True)

    def _spawn(self, coro: object, name: str) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    def _spawn_finalize(self, pending: PendingCheckpoint) -> None:
        pending.finalizing = True
        task = self._spawn(self._finalize(pending), f"finalize-{pending.checkpoint_id}")
        self._finalizers.add(task)
        task.add_done_callback(self._finalizers.discard)

    async def close(self) -> None:
        self.detach()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # --- recovery ------------------------------------------------------------------------------------

    async def recover(self) -> list[CompletedCheckpoint]:
        """Take the completed checkpoints already under the job's directory into retention, oldest id
        first, as Flink's ``DefaultCompletedCheckpointStore`` recovers them: checkpoints earlier runs
        with this job id left (and the one this run restores from, if it is one of them) are then
        subsumed like this run's own, on the next completed checkpoint and only then. New checkpoint
        ids continue after the newest one found, so they never collide with a completed one.

        Runs once (later calls return at once); the job runs it before its first deployment. A
        coordinator used on its own (without ``submit``) runs it only when asked to.

        Returns:
            The retained checkpoints, oldest first.

        Raises:
            StorageError: the job's directory could not be listed.
        """
        if self._recovered:
            return self.store.checkpoints
        async with self._recover_lock:
            if not self._recovered:
                recovered = await asyncio.to_thread(self.store.recover)
                try:  # nothing is deployed or pending yet: shared files no checkpoint references are orphans
                    await asyncio.to_thread(self.store.remove_orphans)
                except KeystateError as exc:
                    log.warning("job %s: could not remove orphaned shared files: %s", self.job_id, exc)
                if recovered:
                    self._next_id = max(self._next_id, recovered[-1].checkpoint_id + 1)
                    log.info("job %s: retention took in %d completed checkpoints of earlier runs (%s); the next "
                             "checkpoint id is %d", self.job_id, len(recovered),
                             ", ".join(str(c.checkpoint_id) for c in recovered), self._next_id)  # fmt: skip
                self._recovered = True
        return self.store.checkpoints

    # --- triggering ----------------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def writer_for(self, checkpoint_id: int) -> CheckpointWriter | None:
        pending = self._pending.get(checkpoint_id)
        return None if pending is None else pending.writer

    async def trigger(self, options: CheckpointOptions | None = None) -> CompletedCheckpoint:
        """Take a checkpoint (or savepoint) now and wait for it.

        Raises:
            CheckpointFailedError: it did not complete; ``reason`` says why.
        """
        options = options or CheckpointOptions()
        loop = asyncio.get_running_loop()
        statuses = {sub: task.status for sub, task in self._tasks.items()}
        if not statuses:
            raise CheckpointFailedError(
                CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING, "the job is not running"
            )
        try:
            plan = calculate_plan(self.topology, statuses, allow_finished=self.config.checkpoints_after_tasks_finish)
        except PlanRejectedError as exc:
            raise CheckpointFailedError(CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING, str(exc)) from exc
        checkpoint_id = self._next_id
        self._next_id += 1
        if options.is_savepoint:
            writer = self.storage.begin_savepoint(self.job_id, checkpoint_id)
        else:
            writer = self.storage.begin_checkpoint(self.job_id, checkpoint_id)
        pending = PendingCheckpoint(checkpoint_id, int(time.time() * 1000), options, plan, writer, loop.create_future())
        for sub in plan.finished_tasks:
            self.store.registry.task_finished(sub)  # a finished task snapshots no more
        self._pending[checkpoint_id] = pending
        pending.timer = loop.call_later(self.config.timeout, self._expire, checkpoint_id)
        log.debug("triggering %s %d on %s", "savepoint" if options.is_savepoint else "checkpoint", checkpoint_id,
                  ", ".join(map(str, plan.tasks_to_trigger)))  # fmt: skip
        for sub in plan.tasks_to_trigger:
            if not self._tasks[sub].trigger_checkpoint(checkpoint_id, options):
                # Rule B7: the task finished between planning and triggering.
                message = f"task {sub} received a checkpoint request after it finished"
                self.report_trigger_failure(sub, checkpoint_id, message)
                break
        if not plan.tasks_to_wait_for and not pending.future.done():
            self._spawn_finalize(pending)
        return await pending.future

    def _periodic_delay(self) -> float:
        assert self.config.interval is not None
        since = time.monotonic() - self._last_completion
        return max(self.config.interval, self.config.min_pause - since)

    async def run_periodic(self) -> None:
        """Trigger checkpoints every ``interval`` (respecting min pause and max concurrent)."""
        if self.config.interval is None:
            return
        while True:
            await asyncio.sleep(self._periodic_delay())
            if self._periodic_stopped or len(self._pending) >= self.config.max_concurrent:
                continue
            self._spawn(self._trigger_quietly(), "periodic-checkpoint")

    async def _trigger_quietly(self, *, final: bool = False) -> None:
        """A periodic or final checkpoint: it respects ``max_concurrent`` when it actually starts
        (other requests may have started between scheduling and now); savepoints do not (rule G1)."""
        if self._periodic_stopped:
            return  # stop-with-savepoint: only its savepoint may commit now (rule G1)
        if len(self._pending) >= self.config.max_concurrent:
            if final:
                self._final_requested = True  # triggered when the pending checkpoints end
            return
        try:
            await self.trigger()
        except CheckpointFailedError as exc:
            log.info("checkpoint failed: %s", exc)

    def report_end_of_data(self, sub: SubtaskId) -> None:
        """A subtask reached end of data (drain). When all did, checkpoint at once (rule C7)."""
        self._end_of_data.add(sub)
        if (
            len(self._end_of_data) == len(self._tasks)
            and self.config.enabled
            and self.config.checkpoints_after_tasks_finish
            and not self._periodic_stopped
        ):
            self._final_after = self._next_id
            self._request_final()

    def _request_final(self) -> None:
        if self._pending:
            self._final_requested = True  # triggered when the pending checkpoints end
        else:
            self._spawn(self._trigger_quietly(final=True), "final-checkpoint")

    def _cancel_final_retry(self) -> None:
        if self._final_retry is not None:
            self._final_retry.cancel()
            self._final_retry = None

    def _retry_final(self) -> None:
        self._final_retry = None
        if self._final_after is not None and self._tasks and not self._periodic_stopped:
            self._request_final()

    # --- acknowledgements ----------------------------------------------------------------------------

    def acknowledge(self, sub: SubtaskId, checkpoint_id: int, snapshot: SubtaskSnapshot) -> None:
        pending = self._pending.get(checkpoint_id)
        if pending is None or pending.finalizing:
            # A late ack of an aborted checkpoint: its files may have been published after the abort
            # removed the others, so they go now (Flink's discardSubtaskState).
            writer = self._aborted_writers.get(checkpoint_id)
            if writer is not None and (snapshot.keyed or snapshot.operator):
                self._spawn(asyncio.to_thread(discard_late, writer, snapshot), f"discard-{checkpoint_id}")
            return
        if sub not in pending.plan.tasks_to_wait_for or sub in pending.acks:
            log.warning("unexpected acknowledgement of checkpoint %d from %s", checkpoint_id, sub)
            return
        pending.acks[sub] = snapshot
        pending.acked_at[sub] = time.monotonic()
        if not pending.options.is_savepoint:  # savepoints reference no shared file and build on nothing
            self.store.registry.acknowledged(
                checkpoint_id, sub, snapshot.streams(), incremental=snapshot.incremental, based_on=snapshot.based_on
            )
        if len(pending.acks) == len(pending.plan.tasks_to_wait_for):
            self._spawn_finalize(pending)

    def report_trigger_failure(self, sub: SubtaskId, checkpoint_id: int, message: str) -> None:
        """Rule B7: a triggered task no longer ran when the trigger arrived (it had just finished; a remote
        executor learns that a round trip late): abort that checkpoint, uncounted. The next trigger plans
        from fresh statuses: periodic checkpoints simply go on, a final checkpoint is retried soon, and a
        stop-with-savepoint is triggered again (:meth:`stop_with_savepoint`).

        The tasks of an aborted *synchronous* savepoint are not told here: a task told fails over (rule
        G4), while one left alone simply takes the retried savepoint (a newer synchronous savepoint
        replaces the one it waits for, and its sinks commit every pending transaction up to the retry's id).
        """
        pending = self._pending.get(checkpoint_id)
        if pending is not None and not pending.finalizing:
            self._refused[checkpoint_id] = sub
            for old in [c for c in self._refused if c < checkpoint_id - _ABORTED_KEPT]:
                del self._refused[old]
            notify = not pending.options.synchronous
            if not notify:
                self._unnotified_sync[checkpoint_id] = pending.plan.tasks_to_commit_to
            self._abort(pending, CheckpointFailureReason.TASK_CHECKPOINT_FAILURE, message, notify=notify)

    def decline(self, sub: SubtaskId, checkpoint_id: int, error: BaseException) -> None:
        pending = self._pending.get(checkpoint_id)
        if pending is not None and not pending.finalizing:
            self._abort(
                pending,
                CheckpointFailureReason.CHECKPOINT_ASYNC_EXCEPTION,
                f"task {sub} could not complete its snapshot: {error}",
            )

    def _expire(self, checkpoint_id: int) -> None:
        pending = self._pending.get(checkpoint_id)
        if pending is not None and not pending.finalizing:
            missing = sorted(str(s) for s in pending.plan.tasks_to_wait_for - set(pending.acks))
            self._abort(
                pending,
                CheckpointFailureReason.CHECKPOINT_EXPIRED,
                f"checkpoint {checkpoint_id} expired before completing; not acknowledged by {', '.join(missing)}",
            )

    # --- completion ----------------------------------------------------------------------------------

    def _build_metadata(self, pending: PendingCheckpoint) -> CheckpointMetadata:
        return build_metadata(self.job_id, self.topology, pending)

    async def _finalize(self, pending: PendingCheckpoint) -> None:
        pending.finalizing = True
        try:
            metadata = self._build_metadata(pending)
        except PartialFinishingNotSupportedError as exc:
            self._abort(pending, CheckpointFailureReason.CHECKPOINT_DECLINED_TASK_CLOSING, str(exc))
            return
        try:
            completed = await asyncio.to_thread(commit_metadata, pending, metadata)
        except CommitOutcomeUnknownError as exc:
            resolved = await self._resolve_unknown_commit(pending, metadata, exc)
            if resolved is None:
                return
            completed = resolved
        except (KeystateError, OSError) as exc:
            self._abort(
                pending,
                CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE,
                f"Could not finalize the pending checkpoint {pending.checkpoint_id}: {exc}",
            )
            return
        if self._pending.pop(pending.checkpoint_id, None) is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        if completed.kind is CheckpointKind.CHECKPOINT:
            async with self._store_lock:  # one retention change at a time, in id order
                newest = self.store.latest()
                if newest is not None and newest.checkpoint_id > completed.checkpoint_id:
                    # A newer checkpoint completed first (concurrent checkpoints): this one is subsumed at
                    # once and never reported complete, so lower ids never commit after higher ones
                    # (rule H2). Flink aborts such a pending checkpoint as CHECKPOINT_SUBSUMED.
                    await asyncio.to_thread(self.store.discard_unretained, completed)
                    self._subsumed(pending, newest.checkpoint_id)
                    return
                self.store.registry.completed_in_deployment()  # every running subtask reported its chain
                await asyncio.to_thread(self.store.add, completed)
                self.latest_checkpoint = completed
        self._failures = 0
        self._last_completion = time.monotonic()
        self.completed += 1
        if self.latest is None or self.latest.checkpoint_id < completed.checkpoint_id:
            self.latest = completed
        if self._final_after is not None and pending.checkpoint_id >= self._final_after:
            self._final_after = None
        failing_over = False
        try:
            faults.point("metadata.commit.after", checkpoint_id=pending.checkpoint_id)
        except Exception as exc:
            # As if the coordinator died right after the commit: nobody is notified, and the job fails
            # over to this (complete, retained) checkpoint, whose sinks then commit on restore.
            log.warning("failing over after checkpoint %d completed: %s", pending.checkpoint_id, exc)
            failing_over = True
            self._on_fatal(exc)
        # Regular savepoints commit no side effects; checkpoints and stop-with-savepoint do (H1).
        if not failing_over and not (pending.options.is_savepoint and not pending.options.synchronous):
            for sub in sorted(pending.plan.tasks_to_commit_to):
                task = self._tasks.get(sub)
                if task is not None:
                    task.notify_checkpoint_complete(pending.checkpoint_id)
        for listener in self.listeners:
            listener(completed)
        if not pending.future.done():
            pending.future.set_result(completed)
        self._start_requested_final()

    async def _resolve_unknown_commit(
        self, pending: PendingCheckpoint, metadata: CheckpointMetadata, error: CommitOutcomeUnknownError
    ) -> CompletedCheckpoint | None:
        """The ``_metadata`` write may or may not have landed. Commit the identical bytes again until
        the outcome is known (docs/format.md section 2): now complete, or found in place (ours), or
        another writer's (a failed commit). Meanwhile the checkpoint stays pending, so a failover waits
        for the answer (:meth:`settle`) instead of restoring an older checkpoint whose sinks would
        abort transactions this one may have committed. Still unknown after the retries: the job
        fails for good, keeping the files; a restart finds out from storage which checkpoint is latest.

        Returns:
            The completed checkpoint, or ``None`` when the checkpoint was aborted or the job failed.
        """
        policy = self.config.retry or RetryPolicy()
        cid = pending.checkpoint_id
        for attempt in range(1, policy.max_attempts + 1):
            log.warning("commit of checkpoint %d has an unknown outcome (%s); committing again (%d of %d)",
                        cid, error, attempt, policy.max_attempts)  # fmt: skip
            await asyncio.sleep(policy.backoff(attempt))
            try:
                return await asyncio.to_thread(pending.writer.commit, metadata)
            except CommitOutcomeUnknownError as exc:
                error = exc
            except (KeystateError, OSError) as exc:
                self._abort(
                    pending,
                    CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE,
                    f"Could not finalize the pending checkpoint {cid}: {exc}",
                )
                return None
        message = (
            f"the commit of checkpoint {cid} has an unknown outcome after {policy.max_attempts} more attempts "
            f"({error}); its files are kept. Restart the job from its latest completed checkpoint"
        )
        if self._pending.pop(cid, None) is not None:
            if pending.timer is not None:
                pending.timer.cancel()
            pending.fail(CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE, message)
        self._on_fatal(JobFailedError(message))
        return None

    def _start_requested_final(self) -> bool:
        """Trigger the final checkpoint requested while others were pending, once none is; whether the
        request was taken (it is dropped when no final checkpoint is due any more)."""
        if not (self._final_requested and not self._pending):
            return False
        self._final_requested = False
        if self._final_after is not None:
            self._spawn(self._trigger_quietly(final=True), "final-checkpoint")
        return True

    def _subsumed(self, pending: PendingCheckpoint, newer: int) -> None:
        """A committed checkpoint discarded because ``newer`` completed first: reported as failed."""
        message = f"checkpoint {pending.checkpoint_id} completed after checkpoint {newer} and is subsumed"
        log.info("%s", message)
        reason = CheckpointFailureReason.CHECKPOINT_SUBSUMED
        for listener in self.failure_listeners:
            listener(pending.checkpoint_id, reason, message)
        pending.fail(reason, message)
        self._start_requested_final()

    def _abort(
        self, pending: PendingCheckpoint, reason: CheckpointFailureReason, message: str, *, notify: bool = True
    ) -> None:
        if self._pending.pop(pending.checkpoint_id, None) is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        log.info("checkpoint %d aborted (%s): %s", pending.checkpoint_id, reason.value, message)
        self.store.registry.pending_ended(pending.checkpoint_id)
        self._aborted_writers[pending.checkpoint_id] = pending.writer
        while len(self._aborted_writers) > _ABORTED_KEPT:
            del self._aborted_writers[next(iter(self._aborted_writers))]
        for sub in sorted(pending.plan.tasks_to_commit_to) if notify else ():
            task = self._tasks.get(sub)
            if task is not None:
                task.notify_checkpoint_aborted(pending.checkpoint_id)
        self._spawn(asyncio.to_thread(abort_writer, pending.writer), f"abort-{pending.checkpoint_id}")
        for listener in self.failure_listeners:
            listener(pending.checkpoint_id, reason, message)
        pending.fail(reason, message)
        if reason.counted:
            self._failures += 1
            if self._failures > self.config.tolerable_failed_checkpoints:
                self._on_fatal(
                    JobFailedError(f"Exceeded checkpoint tolerable failure threshold. Last failure: {message}")
                )
        if (
            not self._start_requested_final()
            and self._final_after is not None
            and reason is not CheckpointFailureReason.JOB_FAILOVER
            and not self._periodic_stopped
            and self._final_retry is None
        ):
            # The final checkpoint failed: retry soon instead of leaving every task that reached end
            # of data waiting for the next periodic checkpoint (which may be far away; see rule C7).
            delay = max(self.config.min_pause, _FINAL_RETRY_DELAY)
            self._final_retry = asyncio.get_running_loop().call_later(delay, self._retry_final)

    # --- savepoints ----------------------------------------------------------------------------------

    async def trigger_savepoint(self) -> CompletedCheckpoint:
        """A savepoint while the job keeps running (commits no side effects)."""
        return await self.trigger(CheckpointOptions(CheckpointKind.SAVEPOINT))

    async def stop_with_savepoint(self, *, drain: bool) -> CompletedCheckpoint:
        """Stop the periodic scheduler and take the synchronous savepoint every task waits for (G1).

        Raises:
            StopWithSavepointError: the savepoint failed; the scheduler restarts.
        """
        self._periodic_stopped = True
        while self._pending:
            await asyncio.gather(*(p.future for p in list(self._pending.values())), return_exceptions=True)
        options = CheckpointOptions(CheckpointKind.SAVEPOINT, synchronous=True, drain=drain)
        retries = 0
        while True:
            first_id = self._next_id
            try:
                savepoint = await self.trigger(options)
            except CheckpointFailedError as exc:
                refused = self._refused_since(first_id)
                race = exc.reason is CheckpointFailureReason.TASK_CHECKPOINT_FAILURE and refused is not None
                if race and refused is not None and retries < _RACE_RETRIES and self._tasks:
                    # Only the race of rule B7: plan again once the refusing task's FINISHED is known.
                    retries += 1
                    log.info("stop-with-savepoint: %s; triggering it again (%d of %d)", exc, retries, _RACE_RETRIES)
                    await self._settle_status(refused)
                    continue
                self._periodic_stopped = False
                self._notify_unnotified_sync()
                raise StopWithSavepointError(f"Stop-with-savepoint failed: {exc}") from exc
            self._unnotified_sync.clear()  # their tasks took this one
            return savepoint

    def _refused_since(self, first_id: int) -> SubtaskId | None:
        """The task that refused a trigger of a checkpoint with id >= ``first_id`` (rule B7), if any."""
        refused = [sub for cid, sub in sorted(self._refused.items()) if cid >= first_id]
        return refused[-1] if refused else None

    async def _settle_status(self, sub: SubtaskId) -> None:
        """Wait (a little) until ``sub`` is no longer seen running: the next plan must not trigger it again."""
        for _ in range(int(_RACE_SETTLE / 0.01)):
            task = self._tasks.get(sub)
            if task is None or task.status is not SubtaskStatus.RUNNING:
                return
            await asyncio.sleep(0.01)

    def _notify_unnotified_sync(self) -> None:
        """The stop-with-savepoint gave up: tell the tasks of the synchronous savepoints the race aborted
        (they fail over, rule G4, instead of waiting for a savepoint that will never complete)."""
        for checkpoint_id, subtasks in sorted(self._unnotified_sync.items()):
            for sub in sorted(subtasks):
                task = self._tasks.get(sub)
                if task is not None:
                    task.notify_checkpoint_aborted(checkpoint_id)
        self._unnotified_sync.clear()
