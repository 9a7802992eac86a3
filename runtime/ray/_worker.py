"""One subtask in a Ray actor: the real :class:`~keystate.runtime.task.Task`, with channels to other actors.

The actor is an asyncio actor: Ray runs its methods on one event loop, which is also the loop its task
runs on, so channel deliveries, credits, checkpoint triggers and notifications reach the task exactly as
they do in-process. What the task tells the coordinator (acknowledgements, declines, end of data) goes
into an ordered event queue that the driver long-polls with :meth:`SubtaskWorker.events`; the driver
learns of the actor's death from that call failing.

Checkpoint files: the driver announces every checkpoint's directory (:meth:`SubtaskWorker.begin`) to
every worker before it triggers any task; the worker writes its state files there itself, with a
``CheckpointWriter`` of its own on the job's checkpoint storage, and acknowledges with the handles as JSON.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keystate.runtime.channels import InputGate
from keystate.runtime.checkpoint_protocol import SubtaskSnapshot
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.events import CheckpointOptions
from keystate.runtime.executor import OutputWiring, open_checkpoint_storage
from keystate.runtime.graph import InputSpec, OperatorSpec
from keystate.runtime.output import Output, OutputEdge
from keystate.runtime.plan import SubtaskId
from keystate.runtime.ray._channels import RemoteReceiver, RemoteSender
from keystate.runtime.ray._messages import RestorePayload, open_restore, snapshot_to_json
from keystate.runtime.task import Task, TaskState
from keystate.statebackend.backends import StateBackend, state_backend
from keystate.storage.checkpoints import CheckpointStorage, CheckpointWriter
from keystate.storage.format.metadata import CheckpointKind

__all__ = ["ConsumerEdge", "SubtaskWorker", "WorkerBlueprint"]

log = logging.getLogger(__name__)

_WRITERS_KEPT = 64
"""Announced checkpoints a worker remembers (savepoints are never notified complete)."""

Event = tuple[Any, ...]


@dataclass(frozen=True)
class ConsumerEdge:
    """One output edge of the subtask, with what it needs from the consumer operator."""

    wiring: OutputWiring
    consumer: InputSpec
    key_serializer: Any
    parallelism: int
    max_parallelism: int
    target_channels: dict[int, int]
    """Consumer subtask index -> the channel's index in that consumer's input gate."""


@dataclass(frozen=True)
class WorkerBlueprint:
    """Everything a worker needs to build its task (pickled by Ray into the actor's process)."""

    job_id: str
    spec: OperatorSpec
    index: int
    attempt: int
    max_parallelism: int
    checkpoint: CheckpointConfig
    state_backend: str | StateBackend
    channel_capacity: int
    batch_size: int
    wait_for_final_checkpoint: bool
    inputs: list[tuple[str, int, int]]
    """Input gate channels in order: (producer subtask, its output channel index, the input index)."""
    outputs: list[ConsumerEdge]
    restore: RestorePayload | None = None
    output_channels: list[tuple[str, int]] = field(default_factory=list)
    """The subtask's output channels in order: (consumer subtask, the channel index at the consumer)."""

    @property
    def name(self) -> str:
        return str(SubtaskId(self.spec.uid, self.index))


class _CoordinatorProxy:
    """The task's ``TaskCoordinator`` inside the worker: events for the driver, and local writers."""

    def __init__(self, worker: SubtaskWorker) -> None:
        self._worker = worker
        self.writers: OrderedDict[int, CheckpointWriter] = OrderedDict()

    def writer_for(self, checkpoint_id: int) -> CheckpointWriter | None:
        return self.writers.get(checkpoint_id)

    def acknowledge(self, sub: SubtaskId, checkpoint_id: int, snapshot: SubtaskSnapshot) -> None:
        self._worker.emit(("ack", checkpoint_id, snapshot_to_json(snapshot)))

    def decline(self, sub: SubtaskId, checkpoint_id: int, error: BaseException) -> None:
        self._worker.emit(("decline", checkpoint_id, f"{type(error).__name__}: {error}"))

    def report_end_of_data(self, sub: SubtaskId) -> None:
        self._worker.emit(("end_of_data",))


class _ReportingTask(Task):
    """The task, telling the worker the moment it reaches FINISHED (not a poll later)."""

    on_finished: Callable[[], None] | None = None

    def _transition(self, new: TaskState) -> None:
        super()._transition(new)
        if new is TaskState.FINISHED and self.on_finished is not None:
            self.on_finished()


class SubtaskWorker:
    """The body of one subtask's Ray actor (``ray.remote`` is applied by the driver)."""

    def __init__(self, blueprint: WorkerBlueprint) -> None:
        logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s {blueprint.name}: %(message)s")
        self._bp = blueprint
        self._events: list[Event] = []
        self._event_ready: asyncio.Event | None = None
        self._proxy = _CoordinatorProxy(self)
        self._storage: CheckpointStorage | None = None
        self._task: Task | None = None
        self._run: asyncio.Task[None] | None = None
        self._receivers: list[RemoteReceiver] = []
        self._senders: list[RemoteSender] = []

    # --- wiring --------------------------------------------------------------------------------------

    async def connect(self, peers: Mapping[str, Any]) -> tuple[int, str]:
        """Build the task, its channels to ``peers`` (subtask name -> actor handle). Returns the worker's
        pid and the id of the Ray node it runs on."""
        bp = self._bp
        self._event_ready = asyncio.Event()
        wakeup = asyncio.Event()
        self._storage = open_checkpoint_storage(bp.checkpoint)
        for producer, out_index, _k in bp.inputs:
            handle = peers[producer]
            self._receivers.append(
                RemoteReceiver(
                    f"{producer}->{bp.name}",
                    bp.channel_capacity,
                    wakeup,
                    _granter(handle, out_index),
                    _eod_reporter(handle, out_index),
                )
            )
        for consumer, channel in bp.output_channels:
            self._senders.append(
                RemoteSender(f"{bp.name}->{consumer}", _deliverer(peers[consumer], channel), bp.channel_capacity)
            )
        edges: list[OutputEdge] = []
        position = 0
        for edge in bp.outputs:
            senders = {}
            for target in edge.wiring.targets:
                senders[target] = self._senders[position]
                position += 1
            edges.append(
                OutputEdge(
                    senders,
                    edge.consumer.partitioning,
                    bp.index,
                    key_selector=edge.consumer.key_selector,
                    key_serializer=edge.key_serializer,
                    downstream_parallelism=edge.parallelism,
                    downstream_max_parallelism=edge.max_parallelism,
                )
            )
        restore = None
        if bp.restore is not None:
            restore = await asyncio.to_thread(
                open_restore, bp.restore, self._storage, endpoint_url=bp.checkpoint.endpoint_url, where=bp.name
            )
        backend = state_backend(bp.state_backend) if isinstance(bp.state_backend, str) else bp.state_backend
        self._task = _ReportingTask(
            spec=bp.spec,
            index=bp.index,
            attempt=bp.attempt,
            gate=InputGate(self._receivers, [k for _p, _o, k in bp.inputs]) if bp.spec.inputs else None,
            output=Output(edges, bp.batch_size),
            wakeup=wakeup,
            coordinator=self._proxy,
            state_backend=backend,
            max_parallelism=bp.max_parallelism,
            restore=restore,
            wait_for_final_checkpoint=bp.wait_for_final_checkpoint,
            batch_size=bp.batch_size,
            checkpointing=bp.checkpoint.enabled,
            checkpoint_config=bp.checkpoint,
        )
        self._task.on_finished = self._report_finished
        import ray

        return os.getpid(), str(ray.get_runtime_context().get_node_id())

    async def start(self) -> None:
        """Start the task; it runs (takes triggers) when this returns."""
        assert self._task is not None
        self._run = asyncio.get_running_loop().create_task(self._life(self._task), name=self._bp.name)
        await asyncio.sleep(0)  # the task's first step: CREATED -> RUNNING

    async def _life(self, task: Task) -> None:
        self.emit(("running",))
        run = asyncio.ensure_future(task.run())
        try:
            await run
            for sender in self._senders:
                await sender.flushed()  # EndOfPartition reached every consumer
        except asyncio.CancelledError:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            self.emit(("canceled",))
            raise
        except Exception as exc:
            self.emit(("failed", str(exc)))
        else:
            self.emit(("finished",))

    def _report_finished(self) -> None:
        """Tell the driver FINISHED the moment the task is (before its cleanup and the last deliveries), so
        the coordinator plans without it sooner: a trigger that reaches a finished task aborts its checkpoint
        (rule B7), and the window for that is the time the driver still believes the task runs."""
        self.emit(("finishing_done",))

    async def cancel(self) -> None:
        """Cancel the task and wait for its cleanup (close(), the LMDB scratch removed)."""
        run = self._run
        if run is not None and not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

    # --- data plane ----------------------------------------------------------------------------------

    async def push(self, channel: int, seq: int, items: list[Any]) -> None:
        self._receivers[channel].deliver(seq, items)

    async def grant(self, out_channel: int, credits: int) -> None:
        self._senders[out_channel].grant(credits)

    async def end_of_data_consumed(self, out_channel: int) -> None:
        self._senders[out_channel].end_of_data_was_consumed()

    # --- control plane -------------------------------------------------------------------------------

    async def begin(self, checkpoint_id: int, kind: str, directory: str) -> None:
        """Checkpoint ``checkpoint_id`` is pending; its state files go under ``directory``."""
        assert self._storage is not None
        writers = self._proxy.writers
        writers[checkpoint_id] = CheckpointWriter(
            self._storage, self._bp.job_id, checkpoint_id, CheckpointKind(kind), directory
        )
        while len(writers) > _WRITERS_KEPT:
            writers.popitem(last=False)

    async def trigger(self, checkpoint_id: int, options: CheckpointOptions) -> str | None:
        """Post a trigger to the task: ``None`` when it took it, else the task's state (``"finished"``: it
        finished before the trigger arrived; the driver then applies rule B7)."""
        assert self._task is not None
        if self._task.trigger_checkpoint(checkpoint_id, options):
            return None
        return self._task.state.value

    async def notify_complete(self, checkpoint_id: int) -> None:
        assert self._task is not None
        writers = self._proxy.writers
        for cid in [c for c in writers if c <= checkpoint_id]:
            del writers[cid]
        self._task.notify_checkpoint_complete(checkpoint_id)

    async def notify_aborted(self, checkpoint_id: int) -> None:
        assert self._task is not None
        writer = self._proxy.writers.pop(checkpoint_id, None)
        if writer is not None:
            # This worker's files of the aborted checkpoint (a stream still open fails); off the loop.
            await asyncio.to_thread(writer.abort)
        self._task.notify_checkpoint_aborted(checkpoint_id)

    # --- to the driver -------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self._events.append(event)
        if self._event_ready is not None:
            self._event_ready.set()

    async def events(self) -> list[Event]:
        """The events since the last call, waiting until there is one (the driver long-polls this)."""
        assert self._event_ready is not None
        while not self._events:
            self._event_ready.clear()
            await self._event_ready.wait()
        events, self._events = self._events, []
        return events

    async def pid(self) -> int:
        return os.getpid()


def _granter(handle: Any, out_index: int) -> Any:
    def grant(credits: int) -> None:
        handle.grant.remote(out_index, credits)

    return grant


def _eod_reporter(handle: Any, out_index: int) -> Any:
    def report() -> None:
        handle.end_of_data_consumed.remote(out_index)

    return report


def _deliverer(handle: Any, channel: int) -> Any:
    async def deliver(seq: int, items: list[Any]) -> None:
        await handle.push.remote(channel, seq, items)

    return deliver
