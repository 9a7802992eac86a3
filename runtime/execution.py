"""Running a job: deploy its tasks, coordinate checkpoints, fail over, stop with a savepoint.

:func:`submit` starts a job on the running event loop and returns a :class:`JobClient`;
:func:`run_job` runs one to completion. Every task runs in the attempt's ``asyncio.TaskGroup``; a
task failure cancels the others and the job restarts from the latest completed checkpoint after the
restart strategy's delay (a full failover, as Flink's full restart strategy), until the attempts are
used up. A restore from a given checkpoint or savepoint first runs the restore rules
(:mod:`keystate.runtime.restore_rules`) and refuses an incompatible topology before anything starts.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from enum import StrEnum

from keystate.runtime.assignment import assign_state, effective_topology
from keystate.runtime.config import JobConfig
from keystate.runtime.coordinator import CheckpointCoordinator
from keystate.runtime.errors import IncompatibleRestoreError, JobFailedError
from keystate.runtime.executor import Deployment, EmbeddedExecutor, Executor, JobRun, open_checkpoint_storage
from keystate.runtime.graph import JobGraph
from keystate.runtime.plan import SubtaskId
from keystate.runtime.restore_rules import check_restore
from keystate.runtime.task import TaskRestore
from keystate.statebackend.backends import StateBackend, state_backend
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.topology import Topology
from keystate.storage.uri import open_storage

__all__ = ["JobClient", "JobResult", "JobStatus", "load_checkpoint", "run_job", "submit"]

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: JobStatus
    attempts: int
    checkpoints: int
    """Completed checkpoints and savepoints."""
    savepoint: CompletedCheckpoint | None = None
    """The stop-with-savepoint savepoint, if the job was stopped with one."""
    error: BaseException | None = None


def load_checkpoint(location: str, *, endpoint_url: str | None = None) -> CompletedCheckpoint:
    """The completed checkpoint or savepoint at ``location`` (a directory, its ``_metadata``, a job
    directory or a storage root; path or URI)."""
    return open_storage(location, endpoint_url=endpoint_url).resolve()


class _Canceled(Exception):
    pass


class JobClient:
    """Control of a submitted job."""

    def __init__(self, execution: _Execution, runner: asyncio.Task[JobResult]) -> None:
        self._execution = execution
        self._runner = runner

    @property
    def job_id(self) -> str:
        return self._execution.job_id

    @property
    def coordinator(self) -> CheckpointCoordinator:
        return self._execution.coordinator

    @property
    def status(self) -> JobStatus:
        return self._execution.status

    @property
    def topology(self) -> Topology:
        return self._execution.topology

    @property
    def attempt(self) -> int:
        """The current attempt (0 first; each failover adds one)."""
        return self._execution.attempt

    @property
    def deployment(self) -> Deployment | None:
        """The current attempt's deployed tasks (the executor's view; ``None`` between attempts)."""
        return self._execution.deployment

    async def wait(self) -> JobResult:
        return await asyncio.shield(self._runner)

    async def _deployed(self) -> None:
        """Wait until the first attempt's tasks are deployed, or the job ended before that.

        The job recovers its earlier checkpoints (a thread hop) before it deploys, so a trigger right after
        :func:`submit` would otherwise find no running task and be declined; Flink's client likewise acts
        on a job only once it has left INITIALIZING.
        """
        deployed = asyncio.ensure_future(self._execution.deployed.wait())
        try:
            await asyncio.wait({deployed, self._runner}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            deployed.cancel()

    async def wait_deployed(self) -> None:
        """Wait until the first attempt's tasks are deployed (on Ray: every actor started), or the job ended."""
        await self._deployed()

    async def trigger_checkpoint(self) -> CompletedCheckpoint:
        await self._deployed()
        return await self._execution.coordinator.trigger()

    async def trigger_savepoint(self) -> CompletedCheckpoint:
        await self._deployed()
        return await self._execution.coordinator.trigger_savepoint()

    async def stop_with_savepoint(self, *, drain: bool = True) -> CompletedCheckpoint:
        """Stop the job with a savepoint (``drain``: finish() runs, as ``--drain``); waits for the job to end.

        Raises:
            StopWithSavepointError: the savepoint failed; the job keeps running or fails over.
        """
        await self._deployed()
        savepoint = await self._execution.coordinator.stop_with_savepoint(drain=drain)
        self._execution.savepoint = savepoint
        await self.wait()
        return savepoint

    async def cancel(self) -> JobResult:
        self._execution.request_stop(_Canceled("canceled by the user"))
        return await self.wait()


