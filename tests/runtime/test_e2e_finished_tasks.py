"""End to end: checkpoints after some tasks finished (rules B, D3-D4 of docs/flink-rules.md;
PartiallyFinishedSourcesITCase).

Once a bounded branch finished, checkpoints keep completing and record its operators ``fully_finished``;
subtasks that finished while their siblings run get finished markers; with the feature switched off,
checkpoints fail once a task finished; union list state declines checkpoints (uncounted) until every
subtask of the operator reached its end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import (
    CheckpointFailedError,
    CheckpointFailureReason,
    JobGraph,
    JobStatus,
    Operator,
    SequenceSource,
    StopWithSavepointError,
    TransactionalFileSink,
    load_checkpoint,
    submit,
)
from keystate.statebackend.serializers import IntSerializer
from keystate.statebackend.state import ListStateDescriptor
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import OperatorStatus
from tests.runtime.e2e_support import (
    BACKENDS,
    Completed,
    MixedSource,
    Tally,
    assert_exactly,
    assert_prefixes,
    committed,
    expected_mixed,
    job_config,
    run,
    staged,
    status_of,
    wait_for,
)

BOUNDED = [150, 100]
RUNNING = OperatorStatus.RUNNING
FULLY = OperatorStatus.FULLY_FINISHED
PARTIAL = OperatorStatus.PARTIALLY_FINISHED


def _bounded_and_unbounded(out: Path) -> JobGraph:
    """The demo job's shape (docs/architecture.md#the-demo-job): bounded and unbounded sources, keyed operators,
    one shared 2PC sink."""
    job = JobGraph("mixed")
    bounded = job.source(MixedSource(BOUNDED), uid="bounded", parallelism=2)
    unbounded = job.source(MixedSource([None, None], first_split=10, rates=[300, 300]), uid="unbounded", parallelism=2)
    b_tally = bounded.key_by(lambda r: r[1] % 7).process(Tally(), uid="bounded-tally", parallelism=2)
    u_tally = unbounded.key_by(lambda r: r[1] % 7).process(Tally(), uid="unbounded-tally", parallelism=2)
    job.operator(
        TransactionalFileSink(str(out)), uid="sink", inputs=[b_tally.rebalance(), u_tally.rebalance()], parallelism=1
    )
    return job


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_continue_after_bounded_branch_finished(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "out"
    completed = Completed()

    def branch_done(c: CompletedCheckpoint) -> bool:
        return status_of(c, "bounded") is FULLY and status_of(c, "bounded-tally") is FULLY

    async def scenario() -> tuple[CompletedCheckpoint, CompletedCheckpoint, JobStatus]:
        config = job_config(tmp_path, interval=0.03, backend=backend, num_retained=50)
        client = submit(_bounded_and_unbounded(out), config)
        completed.watch(client)
        first = await completed.until(branch_done)
        later = await completed.until(lambda c: c.checkpoint_id > first.checkpoint_id + 1)
        await client.stop_with_savepoint(drain=True)
        return first, later, (await client.wait()).status

    first, later, status = run(scenario())
    assert status is JobStatus.FINISHED
    for checkpoint in (first, later, load_checkpoint(later.location)):
        assert status_of(checkpoint, "bounded") is FULLY
        assert status_of(checkpoint, "bounded-tally") is FULLY
        for uid in ("unbounded", "unbounded-tally", "sink"):
            assert status_of(checkpoint, uid) is RUNNING, uid
        finished = checkpoint.metadata.operator("bounded-tally")
        assert finished is not None
        assert finished.subtasks == ()
        assert not finished.has_state
        running = checkpoint.metadata.operator("unbounded-tally")
        assert running is not None
        assert running.has_keyed_state
    # Nothing lost or duplicated: the bounded branch whole, the unbounded one up to the drained stop.
    output = committed(out)
    assert_exactly([r for r in output if r[0] < 10], expected_mixed(BOUNDED))
    lengths = assert_prefixes([r for r in output if r[0] >= 10], [10, 11])
    assert all(n > 0 for n in lengths.values())
    assert staged(out) == []


def _partial_job(out: Path) -> JobGraph:
    # Parallelism 3 over 2 splits: subtask 2 has nothing to read and finishes at once.
    job = JobGraph("partial")
    numbers = job.source(SequenceSource(None, splits=2, rate=300), uid="numbers", parallelism=3)
    mapped = numbers.map(lambda n: n, uid="map", parallelism=3)  # forward: map[2] finishes as well
    mapped.sink(TransactionalFileSink(str(out)), uid="sink", parallelism=1)
    return job


def test_partially_finished_source_gets_finished_markers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = Completed()

    def partial(c: CompletedCheckpoint) -> bool:
        return status_of(c, "numbers") is PARTIAL and status_of(c, "map") is PARTIAL

    async def scenario() -> tuple[CompletedCheckpoint, JobStatus]:
        client = submit(_partial_job(out), job_config(tmp_path, interval=0.03))
        completed.watch(client)
        checkpoint = await completed.until(partial)
        await completed.until(lambda c: c.checkpoint_id > checkpoint.checkpoint_id)
        await client.stop_with_savepoint(drain=True)
        return checkpoint, (await client.wait()).status

    checkpoint, status = run(scenario())
    assert status is JobStatus.FINISHED
    for uid in ("numbers", "map"):
        op = checkpoint.metadata.operator(uid)
        assert op is not None, uid
        assert op.finished_subtasks == [2], uid
        marker = op.subtask(2)
        assert marker is not None
        assert marker.finished
        assert not list(marker.handles())
    numbers_op = checkpoint.metadata.operator("numbers")
    assert numbers_op is not None
    assert {s.index for s in numbers_op.subtasks if not s.finished} == {0, 1}
    assert status_of(checkpoint, "sink") is RUNNING
    # No checkpoint ever failed because a task had finished.
    assert not [f for f in completed.failures if f[1] is CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING]
    output = committed(out)
    assert_prefixes([[n % 2, n // 2] for n in output], [0, 1])


def test_feature_off_fails_checkpoints_once_a_task_finished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # testCheckpointAbortsIfTriggerTasksAreFinished, end to end: with checkpoints_after_tasks_finish off,
    # the finished subtask does not wait, and every later checkpoint (and stop-with-savepoint) is refused
    # with NOT_ALL_REQUIRED_TASKS_RUNNING, which is not counted: the job keeps running.
    caplog.set_level(logging.INFO, logger="keystate.runtime.coordinator")
    out = tmp_path / "out"
    refusal = "Some tasks of the job have already finished and checkpointing with finished tasks is not enabled."

    def refused() -> int:
        return sum(refusal in r.getMessage() for r in caplog.records)

    refusals_at_completion: list[int] = []

    async def scenario() -> tuple[BaseException | None, JobStatus]:
        client = submit(_partial_job(out), job_config(tmp_path, interval=0.02, checkpoints_after_tasks_finish=False))
        client.coordinator.listeners.append(lambda c: refusals_at_completion.append(refused()))
        await wait_for(lambda: refused() >= 3, what="three refused checkpoints")
        with pytest.raises(StopWithSavepointError) as stop:
            await client.stop_with_savepoint(drain=True)
        assert client.status is JobStatus.RUNNING
        return stop.value.__cause__, (await client.cancel()).status

    cause, status = run(scenario())
    assert status is JobStatus.CANCELED, "uncounted failures must not fail the job"
    assert isinstance(cause, CheckpointFailedError)
    assert cause.reason is CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING
    assert refusal in str(cause)
    # Subtask 2 finishes at once; no checkpoint completes after the first refusal.
    assert all(n == 0 for n in refusals_at_completion), refusals_at_completion


_UNION = ListStateDescriptor[int](name="seen", serializer=IntSerializer())


class UnionCounter(Operator):
    """Keeps its record count in union list state (like the legacy Kafka consumer's offsets)."""

    def __init__(self) -> None:
        self.seen = 0

    async def initialize_state(self) -> None:
        self.state = self.ctx.get_union_list_state(_UNION)

    def process(self, record: Any, input_index: int) -> None:
        self.seen += 1
        self.ctx.emit(record)

    async def snapshot_state(self, checkpoint_id: int) -> None:
        self.state.update([self.seen])


def test_union_list_state_declines_checkpoints_until_all_subtasks_finish(tmp_path: Path) -> None:
    # Rule D3.3 (union list state) / E4: subtask 0 ends its data long before subtask 1; checkpoints are
    # declined with CHECKPOINT_DECLINED_TASK_CLOSING (not counted: tolerance 0 survives) until both did.
    out = tmp_path / "out"
    completed = Completed()
    lengths = [20, 120]
    job = JobGraph("union")
    source = job.source(MixedSource(lengths, rates=[None, 400]), uid="source", parallelism=2)
    union = source.transform(UnionCounter(), uid="union", parallelism=2)
    union.sink(TransactionalFileSink(str(out)), uid="sink", parallelism=1)

    async def scenario() -> JobStatus:
        client = submit(job, job_config(tmp_path, interval=0.02, tolerable_failed_checkpoints=0))
        completed.watch(client)
        return (await client.wait()).status

    assert run(scenario()) is JobStatus.FINISHED
    declined = [f for f in completed.failures if f[1] is CheckpointFailureReason.CHECKPOINT_DECLINED_TASK_CLOSING]
    assert declined, f"no checkpoint was declined: {completed.failures}"
    assert all("UnionListState" in message for _, _, message in declined)
    assert not [f for f in completed.failures if f[1].counted]
    final = next(c for c in completed.checkpoints if c.checkpoint_id > declined[-1][0])
    assert status_of(final, "union") is RUNNING  # both subtasks report state in the one shared final checkpoint
    union_op = final.metadata.operator("union")
    assert union_op is not None
    assert union_op.uses_union_state()
    assert union_op.finished_subtasks == []
    assert all(c.checkpoint_id < declined[0][0] or c.checkpoint_id > declined[-1][0] for c in completed.checkpoints)
    assert_exactly(committed(out), expected_mixed(lengths))
