"""A task: one subtask of one operator, running as one asyncio task (rules C, E5, G2-G4, I6 of docs/flink-rules.md).

The task reads its input gate and its mailbox (checkpoint triggers and notifications from the
coordinator) through one wakeup event. Barriers are aligned: a channel that delivered barrier *n* is
blocked until every live channel did; channels that delivered EndOfData or EndOfPartition count as
aligned. When every input delivered EndOfData the task ends its data (``end_input``/``finish`` only
when draining), sends EndOfData downstream and keeps taking part in checkpoints; after all inputs
delivered EndOfPartition it waits, still serving its mailbox, until its consumers have read its
EndOfData and its final checkpoint completed (any checkpoint it took after its end of data, or the
stop-with-savepoint savepoint), then closes and sends EndOfPartition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from keystate.runtime import faults
from keystate.runtime.channels import InputGate
from keystate.runtime.checkpoint_protocol import SubtaskSnapshot, TaskCoordinator
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.errors import StopWithSavepointError, TaskFailedError
from keystate.runtime.events import (
    END_OF_PARTITION,
    MAX_WATERMARK,
    Barrier,
    CheckpointOptions,
    EndOfData,
    EndOfPartition,
    StopMode,
    Watermark,
)
from keystate.runtime.operators import KeyedProcessOperator, Operator, OperatorContext
from keystate.runtime.output import Output
from keystate.runtime.plan import SubtaskId, SubtaskStatus
from keystate.runtime.sources import SourceOperator
from keystate.runtime.task_snapshot import ms, write_and_acknowledge
from keystate.statebackend.backends import StateBackend
from keystate.statebackend.operator_state import OperatorSnapshot
from keystate.statebackend.state import KeyedSnapshot, KeyedStateBackend, SnapshotOptions
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.keygroups import key_group_range_for_subtask
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle

if TYPE_CHECKING:
    from keystate.runtime.graph import OperatorSpec

__all__ = ["Task", "TaskRestore", "TaskState"]

log = logging.getLogger(__name__)


class TaskState(Enum):
    CREATED = "created"
    RUNNING = "running"
    FINISHING = "finishing"
    """End of data reached; waiting for the final checkpoint (still takes part in checkpoints)."""
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"


_TRANSITIONS = {
    TaskState.CREATED: {TaskState.RUNNING, TaskState.FAILED, TaskState.CANCELED},
    TaskState.RUNNING: {TaskState.FINISHING, TaskState.FAILED, TaskState.CANCELED},
    TaskState.FINISHING: {TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELED},
    TaskState.FINISHED: set(),
    TaskState.FAILED: set(),
    TaskState.CANCELED: set(),
}


@dataclass
class TaskRestore:
    """The state one subtask starts from."""

    checkpoint: CompletedCheckpoint
    keyed: list[KeyedStateHandle]
    operator: list[OperatorStateHandle]
    finished_on_restore: bool = False


class Task:
    """One subtask. ``run()`` is its whole life; the coordinator talks to it through the mailbox."""

    def __init__(
        self,
        *,
        spec: OperatorSpec,
        index: int,
        attempt: int,
        gate: InputGate | None,
        output: Output,
        wakeup: asyncio.Event,
        coordinator: TaskCoordinator,
        state_backend: StateBackend,
        max_parallelism: int,
        restore: TaskRestore | None,
        wait_for_final_checkpoint: bool,
        batch_size: int,
        checkpointing: bool = True,
        checkpoint_config: CheckpointConfig | None = None,
    ) -> None:
        self.spec = spec
        self.id = SubtaskId(spec.uid, index)
        self.name = str(self.id)
        self._attempt = attempt
        self._gate = gate
        self._output = output
        self._wakeup = wakeup
        self._coordinator = coordinator
        self._state_backend = state_backend
        self._max_parallelism = max_parallelism
        self._restore = restore
        self._wait_final = wait_for_final_checkpoint
        self._checkpointing = checkpointing
        self._checkpoint_config = checkpoint_config or CheckpointConfig()
        self._snapshot_options = SnapshotOptions()  # incremental or not once the keyed backend exists
        self._batch_size = batch_size
        self._finished_on_restore = restore is not None and restore.finished_on_restore
        self.state = TaskState.CREATED
        self._mailbox: deque[tuple[str, int, CheckpointOptions | None]] = deque()
        self._accepting = True
        self._operator: Operator | None = None
        self._opened = False
        self._keyed: KeyedStateBackend | None = None
        self._selectors: list[Callable[[Any], Any] | None] = [i.key_selector for i in spec.inputs]
        self._async_parts: set[asyncio.Task[None]] = set()
        # checkpointing
        self._aligning: int | None = None
        self._aligning_options = CheckpointOptions()
        self._aligned: set[int] = set()
        self._alignment_started = 0.0  # time.perf_counter() at the first barrier of the alignment
        self._last_checkpoint = restore.checkpoint.checkpoint_id if restore else 0
        self._last_notified = self._last_checkpoint
        self._aborted: set[int] = set()
        # finishing
        self._operators_finished = False
        self._end_of_data_sent = False
        self._final_min_id: int | None = None
        self._sync_savepoint_id: int | None = None
        self._final_done = False
        self._watermarks = [-(1 << 63)] * (len(gate.receivers) if gate else 0)
        self._watermark = -(1 << 63)
        output_wakeup = wakeup.set
        for channel in output.channels:
            channel.on_end_of_data_consumed(output_wakeup)

    def __repr__(self) -> str:
        return f"Task({self.name}, {self.state.value})"

    def _transition(self, new: TaskState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"task {self.name}: illegal transition {self.state.value} -> {new.value}")
        self.state = new

    # --- the coordinator's gateway -------------------------------------------------------------------

    @property
    def status(self) -> SubtaskStatus:
        if self.state in (TaskState.RUNNING, TaskState.FINISHING):
            return SubtaskStatus.RUNNING
        if self.state is TaskState.FINISHED:
            return SubtaskStatus.FINISHED
        return SubtaskStatus.NOT_RUNNING

    def _post(self, kind: str, checkpoint_id: int, options: CheckpointOptions | None = None) -> bool:
        if not self._accepting or self.state not in (TaskState.RUNNING, TaskState.FINISHING):
            return False
        self._mailbox.append((kind, checkpoint_id, options))
        self._wakeup.set()
        return True

    def trigger_checkpoint(self, checkpoint_id: int, options: CheckpointOptions) -> bool:
        return self._post("trigger", checkpoint_id, options)

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        self._post("complete", checkpoint_id)

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        self._post("aborted", checkpoint_id)

    # --- life ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The task's whole life. Raises ``TaskFailedError`` on failure (the job fails over)."""
        try:
            self._transition(TaskState.RUNNING)
            await self._setup()
            if self.spec.is_source:
                await self._run_source()
            else:
                await self._run_inputs()
            await self._after_invoke()
            self._transition(TaskState.FINISHED)
        except asyncio.CancelledError:
            self.state = TaskState.CANCELED
            await self._cleanup()
            raise
        except Exception as exc:
            self.state = TaskState.FAILED
            await self._cleanup()
            raise TaskFailedError(f"task {self.name} failed: {type(exc).__name__}: {exc}") from exc
        await self._cleanup()

    async def _setup(self) -> None:
        spec, restore = self.spec, self._restore
        index = self.id.index
        operator_backend = self._state_backend.create_operator_backend(operator_uid=spec.uid, subtask_index=index)
        if spec.keyed:
            # Opening an LMDB environment creates files: not on the event loop (STYLE 8).
            self._keyed = await asyncio.to_thread(
                self._state_backend.create_keyed_backend,
                operator_uid=spec.uid,
                subtask_index=index,
                max_parallelism=self._max_parallelism,
                key_groups=key_group_range_for_subtask(self._max_parallelism, spec.parallelism, index),
                key_serializer=spec.key_serializer,
            )
            config = self._checkpoint_config
            incremental = config.incremental
            if incremental is None:  # the backend's default: LMDB incremental, heap full
                incremental = self._keyed.incremental_default
            self._snapshot_options = SnapshotOptions(incremental, config.max_chain_length, config.max_delta_ratio)
        if restore is not None and not self._finished_on_restore:
            checkpoint = restore.checkpoint
            if self._keyed is not None and restore.keyed:
                await asyncio.to_thread(self._keyed.restore, [(checkpoint, h) for h in restore.keyed])
            if restore.operator:
                await asyncio.to_thread(operator_backend.restore, [(checkpoint, h) for h in restore.operator])
        self._operator = spec.create_operator()
        if self._finished_on_restore:
            return  # rule E5: no initializeState/open/finish/close for a finished-on-restore task
        ctx = OperatorContext(
            uid=spec.uid,
            subtask_index=index,
            parallelism=spec.parallelism,
            max_parallelism=self._max_parallelism,
            attempt=self._attempt,
            keyed_backend=self._keyed,
            operator_backend=operator_backend,
            emit=self._output.collect,
            restored=restore is not None,
            checkpointing=self._checkpointing,
        )
        self._operator_backend = operator_backend
        self._operator.setup(ctx)
        await self._operator.initialize_state()
        self._opened = True
        await self._operator.open()

    async def _cleanup(self) -> None:
        self._accepting = False
        if self._async_parts:  # a snapshot thread may still read the keyed backend
            await asyncio.wait(self._async_parts)
        operator, self._operator = self._operator, None
        try:
            if operator is not None and self._opened and self.state is not TaskState.FINISHED:
                await operator.close()  # close() runs on failure and cancel too (rule J1)
        except Exception:
            log.exception("task %s: close() failed during cleanup", self.name)
        finally:
            if self._keyed is not None:
                keyed, self._keyed = self._keyed, None
                # Closing removes the environment's files: off the event loop (STYLE 8). If this task
                # is cancelled again meanwhile, the thread still finishes the close.
                await asyncio.to_thread(keyed.close)
            if self._gate is not None:
                self._gate.close()
            self._output.close()

    # --- the main loops ------------------------------------------------------------------------------

    async def _run_source(self) -> None:
        operator = self._operator
        collect, output = self._output.collect, self._output
        if self._finished_on_restore or not isinstance(operator, SourceOperator):
            await self._end_data(StopMode.DRAIN)
            return
        while not self._end_of_data_sent:
            self._wakeup.clear()
            if self._mailbox:
                await self._process_mailbox()
                continue
            records = await operator.poll(self._batch_size)
            if records is None:
                await self._end_data(StopMode.DRAIN)
                break
            for record in records:
                collect(record)
            await output.flush()
            await asyncio.sleep(0)

    async def _run_inputs(self) -> None:
        gate = self._gate
        assert gate is not None
        output = self._output
        processed = 0
        while not gate.all_end_of_partition:
            self._wakeup.clear()
            if self._mailbox:
                await self._process_mailbox()
                continue
            polled = gate.poll()
            if polled is None:
                await output.flush()
                if not self._mailbox and not gate.all_end_of_partition:
                    await self._wakeup.wait()
                continue
            channel, item = polled
            cls = item.__class__
            if cls is list:
                self._process_batch(item, gate.inputs[channel])
                if output.has_pending:
                    await output.flush(only_full=True)
                processed += 1
                if processed % 4 == 0:
                    await asyncio.sleep(0)
            elif cls is Barrier:
                await self._on_barrier(channel, item)
            elif cls is EndOfData:
                await self._on_end_of_data(channel)
            elif cls is EndOfPartition:
                await self._maybe_complete_alignment()
            elif cls is Watermark:
                await self._on_watermark(channel, item)
        await output.flush()

    def _process_batch(self, batch: list[Any], input_index: int) -> None:
        if self._finished_on_restore:
            raise RuntimeError(f"task {self.name} is finished on restore but received records")
        operator = self._operator
        assert operator is not None
        selector = self._selectors[input_index]
        keyed = self._keyed
        if keyed is not None and selector is not None:
            set_key = keyed.set_current_key
            if type(operator) is KeyedProcessOperator:
                # The common keyed case: call the user function directly (one frame less per record).
                element, ctx = operator.function.process_element, operator.ctx
                for record in batch:
                    set_key(selector(record))
                    element(record, ctx)
                return
            process = operator.process
            for record in batch:
                set_key(selector(record))
                process(record, input_index)
        else:
            process = operator.process
            for record in batch:
                process(record, input_index)

    # --- events --------------------------------------------------------------------------------------

    async def _on_watermark(self, channel: int, watermark: Watermark) -> None:
        self._watermarks[channel] = max(self._watermarks[channel], watermark.timestamp)
        assert self._gate is not None
        combined = min(w for i, w in enumerate(self._watermarks) if not self._gate.end_of_partition[i])
        if combined > self._watermark:
            self._watermark = combined
            if self._opened and self._operator is not None:
                self._operator.on_watermark(Watermark(combined))
            await self._output.broadcast(Watermark(combined))

    async def _on_end_of_data(self, channel: int) -> None:
        gate = self._gate
        assert gate is not None
        input_index = gate.inputs[channel]
        mine = gate.channels_of(input_index)
        if all(gate.end_of_data[c] is not None for c in mine):
            drained = all(gate.end_of_data[c].mode is StopMode.DRAIN for c in mine)  # type: ignore[union-attr]
            if drained and self._opened and self._operator is not None:
                await self._operator.end_input(input_index)
        if all(e is not None for e in gate.end_of_data):
            # The drain flag is the AND over every channel (rule C2).
            drain = all(e.mode is StopMode.DRAIN for e in gate.end_of_data if e is not None)
            await self._end_data(StopMode.DRAIN if drain else StopMode.NO_DRAIN)
        await self._maybe_complete_alignment()

    async def _end_data(self, mode: StopMode) -> None:
        """Rule C4: (drain) MAX_WATERMARK and finish(); then EndOfData downstream."""
        if self._end_of_data_sent:
            return
        if mode is StopMode.DRAIN:
            if self.spec.is_source:
                if self._opened and self._operator is not None:
                    self._operator.on_watermark(MAX_WATERMARK)
                await self._output.broadcast(MAX_WATERMARK)
            if self._opened and self._operator is not None:
                faults.point("task.finish", uid=self.id.uid, index=self.id.index)
                await self._operator.finish()
        self._operators_finished = True
        await self._output.broadcast(EndOfData(mode))
        self._end_of_data_sent = True
        self._transition(TaskState.FINISHING)
        if mode is StopMode.DRAIN:
            self._coordinator.report_end_of_data(self.id)

    async def _on_barrier(self, channel: int, barrier: Barrier) -> None:
        checkpoint_id = barrier.checkpoint_id
        if checkpoint_id <= self._last_checkpoint or checkpoint_id in self._aborted:
            return  # out of order or aborted previously (rule I6)
        if self._aligning is None or checkpoint_id > self._aligning:
            if self._aligning is not None:
                log.info("%s: barrier %d before alignment of %d completed; skipping %d",
                         self.name, checkpoint_id, self._aligning, self._aligning)  # fmt: skip
                self._cancel_alignment()
            self._aligning = checkpoint_id
            self._aligning_options = barrier.options
            self._aligned = set()
            self._alignment_started = time.perf_counter()
        assert self._gate is not None
        self._gate.blocked[channel] = True
        self._aligned.add(channel)
        await self._maybe_complete_alignment()

    def _cancel_alignment(self) -> None:
        self._aligning = None
        self._aligned = set()
        if self._gate is not None:
            self._gate.unblock_all()

    async def _maybe_complete_alignment(self) -> None:
        gate = self._gate
        if self._aligning is None or gate is None:
            return
        if all(c in self._aligned or not gate.live(c) for c in range(len(gate.receivers))):
            checkpoint_id, options = self._aligning, self._aligning_options
            alignment = time.perf_counter() - self._alignment_started
            self._cancel_alignment()
            await self._perform_checkpoint(checkpoint_id, options, alignment)

    # --- the mailbox ---------------------------------------------------------------------------------

    async def _process_mailbox(self) -> None:
        while self._mailbox:
            kind, checkpoint_id, options = self._mailbox.popleft()
            if kind == "trigger":
                assert options is not None
                await self._on_trigger(checkpoint_id, options)
            elif kind == "complete":
                await self._on_complete(checkpoint_id)
            else:
                await self._on_aborted(checkpoint_id)

    async def _on_trigger(self, checkpoint_id: int, options: CheckpointOptions) -> None:
        if checkpoint_id <= self._last_checkpoint or checkpoint_id in self._aborted:
            return
        if options.synchronous and not self._end_of_data_sent:
            # Rule G2: a source stops first, so the savepoint barrier follows its EndOfData.
            await self._end_data(StopMode.DRAIN if options.drain else StopMode.NO_DRAIN)
        if self._aligning is not None:
            self._cancel_alignment()
        # A non-source task is triggered only when all its inputs finished (rule B8): every
        # channel counts as aligned, so it checkpoints like a source.
        await self._perform_checkpoint(checkpoint_id, options)

    async def _on_complete(self, checkpoint_id: int) -> None:
        if checkpoint_id <= self._last_notified:
            return
        self._last_notified = checkpoint_id
        faults.point("notify.complete", uid=self.id.uid, index=self.id.index, checkpoint_id=checkpoint_id)
        if self._keyed is not None:
            self._keyed.notify_checkpoint_complete(checkpoint_id)  # confirms an incremental chain
        if self._opened and self._operator is not None:
            await self._operator.notify_checkpoint_complete(checkpoint_id)
        sync = self._sync_savepoint_id
        if (sync is not None and checkpoint_id == sync) or (
            sync is None and self._final_min_id is not None and checkpoint_id >= self._final_min_id
        ):
            self._final_done = True  # rule C5

    async def _on_aborted(self, checkpoint_id: int) -> None:
        self._aborted.add(checkpoint_id)
        if self._aligning == checkpoint_id:
            self._cancel_alignment()
        if checkpoint_id == self._sync_savepoint_id:
            raise StopWithSavepointError("Stop-with-savepoint failed.")  # rule G4: fail over
        if self._keyed is not None:
            self._keyed.notify_checkpoint_aborted(checkpoint_id)
        if self._opened and self._operator is not None:
            await self._operator.notify_checkpoint_aborted(checkpoint_id)

    # --- checkpoints ---------------------------------------------------------------------------------

    async def _perform_checkpoint(self, checkpoint_id: int, options: CheckpointOptions, alignment: float = 0.0) -> None:
        if checkpoint_id <= self._last_checkpoint:
            return
        started = time.perf_counter()
        self._last_checkpoint = checkpoint_id
        if self._end_of_data_sent and self._final_min_id is None:
            self._final_min_id = checkpoint_id
        if options.synchronous:
            self._sync_savepoint_id = checkpoint_id
        if self._finished_on_restore:
            await self._output.broadcast(Barrier(checkpoint_id, options))
            self._coordinator.acknowledge(self.id, checkpoint_id, SubtaskSnapshot(finished_on_restore=True))
            return
        operator = self._operator
        assert operator is not None
        await operator.prepare_snapshot_pre_barrier(checkpoint_id)
        await operator.snapshot_state(checkpoint_id)
        faults.point("snapshot.sync", uid=self.id.uid, index=self.id.index, checkpoint_id=checkpoint_id)
        # Savepoints are full and self-contained, and leave the incremental chain alone.
        snapshot_options = SnapshotOptions() if options.is_savepoint else self._snapshot_options
        keyed = None
        if self._keyed is not None:  # synchronous part: O(1)
            keyed = self._keyed.snapshot(checkpoint_id, snapshot_options)
        ops = self._operator_backend.snapshot()
        ack = SubtaskSnapshot(
            finished_operators=self._operators_finished,
            incremental=keyed is not None and snapshot_options.incremental,
            based_on=None if keyed is None else keyed.based_on,
            alignment_duration_ms=ms(alignment),
        )
        await self._output.broadcast(Barrier(checkpoint_id, options))
        ack = replace(ack, sync_duration_ms=ms(time.perf_counter() - started))
        part = asyncio.get_running_loop().create_task(
            self._async_part(checkpoint_id, keyed, ops, ack), name=f"{self.name}-snapshot-{checkpoint_id}"
        )
        self._async_parts.add(part)
        part.add_done_callback(self._async_parts.discard)

    async def _async_part(
        self, checkpoint_id: int, keyed: KeyedSnapshot | None, ops: OperatorSnapshot, ack: SubtaskSnapshot
    ) -> None:
        await write_and_acknowledge(self._coordinator, self.id, checkpoint_id, keyed, ops, ack)

    # --- finishing -----------------------------------------------------------------------------------

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while True:
            self._wakeup.clear()
            await self._process_mailbox()
            if done():
                return
            await self._wakeup.wait()

    async def _after_invoke(self) -> None:
        """Rule C6: wait for the final checkpoint (serving the mailbox), then close."""
        if self._end_of_data_sent and self._wait_final:
            await self._wait_until(lambda: self._output.all_end_of_data_consumed() and self._final_done)
        elif self._sync_savepoint_id is not None:
            await self._wait_until(lambda: self._final_done)
        self._accepting = False
        if self._async_parts:
            await asyncio.wait(self._async_parts)  # waitForPendingCheckpoints
        if self._opened and self._operator is not None:
            faults.point("task.close", uid=self.id.uid, index=self.id.index)  # raising: cleanup closes
            self._opened = False  # close() runs once, also if it raises (cleanup must not repeat it)
            await self._operator.close()
        await self._output.broadcast(END_OF_PARTITION)