class _Execution:
    def __init__(
        self,
        graph: JobGraph,
        config: JobConfig,
        job_id: str,
        restore: CompletedCheckpoint | None,
    ) -> None:
        self.graph = graph
        self.config = config
        self.job_id = job_id
        self.initial_restore = restore
        self.topology = effective_topology(graph.topology(), restore)
        self.executor: Executor = config.executor or EmbeddedExecutor()
        ckpt = config.checkpoint
        storage = open_checkpoint_storage(ckpt, observed=self.executor.observed_storage)
        self.backend: StateBackend = (
            state_backend(config.state_backend) if isinstance(config.state_backend, str) else config.state_backend
        )
        self.coordinator = CheckpointCoordinator(
            job_id=job_id,
            topology=self.topology,
            storage=storage,
            config=ckpt,
            on_fatal=self.request_stop,
            next_checkpoint_id=(restore.checkpoint_id + 1) if restore is not None else 1,
        )
        self.status = JobStatus.RUNNING
        self.savepoint: CompletedCheckpoint | None = None
        self.coordinator.listeners.append(self._on_checkpoint)
        self.job_run = JobRun(graph, config, job_id, self.topology, self.coordinator, self.backend)
        self._stop_event = asyncio.Event()
        self._stop_error: BaseException | None = None
        self.deployed = asyncio.Event()
        self.attempt = 0
        self.deployment: Deployment | None = None
        """Set once the first attempt's tasks are attached to the coordinator."""

    def _on_checkpoint(self, checkpoint: CompletedCheckpoint) -> None:
        # Recorded here, not by the client: the job may end before the client's await resumes.
        if checkpoint.metadata.properties.synchronous:
            self.savepoint = checkpoint

    def request_stop(self, error: BaseException) -> None:
        if self._stop_error is None:
            self._stop_error = error
        self._stop_event.set()

    # --- running -------------------------------------------------------------------------------------

    async def _supervise(self, runs: list[asyncio.Task[None]]) -> None:
        stop = asyncio.ensure_future(self._stop_event.wait())
        done = asyncio.ensure_future(asyncio.wait(runs))
        try:
            await asyncio.wait({stop, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            done.cancel()
        if self._stop_event.is_set() and self._stop_error is not None:
            raise self._stop_error

    async def _attempt(self, attempt: int, restore: dict[SubtaskId, TaskRestore]) -> None:
        try:
            deployment = await self.executor.deploy(self.job_run, attempt, restore)
        except Exception as exc:  # as if a task failed: the restart strategy decides
            raise BaseExceptionGroup(f"attempt {attempt} could not be deployed", [exc]) from None
        self.attempt, self.deployment = attempt, deployment
        self.coordinator.attach(dict(deployment.gateways))
        periodic = asyncio.get_running_loop().create_task(self.coordinator.run_periodic(), name="checkpoint-scheduler")
        try:
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(coro, name=name) for name, coro in deployment.runs().items()]
                group.create_task(self._announce_deployed(deployment), name="deployed")
                group.create_task(self._supervise(runs), name="supervisor")
        finally:
            periodic.cancel()
            await asyncio.gather(periodic, return_exceptions=True)
            self.coordinator.detach()
            await self.coordinator.settle()  # a checkpoint completing now is the one to restart from
            self.deployment = None
            await deployment.close()

    async def _announce_deployed(self, deployment: Deployment) -> None:
        await deployment.running()
        self.deployed.set()

    async def run(self) -> JobResult:
        attempt = 0
        restore = assign_state(self.initial_restore, self.topology.operators) if self.initial_restore else {}
        try:
            await self.executor.start(self.job_run)  # ExecutorError: raised to the caller, nothing started
            # Before anything runs: checkpoints earlier runs with this job id left are retained (and
            # subsumed) like this run's own, and new ids continue after theirs.
            try:
                await self.coordinator.recover()
            except KeystateError as exc:
                if not self.config.checkpoint.enabled:
                    # No periodic checkpoints: a job that may never write one does not fail for this.
                    log.warning("job %s: cannot read its earlier checkpoints: %s", self.job_id, exc)
                else:
                    self.status = JobStatus.FAILED
                    storage = self.coordinator.storage
                    where = storage.store.describe(storage.job_directory(self.job_id))
                    error = JobFailedError(
                        f"job {self.job_id} cannot start: the completed checkpoints under {where} cannot be "
                        f"listed ({exc}); fix the storage and start the job again"
                    )
                    error.__cause__ = exc
                    return self._result(attempt, error)
            while True:
                try:
                    await self._attempt(attempt, restore)
                except BaseExceptionGroup as group:
                    failure = self._classify(group)
                    if failure is None:
                        self.status = JobStatus.CANCELED
                        return self._result(attempt)
                    if isinstance(failure, JobFailedError) or attempt >= self.config.restart.max_attempts:
                        self.status = JobStatus.FAILED
                        if not isinstance(failure, JobFailedError):
                            error = JobFailedError(f"job {self.job_id} failed after {attempt + 1} attempts: {failure}")
                            error.__cause__ = failure
                            failure = error
                        return self._result(attempt, failure)
                    log.warning("job %s: %s; restarting (attempt %d)", self.job_id, failure, attempt + 1)
                    if failure is self._stop_error:  # a failover requested by the coordinator, not a stop
                        self._stop_error = None
                        self._stop_event.clear()
                else:
                    self.status = JobStatus.FINISHED
                    return self._result(attempt)
                attempt += 1
                await asyncio.sleep(self.config.restart.delay)
                # This run's newest checkpoint, else what it started from: never a checkpoint an earlier run
                # with this job id left (retention keeps those, but this run did not start from them).
                latest = self.coordinator.latest_checkpoint or self.initial_restore
                restore = assign_state(latest, self.topology.operators) if latest is not None else {}
        finally:
            await self.coordinator.close()

    @staticmethod
    def _classify(group: BaseExceptionGroup) -> BaseException | None:
        """``None`` for a cancel; the job-ending error if there is one; else the first task failure."""
        if group.subgroup(lambda e: isinstance(e, _Canceled)) is not None:
            return None
        fatal = group.subgroup(lambda e: isinstance(e, JobFailedError))
        if fatal is not None:
            return fatal.exceptions[0]
        failures = group.subgroup(lambda e: isinstance(e, Exception))
        if failures is None:
            raise group
        first = failures.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return first

    def _result(self, attempt: int, error: BaseException | None = None) -> JobResult:
        return JobResult(self.job_id, self.status, attempt + 1, self.coordinator.completed, self.savepoint, error)


def submit(
    graph: JobGraph,
    config: JobConfig | None = None,
    *,
    restore_from: str | CompletedCheckpoint | None = None,
    allow_non_restored_state: bool = False,
    job_id: str | None = None,
) -> JobClient:
    """Start a job on the running event loop.

    Args:
        graph: the job.
        config: its configuration (defaults: LMDB state, checkpoints under ``./checkpoints``, off).
        restore_from: a checkpoint or savepoint (location or loaded) to start from.
        allow_non_restored_state: drop state of operators the graph no longer has.
        job_id: 32 hex digits; a new one by default.

    Raises:
        IncompatibleRestoreError: the restore rules reject the graph.
        CheckpointNotFoundError: ``restore_from`` holds no completed checkpoint.
        ExecutorError: ``config.executor`` cannot run this job (e.g. an operator Ray cannot pickle); the
            executor's environment errors (engine not installed, cluster unreachable, storage not shared)
            are raised by :meth:`JobClient.wait` (and :func:`run_job`), before any task started.
    """
    config = config or JobConfig()
    if config.executor is not None:
        config.executor.check(graph, config)  # ExecutorError: a part of the job cannot run there
    restore = None
    if restore_from is not None:
        restore = (
            load_checkpoint(restore_from, endpoint_url=config.checkpoint.endpoint_url)
            if isinstance(restore_from, str)
            else restore_from
        )
        report = check_restore(restore.metadata, graph.topology(), allow_non_restored_state=allow_non_restored_state)
        if not report.compatible:
            raise IncompatibleRestoreError(report)
    execution = _Execution(graph, config, job_id or uuid.uuid4().hex, restore)
    runner = asyncio.get_running_loop().create_task(execution.run(), name=f"job-{execution.job_id[:8]}")
    return JobClient(execution, runner)


async def run_job(
    graph: JobGraph,
    config: JobConfig | None = None,
    *,
    restore_from: str | CompletedCheckpoint | None = None,
    allow_non_restored_state: bool = False,
) -> JobResult:
    """Run a job to completion (it must have only bounded sources, or be stopped by a failure)."""
    client = submit(graph, config, restore_from=restore_from, allow_non_restored_state=allow_non_restored_state)
    return await client.wait()
