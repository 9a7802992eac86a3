"""End to end: the operator lifecycle order of rules J1/J2 (docs/flink-rules.md) on a real job, also on failure
and cancel.

Ported from StopWithSavepointITCase / BoundedSourceITCase's FinishingValidator: per subtask, last record
-> MAX_WATERMARK -> end_input -> finish -> snapshot_state (final checkpoint) -> notify_checkpoint_complete
for it -> close; nothing but checkpoints after finish; a downstream operator finishes after its upstreams.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keystate.runtime import MAX_WATERMARK, JobGraph, JobStatus, SequenceSource, run_job, submit
from tests.runtime.e2e_support import (
    BACKENDS,
    EventLog,
    FailAt,
    Flag,
    Recorder,
    RecordingFileSink,
    assert_exactly,
    committed,
    job_config,
    run,
    staged,
    wait_for,
)

COUNT = 200
CHECKPOINT_EVENTS = {"snapshot_state", "notify_checkpoint_complete", "notify_checkpoint_aborted"}


def _lifecycle_job(out: Path, log: EventLog) -> JobGraph:
    job = JobGraph("lifecycle")
    numbers = job.source(SequenceSource(COUNT, splits=4), uid="numbers", parallelism=2)
    mapped = numbers.transform(Recorder(log), uid="map", parallelism=2)
    keyed = mapped.key_by(lambda n: n % 7).process(Recorder(log), uid="keyed", parallelism=2)
    keyed.sink(RecordingFileSink(str(out), log), uid="sink", parallelism=1)
    return job


def _assert_j2_order(log: EventLog, uid: str, index: int) -> None:
    names = log.names(uid, index)
    events = log.of(uid, index)
    where = f"{uid}[{index}]: {names}"
    assert names[:2] == ["initialize_state", "open"], where
    assert names.count("close") == 1, where
    assert names[-1] == "close", where
    for once in ("end_input", "finish"):
        assert names.count(once) == 1, where
    watermarks = [e.arg for e in events if e.name == "watermark"]
    assert watermarks == [MAX_WATERMARK.timestamp], where
    last_record = max((i for i, n in enumerate(names) if n == "process"), default=1)
    wm, end, fin = names.index("watermark"), names.index("end_input"), names.index("finish")
    assert last_record < wm < end < fin, where
    after_finish = names[fin + 1 : -1]
    assert set(after_finish) <= CHECKPOINT_EVENTS, f"only checkpoint events may follow finish(): {where}"
    final = next(e.arg for e in events[fin + 1 :] if e.name == "snapshot_state")
    notified = [e.arg for e in events[fin + 1 :] if e.name == "notify_checkpoint_complete"]
    assert notified, f"no checkpoint completed after finish(): {where}"
    assert notified[-1] >= final, where
    snapshot_pos = names.index("snapshot_state", fin)
    # The first notification of the final checkpoint (an older one may still notify late: asynchronous).
    complete_pos = next(
        i for i, e in enumerate(events) if i > fin and e.name == "notify_checkpoint_complete" and e.arg >= final
    )
    assert snapshot_pos < complete_pos < len(names) - 1, where


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounded_job_follows_flink_lifecycle_order(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    out = tmp_path / "out"
    job = _lifecycle_job(out, log)
    # A long interval: the only checkpoint is the immediate final one (rule C7).
    result = run(run_job(job, job_config(tmp_path, interval=3600, backend=backend)))
    assert result.status is JobStatus.FINISHED, result.error
    for uid, parallelism in (("map", 2), ("keyed", 2), ("sink", 1)):
        for index in range(parallelism):
            _assert_j2_order(log, uid, index)
    # Every record was processed exactly once by each layer, and committed exactly once.
    for uid in ("map", "keyed", "sink"):
        processed = [e.arg for e in log.of(uid) if e.name == "process"]
        assert sorted(processed) == list(range(COUNT)), uid
    assert_exactly(committed(out), list(range(COUNT)))
    assert staged(out) == []
    # A downstream operator finishes only after all its upstream subtasks finished (hash edge: all).
    for k in range(2):
        keyed_finish = log.position("keyed", k, "finish")
        assert all(log.position("map", m, "finish") < keyed_finish for m in range(2))
        assert keyed_finish < log.position("sink", 0, "finish")
    # One final checkpoint serves every task: they all snapshot the same id after finish().
    finals = {
        next(e.arg for e in log.of(uid, i)[log.names(uid, i).index("finish") :] if e.name == "snapshot_state")
        for uid, p in (("map", 2), ("keyed", 2), ("sink", 1))
        for i in range(p)
    }
    assert len(finals) == 1, finals
    assert result.checkpoints == 1


def test_close_runs_on_failure_and_no_finish(tmp_path: Path) -> None:
    log = EventLog()
    out = tmp_path / "out"
    job = JobGraph("fails")
    numbers = job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2)
    failing = numbers.transform(FailAt(COUNT // 2), uid="fail", parallelism=2)
    recorded = failing.transform(Recorder(log), uid="rec", parallelism=2)
    recorded.sink(RecordingFileSink(str(out), log), uid="sink", parallelism=1)
    result = run(run_job(job, job_config(tmp_path, interval=0.02, restarts=0)))
    assert result.status is JobStatus.FAILED
    assert "injected failure" in repr(result.error.__cause__ if result.error else None)
    for uid, parallelism in (("rec", 2), ("sink", 1)):
        for index in range(parallelism):
            names = log.names(uid, index)
            assert names[:2] == ["initialize_state", "open"], names
            assert names[-1] == "close", f"{uid}[{index}]: {names}"
            assert names.count("close") == 1, f"{uid}[{index}]: {names}"
            assert "finish" not in names, f"{uid}[{index}]: {names}"
            assert "end_input" not in names, f"{uid}[{index}]: {names}"
    output = committed(out)
    assert len(output) == len(set(output))
    assert set(output) <= set(range(COUNT))
    assert len(output) < COUNT


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_runs_on_cancel(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    job = JobGraph("cancel")
    numbers = job.source(SequenceSource(None, splits=2, rate=500), uid="numbers", parallelism=2)
    numbers.key_by(lambda n: n % 5).process(Recorder(log, forward=False), uid="rec", parallelism=2)

    async def scenario() -> JobStatus:
        client = submit(job, job_config(tmp_path, interval=0.02, backend=backend))
        await wait_for(lambda: sum(e.name == "process" for e in log.events) > 20, what="records flowing")
        await wait_for(lambda: any(e.name == "notify_checkpoint_complete" for e in log.events), what="a checkpoint")
        return (await client.cancel()).status

    assert run(scenario()) is JobStatus.CANCELED
    for index in range(2):
        names = log.names("rec", index)
        assert names[-1] == "close", names
        assert names.count("close") == 1, names
        assert not {"finish", "end_input", "watermark"} & set(names), names


def test_failover_closes_attempt_before_next_one_opens(tmp_path: Path) -> None:
    log = EventLog()
    out = tmp_path / "out"
    fired = Flag()
    job = JobGraph("failover-lifecycle")
    numbers = job.source(SequenceSource(COUNT, splits=2, rate=2000), uid="numbers", parallelism=2)
    failing = numbers.transform(FailAt(COUNT // 2, fired=fired), uid="fail", parallelism=2)
    failing.transform(Recorder(log), uid="rec", parallelism=1).sink(RecordingFileSink(str(out), log), uid="sink")
    result = run(run_job(job, job_config(tmp_path, interval=0.02)))
    assert result.status is JobStatus.FINISHED, result.error
    assert result.attempts == 2
    assert fired.value == 1
    for uid in ("rec", "sink"):
        first, second = log.names(uid, 0, attempt=0), log.names(uid, 0, attempt=1)
        assert first[-1] == "close", first
        assert "finish" not in first, first
        assert second[-1] == "close", second
        assert "finish" in second, second
        assert log.position(uid, 0, "close") < next(i for i, e in enumerate(log.events) if e.attempt == 1)
        _assert_order_of_attempt(log, uid)
    assert_exactly(committed(out), list(range(COUNT)))


def _assert_order_of_attempt(log: EventLog, uid: str) -> None:
    names = log.names(uid, 0, attempt=1)
    fin = names.index("finish")
    assert "process" not in names[fin:], names


class CloseFailsOnce(Recorder):
    """A recorder whose first close() raises."""

    def __init__(self, log: EventLog, failed: Flag) -> None:
        super().__init__(log)
        self.failed = failed

    async def close(self) -> None:
        await super().close()
        if not self.failed.value:
            self.failed.value = 1
            raise RuntimeError("injected failure in close()")


def test_close_runs_once_even_when_it_raises(tmp_path: Path) -> None:
    log = EventLog()
    out = tmp_path / "out"
    failed = Flag()
    job = JobGraph("close-fails")
    numbers = job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2)
    numbers.transform(CloseFailsOnce(log, failed), uid="rec", parallelism=1).sink(
        RecordingFileSink(str(out), EventLog()), uid="sink"
    )
    result = run(run_job(job, job_config(tmp_path, interval=3600)))
    assert failed.value == 1
    assert result.status is JobStatus.FINISHED, result.error
    assert result.attempts == 2, "a failing close() fails the task: the job restarts from the final checkpoint"
    assert log.names("rec", 0, attempt=0).count("close") == 1
    assert log.names("rec", 0, attempt=1).count("close") == 1
    assert_exactly(committed(out), list(range(COUNT)))
