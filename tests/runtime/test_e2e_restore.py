"""End to end: restoring checkpoints taken after some tasks finished (rules E5-E7 of docs/flink-rules.md;
CheckpointAfterAllTasksFinishedITCase.testRestoreAfterSomeTasksFinished).

A fully finished operator is deployed finished-on-restore (its code never runs again) and stays fully
finished in later checkpoints; the restore rules reject a new operator in front of it; a partially
finished keyed operator restores at a new parallelism from the state of its running subtasks only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import (
    IncompatibleRestoreError,
    JobGraph,
    JobStatus,
    submit,
)
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import OperatorStatus
from tests.runtime.e2e_support import (
    BACKENDS,
    Completed,
    CountingSource,
    EventLog,
    KeyedCounter,
    MixedSource,
    Recorder,
    RecordingFileSink,
    assert_exactly,
    committed,
    expected_mixed,
    job_config,
    run,
    staged,
    status_of,
    wait_for,
)

FULLY = OperatorStatus.FULLY_FINISHED
PARTIAL = OperatorStatus.PARTIALLY_FINISHED
A_LENGTHS = [30, 20]
B_LENGTHS = [1000]
A_OPERATORS = ("a-source", "a-pass", "a-sink")


class PassThrough(Recorder):
    """A recording pass-through operator with a class-level count of instances that were set up."""

    instances = 0

    def setup(self, ctx: Any) -> None:
        type(self).instances += 1
        super().setup(ctx)


def _two_pipelines(
    tmp_path: Path, log: EventLog, readers: EventLog, *, extra_before_pass: bool = False, b_rate: float | None = 300.0
) -> JobGraph:
    """Pipeline A (bounded, quick) and pipeline B (bounded, paced at ``b_rate`` so the first run stops
    it part way; the rate is not state, so a restored run may go faster)."""
    job = JobGraph("two-pipelines")
    a = job.source(CountingSource(A_LENGTHS, readers), uid="a-source", parallelism=2)
    if extra_before_pass:
        a = a.map(lambda r: r, uid="a-new", parallelism=2)
    a.transform(PassThrough(log), uid="a-pass", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out-a"), log), uid="a-sink", parallelism=1
    )
    b = job.source(MixedSource(B_LENGTHS, rates=[b_rate], first_split=10), uid="b-source", parallelism=1)
    b.key_by(lambda r: r[1] % 4).process(Recorder(log), uid="b-keyed", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out-b"), log), uid="b-sink", parallelism=1
    )
    return job


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_after_some_tasks_finished(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    readers = EventLog()
    completed = Completed()

    async def first_run() -> CompletedCheckpoint:
        client = submit(_two_pipelines(tmp_path, log, readers), job_config(tmp_path, interval=0.03, backend=backend))
        completed.watch(client)
        await completed.until(lambda c: all(status_of(c, uid) is FULLY for uid in A_OPERATORS))
        # Pipeline A finished, B still runs: stop without drain (the savepoint can be resumed).
        savepoint = await client.stop_with_savepoint(drain=False)
        assert (await client.wait()).status is JobStatus.FINISHED
        return savepoint

    savepoint = run(first_run())
    assert all(status_of(savepoint, uid) is FULLY for uid in A_OPERATORS)
    assert all(status_of(savepoint, uid) is OperatorStatus.RUNNING for uid in ("b-source", "b-keyed", "b-sink"))
    b_first = committed(tmp_path / "out-b")
    assert 0 < len(b_first) < sum(B_LENGTHS)
    setups_before, readers_before = PassThrough.instances, len(readers.events)

    second = EventLog()
    restored = Completed()

    async def second_run() -> JobStatus:
        job = _two_pipelines(tmp_path, second, readers, b_rate=None)
        client = submit(job, job_config(tmp_path, interval=0.03, backend=backend), restore_from=savepoint.location)
        restored.watch(client)
        return (await client.wait()).status

    assert run(second_run()) is JobStatus.FINISHED
    # The finished operators are deployed finished-on-restore: none of their code ran.
    assert PassThrough.instances == setups_before
    assert len(readers.events) == readers_before
    assert not [e for e in second.events if e.uid in A_OPERATORS]
    # The other pipeline completed; every checkpoint of the restored job still lists A as fully finished.
    assert restored.checkpoints
    for checkpoint in restored.checkpoints:
        assert all(status_of(checkpoint, uid) is FULLY for uid in A_OPERATORS), checkpoint
        assert checkpoint.checkpoint_id > savepoint.checkpoint_id
    assert_exactly(committed(tmp_path / "out-a"), expected_mixed(A_LENGTHS))
    assert_exactly(committed(tmp_path / "out-b"), expected_mixed(B_LENGTHS, first_split=10))
    assert staged(tmp_path / "out-a") == []
    assert staged(tmp_path / "out-b") == []

    # A new operator in front of a fully finished one is refused, naming the rule (rules E7, V3).
    async def bad_restore() -> None:
        job = _two_pipelines(tmp_path, EventLog(), EventLog(), extra_before_pass=True)
        submit(job, job_config(tmp_path), restore_from=savepoint.location)

    with pytest.raises(IncompatibleRestoreError) as refused:
        run(bad_restore())
    violations = refused.value.report.violations
    assert [(v.rule, v.operator, v.predecessor) for v in violations] == [("finished-predecessor", "a-pass", "a-new")]
    assert "finished-predecessor" in str(refused.value)


def _partial_keyed_job(log: EventLog, parallelism: int) -> JobGraph:
    job = JobGraph("partial-keyed")
    keyed_input = job.source(MixedSource([60, 60]), uid="bounded", parallelism=2)
    # Split 0 ends after 30 records, split 1 never: pointwise, keeper[0] finishes and keeper[1] runs.
    keeper = job.source(MixedSource([30, None], first_split=10), uid="keeper", parallelism=2)
    job.operator(
        KeyedCounter(log),
        uid="counter",
        inputs=[keyed_input.key_by(lambda r: r[1] % 10), keeper.rescale()],
        parallelism=parallelism,
    )
    return job


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescale_partially_finished_keyed_operator(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    completed = Completed()
    config = job_config(tmp_path, interval=0.03, backend=backend, num_retained=20)

    def partial(c: CompletedCheckpoint) -> bool:
        return status_of(c, "counter") is PARTIAL and status_of(c, "bounded") is FULLY

    async def first_run() -> CompletedCheckpoint:
        client = submit(_partial_keyed_job(log, 2), config)
        completed.watch(client)
        checkpoint = await completed.until(partial)
        await client.cancel()
        return checkpoint

    checkpoint = run(first_run())
    counter = checkpoint.metadata.operator("counter")
    assert counter is not None
    assert counter.finished_subtasks == [0]
    assert counter.has_keyed_state
    assert status_of(checkpoint, "keeper") is PARTIAL
    per_subtask = {i: Counter(e.arg for e in log.of("counter", i) if e.name == "counted") for i in range(2)}
    assert per_subtask[0], "both subtasks must have owned keys for the test to mean anything"
    assert per_subtask[1], "both subtasks must have owned keys for the test to mean anything"
    assert set(per_subtask[0]).isdisjoint(per_subtask[1])

    second = EventLog()

    async def second_run() -> None:
        client = submit(_partial_keyed_job(second, 3), config, restore_from=checkpoint.location)
        await wait_for(lambda: {e.index for e in second.events if e.name == "open"} == {0, 1, 2})
        await client.cancel()

    run(second_run())
    restored = [e for e in second.events if e.name == "restored"]
    keys = [e.arg[0] for e in restored]
    assert len(keys) == len(set(keys)), f"a key was restored into two subtasks: {sorted(keys)}"
    # Only the running subtask's state survives (rule E6); the finished subtask's keys start empty.
    assert dict(e.arg for e in restored) == dict(per_subtask[1])
    assert {e.index for e in restored} <= {0, 1, 2}
