"""End to end: failover (rules E1, E5 of docs/flink-rules.md;
CheckpointAfterAllTasksFinishedITCase.testFailoverAfterSomeTasksFinished,
PartiallyFinishedSourcesITCase with failover, FinishedSourcesWatermarkITCase) and exactly-once under random failures.

A failure restarts the whole job from the latest completed checkpoint: operators that checkpoint
recorded as fully finished are deployed finished-on-restore, finished source subtasks read nothing
again, and the two-phase-commit sink commits every record exactly once.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import MAX_WATERMARK, JobGraph, JobStatus, submit
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import OperatorStatus
from tests.runtime.e2e_support import (
    BACKENDS,
    Completed,
    CountingSource,
    EventLog,
    FailAt,
    FailWhen,
    Flag,
    MixedSource,
    Recorder,
    RecordingFileSink,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    assert_prefixes,
    committed,
    expected_mixed,
    job_config,
    run,
    status_of,
    wait_for,
)

FULLY = OperatorStatus.FULLY_FINISHED
A_OPERATORS = ("a-source", "a-pass", "a-sink")


@pytest.mark.parametrize("backend", BACKENDS)
def test_failover_after_some_tasks_finished(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    readers = EventLog()
    armed, fired = Flag(), Flag()
    completed = Completed()
    job = JobGraph("failover-after-finish")
    a = job.source(CountingSource([25, 15], readers), uid="a-source", parallelism=2)
    a.transform(Recorder(log), uid="a-pass", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out-a"), log), uid="a-sink"
    )
    b = job.source(MixedSource([None], rates=[600.0], first_split=10), uid="b-source", parallelism=1)
    b.transform(FailWhen(armed, fired), uid="b-fail").key_by(lambda r: r[1] % 3).process(
        RunningCount(), uid="b-count", parallelism=2
    ).sink(RecordingFileSink(str(tmp_path / "out-b"), EventLog()), uid="b-sink")

    async def scenario() -> tuple[int, JobStatus, CompletedCheckpoint]:
        client = submit(job, job_config(tmp_path, interval=0.03, backend=backend))
        completed.watch(client)
        finished = await completed.until(lambda c: all(status_of(c, u) is FULLY for u in A_OPERATORS))
        armed.value = 1
        await _recovered(completed, fired)
        await client.stop_with_savepoint(drain=True)
        result = await client.wait()
        return result.attempts, result.status, finished

    attempts, status, finished = run(scenario())
    assert status is JobStatus.FINISHED
    assert fired.value == 1
    assert attempts == 2
    # Restored from a checkpoint where pipeline A was fully finished: A never ran again.
    assert not [e for e in log.events if e.attempt > 0]
    assert [e.index for e in readers.events] == [0, 1], "each A split was read once"
    after = [c for c in completed.checkpoints if c.checkpoint_id > finished.checkpoint_id]
    assert after
    assert all(status_of(c, u) is FULLY for c in after for u in A_OPERATORS)
    assert_exactly(committed(tmp_path / "out-a"), expected_mixed([25, 15]))
    output = committed(tmp_path / "out-b")
    assert assert_prefixes([r[:2] for r in output], [10])[10] > 0
    assert_counts_continue(output, lambda r: r[1] % 3)


async def _recovered(completed: Completed, fired: Flag) -> None:
    """Wait until the injected failure fired and the restarted job completed a checkpoint."""
    await wait_for(lambda: fired.value == 1, what="the injected failure")
    last = completed.checkpoints[-1].checkpoint_id
    await completed.until(lambda c: c.checkpoint_id > last + 1)


def test_failover_before_any_checkpoint_reruns_finished_branch(tmp_path: Path) -> None:
    # testFailoverAfterSomeTasksFinished without a checkpoint: A runs again; the 2PC sink still commits once.
    log = EventLog()
    job = JobGraph("failover-no-checkpoint")
    job.source(MixedSource([40]), uid="a-source").sink(RecordingFileSink(str(tmp_path / "out-a"), log), uid="a-sink")
    b = job.source(MixedSource([100], first_split=10), uid="b-source")
    b.transform(FailAt(50), uid="b-fail").sink(RecordingFileSink(str(tmp_path / "out-b"), EventLog()), uid="b-sink")

    async def scenario() -> tuple[int, JobStatus, int]:
        client = submit(job, job_config(tmp_path, interval=3600))
        result = await client.wait()
        return result.attempts, result.status, result.checkpoints

    attempts, status, checkpoints = run(scenario())
    assert status is JobStatus.FINISHED
    assert attempts == 2
    assert checkpoints == 1, "only the final checkpoint of the second attempt"
    assert {e.attempt for e in log.events if e.name == "open"} == {0, 1}, "A ran in both attempts"
    assert_exactly(committed(tmp_path / "out-a"), expected_mixed([40]))
    assert_exactly(committed(tmp_path / "out-b"), expected_mixed([100], first_split=10))


def test_failover_with_partially_finished_source(tmp_path: Path) -> None:
    # PartiallyFinishedSourcesITCase (single subtask finished, failover on): after the restart the
    # finished subtask restores its finished marker, reads nothing, and finishes at once.
    readers = EventLog()
    log = EventLog()
    armed, fired = Flag(), Flag()
    completed = Completed()
    job = JobGraph("partial-failover")
    source = job.source(CountingSource([20, None], readers, rates=[None, 600.0]), uid="source", parallelism=2)
    merged = source.transform(FailWhen(armed, fired), uid="fail", parallelism=2)
    merged.transform(Recorder(log), uid="merge", parallelism=1).sink(
        RecordingFileSink(str(tmp_path / "out"), EventLog()), uid="sink"
    )

    async def scenario() -> JobStatus:
        client = submit(job, job_config(tmp_path, interval=0.03))
        completed.watch(client)
        await completed.until(lambda c: status_of(c, "source") is OperatorStatus.PARTIALLY_FINISHED)
        armed.value = 1
        await _recovered(completed, fired)
        await client.stop_with_savepoint(drain=True)
        return (await client.wait()).status

    assert run(scenario()) is JobStatus.FINISHED
    assert fired.value == 1
    assert [e.name for e in readers.events].count("split-0") == 1, "the finished split was not read again"
    output = committed(tmp_path / "out")
    assert_exactly([r for r in output if r[0] == 0], expected_mixed([20]))
    assert assert_prefixes([r for r in output if r[0] == 1], [1])[1] > 0
    # FinishedSourcesWatermarkITCase: the restarted job still sees MAX_WATERMARK exactly once at the end,
    # although one of its source subtasks finished before the failover.
    watermarks = [e.arg for e in log.of("merge", attempt=1) if e.name == "watermark"]
    assert watermarks == [MAX_WATERMARK.timestamp]
    names = [e.name for e in log.of("merge", attempt=1)]
    assert names.index("watermark") < names.index("end_input") < names.index("finish")


class FailingSink(RecordingFileSink):
    """Raises ``RuntimeError`` in ``process`` when the job-wide count of sink records reaches ``at`` (once)."""

    def __init__(self, location: str, at: int, seen: Flag) -> None:
        super().__init__(location, EventLog())
        self.at = at
        self.seen = seen
        self.fired = Flag()

    def process(self, record: Any, input_index: int) -> None:
        self.seen.value += 1
        if not self.fired.value and self.seen.value == self.at:
            self.fired.value = 1
            raise RuntimeError(f"injected sink failure at record {self.at}")
        super().process(record, input_index)


BOUNDED = [90, 60]
SLOW = [80]
TOTAL = sum(BOUNDED) + sum(SLOW)


@pytest.mark.parametrize("seed", range(20))
def test_exactly_once_under_random_failures(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    upstream_at = rng.randrange(1, TOTAL)
    sink_at = rng.randrange(1, 2 * TOTAL)
    interval = rng.choice([0.02, 0.03, 0.05])
    backend = rng.choice(["lmdb", "heap"])
    where = f"seed={seed} upstream_at={upstream_at} sink_at={sink_at} interval={interval} backend={backend}"
    out = tmp_path / "out"
    job = JobGraph("random-failures")
    fast = job.source(MixedSource(BOUNDED), uid="fast", parallelism=2)
    slow = job.source(MixedSource(SLOW, rates=[rng.choice([400.0, 800.0])], first_split=10), uid="slow")
    both = job.operator(FailAt(upstream_at), uid="fail", inputs=[fast.rebalance(), slow.rebalance()], parallelism=2)
    counted = both.key_by(lambda r: r[0] * 100 + r[1] % 4).process(RunningCount(), uid="count", parallelism=2)
    counted.sink(FailingSink(str(out), sink_at, Flag()), uid="sink", parallelism=1)

    result = run(submit_and_wait(job, tmp_path, interval, backend))
    assert result[0] is JobStatus.FINISHED, f"{where}: {result[1]}"
    output = committed(out)
    try:
        assert_exactly([r[:2] for r in output], expected_mixed(BOUNDED) + expected_mixed(SLOW, first_split=10))
        assert_counts_continue(output, lambda r: r[0] * 100 + r[1] % 4)
        # Staged leftovers are possible and harmless: a transaction pre-committed for a checkpoint that
        # never completed, when the job then restarts from scratch (see the report in the sinks module).
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


async def submit_and_wait(job: JobGraph, tmp_path: Path, interval: float, backend: str) -> tuple[JobStatus, Any]:
    client = submit(job, job_config(tmp_path, interval=interval, backend=backend, restarts=4))
    result = await client.wait()
    return result.status, result.error
