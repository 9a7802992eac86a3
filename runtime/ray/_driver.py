"""The driver's side of a deployment on Ray: one actor per subtask, the coordinator's gateways to them.

:class:`RayDeployment` creates the actors, wires their channels, and gives the coordinator one
:class:`RemoteTask` gateway per subtask. Its run coroutine for a subtask long-polls the actor's events
(status changes, acknowledgements, declines, end of data) and hands them to the coordinator in order;
when the actor's process dies (SIGKILL, ``ray.kill``, a lost node) that call fails, the run raises
``TaskFailedError`` and the job fails over like any task failure.

Control messages to one actor (checkpoint announcements, triggers, notifications) are sent one after the
other, in the order the coordinator issued them; a trigger is sent only once every actor has the
checkpoint's directory, so no barrier can reach a worker before its writer exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from keystate.runtime.checkpoint_protocol import TaskGateway
from keystate.runtime.errors import JobError, TaskFailedError
from keystate.runtime.events import CheckpointOptions
from keystate.runtime.executor import Deployment, JobRun, ObservedCheckpointStorage
from keystate.runtime.plan import SubtaskId, SubtaskStatus
from keystate.runtime.ray._messages import AcknowledgementError, snapshot_from_json
from keystate.runtime.task import TaskState
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.errors import KeystateError

__all__ = ["RayDeployment", "RemoteTask", "RemoteTaskError"]

log = logging.getLogger(__name__)

_CANCEL_GRACE = 10.0
"""Seconds a worker gets to cancel its task (close(), scratch removed) before its actor is killed."""


class RemoteTaskError(JobError):
    """A task in a worker process reported an error (its message is the worker's)."""


class RemoteTask:
    """The coordinator's gateway to one subtask's actor (the ``TaskGateway`` protocol)."""

    def __init__(self, sub: SubtaskId, actor: Any, deployment: RayDeployment) -> None:
        self.sub = sub
        self.actor = actor
        self.pid: int | None = None
        """The worker's process id (``None`` until the actor is connected)."""
        self.node_id: str | None = None
        """The Ray node the worker runs on (``None`` until the actor is connected)."""
        self._deployment = deployment
        self._status = SubtaskStatus.NOT_RUNNING
        self._last: asyncio.Future[None] | None = None

    @property
    def status(self) -> SubtaskStatus:
        return self._status

    def send(self, message: Callable[[], Awaitable[Any]]) -> asyncio.Future[None]:
        """Send a control message after the ones before it; a failure is left to the event pump to report."""
        previous = self._last

        async def in_order() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await message()
            except Exception as exc:
                log.debug("task %s: control message failed: %s", self.sub, exc)

        self._last = asyncio.ensure_future(in_order())
        return self._last

    def trigger_checkpoint(self, checkpoint_id: int, options: CheckpointOptions) -> bool:
        if self._status is not SubtaskStatus.RUNNING:
            return False
        announced = self._deployment.announced(checkpoint_id)

        async def trigger() -> None:
            await announced
            refused = await self.actor.trigger.remote(checkpoint_id, options)
            if refused is None:
                return
            # The task finished before the trigger arrived (its FINISHED was still on its way): rule B7.
            # The answer is fresher than the event, so the next plan already leaves the task out.
            if refused == TaskState.FINISHED.value and self._status is SubtaskStatus.RUNNING:
                self._status = SubtaskStatus.FINISHED
            self._deployment.run.coordinator.report_trigger_failure(
                self.sub, checkpoint_id, f"task {self.sub} received a checkpoint request after it finished"
            )

        self.send(trigger)
        return True

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        if self._status is SubtaskStatus.RUNNING:
            self.send(lambda: self.actor.notify_complete.remote(checkpoint_id))

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        if self._status is SubtaskStatus.RUNNING:
            self.send(lambda: self.actor.notify_aborted.remote(checkpoint_id))

    # --- events from the worker ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the actor's events until its task finished; raise ``TaskFailedError`` when it failed."""
        from ray.exceptions import RayError

        while True:
            try:
                events = await self.actor.events.remote()
            except RayError as exc:
                self._status = SubtaskStatus.NOT_RUNNING
                self._deployment.ready.set()
                node = f" on node {self.node_id}" if self.node_id is not None else ""
                where = f" (pid {self.pid}{node})" if self.pid is not None else ""
                raise TaskFailedError(
                    f"task {self.sub} failed: its worker process{where} died: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
            for event in events:
                if self._on_event(event):
                    return

    def _on_event(self, event: tuple[Any, ...]) -> bool:
        kind = event[0]
        coordinator = self._deployment.run.coordinator
        if kind == "running":
            self._status = SubtaskStatus.RUNNING
            self._deployment.task_running()
        elif kind == "ack":
            checkpoint_id, text = event[1], event[2]
            if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int):
                raise TaskFailedError(f"task {self.sub} acknowledged a checkpoint id {checkpoint_id!r}, not an integer")
            try:
                snapshot = snapshot_from_json(text, subtask=str(self.sub), checkpoint_id=checkpoint_id)
            except AcknowledgementError as exc:
                # Its state cannot be vouched for, so the checkpoint cannot complete: declined (counted, as a
                # failed async part is), nothing reaches the coordinator or the shared-state registry.
                log.warning("%s", exc)
                coordinator.decline(self.sub, checkpoint_id, exc)
                return False
            writer = coordinator.writer_for(checkpoint_id)
            if writer is not None:
                try:
                    writer.adopt([*snapshot.keyed, *snapshot.operator])  # the worker's files, now vouched for
                except KeystateError as exc:
                    log.debug("checkpoint %d: not adopting %s's files: %s", checkpoint_id, self.sub, exc)
            coordinator.acknowledge(self.sub, checkpoint_id, snapshot)
        elif kind == "decline":
            coordinator.decline(self.sub, event[1], RemoteTaskError(event[2]))
        elif kind == "end_of_data":
            coordinator.report_end_of_data(self.sub)
        elif kind == "finishing_done":
            # The task reached FINISHED; its cleanup and last deliveries are still under way ("finished").
            self._status = SubtaskStatus.FINISHED
            self._deployment.task_running()
        elif kind == "finished":
            self._status = SubtaskStatus.FINISHED
            self._deployment.task_running()
            return True
        elif kind == "failed":
            self._status = SubtaskStatus.NOT_RUNNING
            self._deployment.ready.set()
            raise TaskFailedError(event[1])
        elif kind == "canceled":
            self._status = SubtaskStatus.NOT_RUNNING
            raise TaskFailedError(f"task {self.sub} was canceled in its worker")
        return False


class RayDeployment(Deployment):
    """One attempt's actors (created by ``RayExecutor.deploy``)."""

    def __init__(self, run: JobRun, actors: dict[SubtaskId, Any]) -> None:
        self.run = run
        self.tasks = {sub: RemoteTask(sub, actor, self) for sub, actor in actors.items()}
        self.ready = asyncio.Event()
        self._announcements: dict[int, asyncio.Future[Any]] = {}
        storage = run.coordinator.storage
        self._storage = storage if isinstance(storage, ObservedCheckpointStorage) else None
        if self._storage is not None:
            self._storage.begin_listeners.append(self._announce)

    @property
    def gateways(self) -> Mapping[SubtaskId, TaskGateway]:
        return self.tasks

    def task_running(self) -> None:
        if all(t.status is not SubtaskStatus.NOT_RUNNING for t in self.tasks.values()):
            self.ready.set()

    def _announce(self, writer: CheckpointWriter) -> None:
        """Tell every worker where checkpoint ``writer.checkpoint_id``'s files go, before any trigger."""
        cid, kind, directory = writer.checkpoint_id, writer.kind.value, writer.directory
        sent = [
            task.send(lambda task=task: task.actor.begin.remote(cid, kind, directory))  # type: ignore[misc]
            for task in self.tasks.values()
        ]
        self._announcements[cid] = asyncio.gather(*sent)
        for old in [c for c in self._announcements if c < cid - 64]:
            del self._announcements[old]

    def announced(self, checkpoint_id: int) -> Awaitable[Any]:
        done = self._announcements.get(checkpoint_id)
        if done is None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future
        return done

    def runs(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {str(sub): task.run() for sub, task in self.tasks.items()}

    async def running(self) -> None:
        await self.ready.wait()

    async def close(self) -> None:
        import ray

        if self._storage is not None and self._announce in self._storage.begin_listeners:
            self._storage.begin_listeners.remove(self._announce)
        actors = [t.actor for t in self.tasks.values()]
        cancels = [a.cancel.remote() for a in actors]
        try:
            await asyncio.wait_for(asyncio.gather(*cancels, return_exceptions=True), _CANCEL_GRACE)
        except TimeoutError:
            log.warning("job %s: workers did not cancel within %.0f s; killing them", self.run.job_id, _CANCEL_GRACE)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone
                log.debug("ray.kill: %s", exc)
