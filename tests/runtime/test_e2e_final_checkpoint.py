"""End to end: the final checkpoint (rules C5-C7, H3-H4 of docs/flink-rules.md;
CheckpointAfterAllTasksFinishedITCase).

A bounded job finishes promptly even with a huge checkpoint interval because the coordinator checkpoints
at once when every task reached end of data; that one checkpoint commits the output of every
two-phase-commit operator of a chain; any checkpoint taken after end of data serves as the final one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, JobStatus, SequenceSource, run_job
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import StorageError
from keystate.storage.format.metadata import CheckpointMetadata
from tests.runtime.e2e_support import (
    BACKENDS,
    EventLog,
    Recorder,
    RecordingFileSink,
    assert_exactly,
    committed,
    job_config,
    run,
    staged,
)

COUNT = 300


class CommittingMap(RecordingFileSink):
    """A two-phase-commit operator in the middle of a chain: it stages records and also forwards them."""

    def process(self, record: Any, input_index: int) -> None:
        super().process(record, input_index)
        self.ctx.emit(record)


def _finals(log: EventLog, uid: str, index: int = 0) -> tuple[int, list[int]]:
    """The first checkpoint ``uid[index]`` snapshot after finish(), and the ids it was notified of after."""
    events = log.of(uid, index)
    fin = [e.name for e in events].index("finish")
    snapshots = [e.arg for e in events[fin:] if e.name == "snapshot_state"]
    notified = [e.arg for e in events[fin:] if e.name == "notify_checkpoint_complete"]
    return snapshots[0], notified


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_interval_finishes_promptly_with_immediate_final_checkpoint(tmp_path: Path, backend: str) -> None:
    # testImmediateCheckpointing: two independent bounded pipelines, interval "forever".
    job = JobGraph("immediate")
    for name in ("a", "b"):
        numbers = job.source(SequenceSource(COUNT, splits=3), uid=f"{name}-source", parallelism=3)
        counted = numbers.key_by(lambda n: n % 10).process(Recorder(EventLog()), uid=f"{name}-keyed", parallelism=2)
        counted.sink(RecordingFileSink(str(tmp_path / name), EventLog()), uid=f"{name}-sink", parallelism=1)
    started = time.monotonic()
    result = run(run_job(job, job_config(tmp_path, interval=3600, backend=backend)))
    assert result.status is JobStatus.FINISHED, result.error
    assert time.monotonic() - started < 10
    assert result.checkpoints == 1, "exactly the immediate final checkpoint"
    for name in ("a", "b"):
        assert_exactly(committed(tmp_path / name), list(range(COUNT)))
        assert staged(tmp_path / name) == []


def test_checkpointing_disabled_finishes_without_waiting_and_sink_commits(tmp_path: Path) -> None:
    # testNotWaitingForAllRecordsProcessedIfCheckpointNotEnabled. Without checkpoints, the 2PC sink
    # commits its last transaction in finish() (Flink's committer at end of input, rule H4).
    log = EventLog()
    out = tmp_path / "out"
    job = JobGraph("no-checkpoints")
    numbers = job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2)
    numbers.sink(RecordingFileSink(str(out), log), uid="sink", parallelism=1)
    result = run(run_job(job, job_config(tmp_path, interval=None)))
    assert result.status is JobStatus.FINISHED, result.error
    assert result.checkpoints == 0
    names = log.names("sink", 0)
    assert "snapshot_state" not in names
    assert "notify_checkpoint_complete" not in names
    assert names[-2:] == ["finish", "close"]
    assert_exactly(committed(out), list(range(COUNT)))
    assert staged(out) == []
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("_metadata"))


@pytest.mark.parametrize("interval", [3600.0, 0.03])
def test_chain_of_committing_operators_waits_for_one_final_checkpoint(tmp_path: Path, interval: float) -> None:
    # Section 4: all tasks wait concurrently, so k=3 committing operators cost one final checkpoint, not 3.
    log = EventLog()
    job = JobGraph("chain")
    stream = job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2)
    for k in range(3):
        stream = stream.transform(CommittingMap(str(tmp_path / f"out-{k}"), log), uid=f"commit-{k}", parallelism=1)
    result = run(run_job(job, job_config(tmp_path, interval=interval)))
    assert result.status is JobStatus.FINISHED, result.error
    finals = {_finals(log, f"commit-{k}")[0] for k in range(3)}
    assert len(finals) == 1, f"the committing operators used different final checkpoints: {finals}"
    (final,) = finals
    for k in range(3):
        notified = [n for n in _finals(log, f"commit-{k}")[1] if n >= final]
        assert notified == [final], f"commit-{k} waited for more than one checkpoint after finish(): {notified}"
        assert_exactly(committed(tmp_path / f"out-{k}"), list(range(COUNT)))
        assert staged(tmp_path / f"out-{k}") == []
    if interval > 60:
        assert result.checkpoints == 1


def test_any_checkpoint_after_end_of_data_counts_as_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # C5 / testWaitingForFinalCheckpointNotTheFirsNotifiedComplete: the first checkpoint after
    # finish() fails; a later one completes, and the tasks finish on it.
    log = EventLog()
    out = tmp_path / "out"
    failed: list[int] = []
    real_commit = CheckpointWriter.commit

    def flaky_commit(self: CheckpointWriter, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        after_finish = list(log.of("sink", 0)[log.names("sink", 0).index("finish") :]) if _finished(log) else []
        if not failed and any(e.name == "snapshot_state" and e.arg == metadata.checkpoint_id for e in after_finish):
            failed.append(metadata.checkpoint_id)
            raise StorageError(f"injected: cannot write _metadata of checkpoint {metadata.checkpoint_id}")
        return real_commit(self, metadata)

    monkeypatch.setattr(CheckpointWriter, "commit", flaky_commit)
    job = JobGraph("final-fails")
    numbers = job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2)
    numbers.transform(Recorder(log), uid="map", parallelism=2).sink(RecordingFileSink(str(out), log), uid="sink")
    config = job_config(tmp_path, interval=0.05, tolerable_failed_checkpoints=1)
    result = run(run_job(job, config))
    assert result.status is JobStatus.FINISHED, result.error
    assert len(failed) == 1
    for uid, index in (("map", 0), ("map", 1), ("sink", 0)):
        first_final, notified = _finals(log, uid, index)
        assert first_final <= failed[0], f"{uid}[{index}]"
        names = log.names(uid, index)
        assert "notify_checkpoint_aborted" in names, f"{uid}[{index}]: {names}"
        assert notified, f"{uid}[{index}] finished without a later checkpoint: {names}"
        assert notified[-1] > failed[0], f"{uid}[{index}] finished without a later checkpoint: {names}"
    assert_exactly(committed(out), list(range(COUNT)))
    assert staged(out) == []


@pytest.mark.parametrize("interval", [3600.0])
def test_failed_final_checkpoint_is_retried_with_huge_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interval: float
) -> None:
    # The immediate final checkpoint fails (tolerated); the coordinator must not leave the finished
    # tasks waiting for the next periodic checkpoint an hour later (see rule C7).
    out = tmp_path / "out"
    failed: list[int] = []
    real_commit = CheckpointWriter.commit

    def fail_first(self: CheckpointWriter, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        if not failed:
            failed.append(metadata.checkpoint_id)
            raise StorageError("injected: cannot write _metadata")
        return real_commit(self, metadata)

    monkeypatch.setattr(CheckpointWriter, "commit", fail_first)
    job = JobGraph("final-retry")
    job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2).sink(
        RecordingFileSink(str(out), EventLog()), uid="sink"
    )
    started = time.monotonic()
    result = run(run_job(job, job_config(tmp_path, interval=interval, tolerable_failed_checkpoints=1)))
    assert result.status is JobStatus.FINISHED, result.error
    assert time.monotonic() - started < 10
    assert failed == [1]
    assert result.checkpoints == 1
    assert_exactly(committed(out), list(range(COUNT)))


def _finished(log: EventLog) -> bool:
    return "finish" in log.names("sink", 0)
