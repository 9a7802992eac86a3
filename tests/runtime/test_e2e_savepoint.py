"""End to end: stop-with-savepoint with and without drain, and resuming (rules G1-G6 of docs/flink-rules.md;
StopWithSavepointITCase).

With drain, every task runs end_input/finish and then waits for that very savepoint, which commits all
output. Without drain, neither runs, and a job restored from the savepoint continues every source and
every keyed state exactly where it stopped.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import MAX_WATERMARK, JobGraph, JobResult, JobStatus, StopWithSavepointError, submit
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import StorageError
from keystate.storage.format.metadata import CheckpointKind, CheckpointMetadata, OperatorStatus
from tests.runtime.e2e_support import (
    BACKENDS,
    Completed,
    Event,
    EventLog,
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
    staged,
    status_of,
    wait_for,
)

LENGTHS = [600, 600]
RECORDED = (("map", 2), ("recorded-counts", 2), ("sink", 1))


def _key(record: list[int]) -> int:
    return record[1] % 5


def _job(out: Path, log: EventLog, lengths: list[int | None], rate: float = 600.0) -> JobGraph:
    job = JobGraph("stop")
    source = job.source(MixedSource(lengths, rates=[rate, rate]), uid="source", parallelism=2)
    mapped = source.transform(Recorder(log), uid="map", parallelism=2)
    counts = mapped.key_by(_key).process(RunningCount(), uid="counts", parallelism=2)
    counts.transform(Recorder(log), uid="recorded-counts", parallelism=2).sink(
        RecordingFileSink(str(out), log), uid="sink", parallelism=1
    )
    return job


def _without_late_notifications(events: list[Event], checkpoint_id: int) -> list[tuple[str, Any]]:
    """``(name, arg)`` of ``events`` without notifications of checkpoints older than ``checkpoint_id``.

    A periodic checkpoint a task snapshotted earlier may still complete, and notify, after the task
    took a later snapshot or ran finish(): completion is asynchronous, as in Flink.
    """
    return [(e.name, e.arg) for e in events if not (e.name == "notify_checkpoint_complete" and e.arg < checkpoint_id)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_with_savepoint_drain_finishes_and_commits_everything(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    out = tmp_path / "out"
    completed = Completed()

    async def scenario() -> tuple[CompletedCheckpoint, JobStatus]:
        client = submit(_job(out, log, [None, None]), job_config(tmp_path, interval=0.03, backend=backend))
        completed.watch(client)
        await completed.until(lambda c: c.checkpoint_id >= 2)
        savepoint = await client.stop_with_savepoint(drain=True)
        return savepoint, (await client.wait()).status

    savepoint, status = run(scenario())
    assert status is JobStatus.FINISHED
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    props = savepoint.metadata.properties
    assert props.synchronous
    assert props.drain
    assert Path(savepoint.location).parent == tmp_path / "checkpoints" / "savepoints"
    assert completed.checkpoints[-1].checkpoint_id == savepoint.checkpoint_id, "periodic checkpoints stopped"
    for uid, parallelism in RECORDED:
        for index in range(parallelism):
            events = log.of(uid, index)
            names = [e.name for e in events]
            where = f"{uid}[{index}]: {names[-8:]}"
            fin = names.index("finish")
            assert names.index("end_input") < fin, where
            assert [e.arg for e in events if e.name == "watermark"] == [MAX_WATERMARK.timestamp], where
            # Every task waits for the same savepoint (C8, G3): nothing but it after finish().
            assert _without_late_notifications(events[fin + 1 :], savepoint.checkpoint_id) == [
                ("snapshot_state", savepoint.checkpoint_id),
                ("notify_checkpoint_complete", savepoint.checkpoint_id),
                ("close", None),
            ], where
    sink_input = [e.arg for e in log.of("sink") if e.name == "process"]
    output = committed(out)
    assert_exactly(output, sink_input)
    assert len(output) > 0
    assert_counts_continue(output, _key)
    assert staged(out) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_without_drain_then_resume_exactly_where_stopped(tmp_path: Path, backend: str) -> None:
    log = EventLog()
    out = tmp_path / "out"

    async def first_run() -> CompletedCheckpoint:
        client = submit(_job(out, log, list(LENGTHS)), job_config(tmp_path, interval=0.03, backend=backend))
        await wait_for(lambda: sum(e.name == "process" for e in log.of("sink")) > 60, what="output")
        savepoint = await client.stop_with_savepoint(drain=False)
        assert (await client.wait()).status is JobStatus.FINISHED
        return savepoint

    savepoint = run(first_run())
    props = savepoint.metadata.properties
    assert props.synchronous
    assert not props.drain
    for uid, parallelism in RECORDED:
        for index in range(parallelism):
            events = log.of(uid, index)
            names = [e.name for e in events]
            assert not {"end_input", "finish", "watermark"} & set(names), f"{uid}[{index}] drained: {names}"
            # The savepoint is the last snapshot, its notification the last event before close().
            last = max(i for i, e in enumerate(events) if e.name == "snapshot_state")
            assert _without_late_notifications(events[last:], savepoint.checkpoint_id) == [
                ("snapshot_state", savepoint.checkpoint_id),
                ("notify_checkpoint_complete", savepoint.checkpoint_id),
                ("close", None),
            ], f"{uid}[{index}]: {names[last:]}"
    stopped_at = committed(out)
    assert 0 < len(stopped_at) < sum(LENGTHS), "the first run must stop part way"

    second = EventLog()

    async def second_run() -> JobStatus:
        client = submit(
            _job(out, second, list(LENGTHS), rate=3000.0),  # rates are not state
            job_config(tmp_path, interval=0.03, backend=backend),
            restore_from=savepoint.location,
        )
        return (await client.wait()).status

    assert run(second_run()) is JobStatus.FINISHED
    output = committed(out)
    assert_exactly([r[:2] for r in output], expected_mixed(LENGTHS))
    assert_counts_continue(output, _key)
    # The second run re-processed nothing the first one had already committed.
    resumed = [e.arg for e in second.of("map") if e.name == "process"]
    assert_exactly(resumed + [r[:2] for r in stopped_at], expected_mixed(LENGTHS))
    assert staged(out) == []


def test_intermediate_savepoint_commits_nothing_and_survives_retention(tmp_path: Path) -> None:
    # H1: a regular savepoint is not a checkpoint: no notification (no side effects), never subsumed.
    log = EventLog()
    out = tmp_path / "out"
    completed = Completed()

    async def scenario() -> CompletedCheckpoint:
        client = submit(_job(out, log, [None, None]), job_config(tmp_path, interval=0.02, num_retained=1))
        completed.watch(client)
        await completed.until(lambda c: c.checkpoint_id >= 2)
        savepoint = await client.trigger_savepoint()
        await completed.until(lambda c: c.checkpoint_id >= savepoint.checkpoint_id + 3)
        await client.stop_with_savepoint(drain=True)
        return savepoint

    savepoint = run(scenario())
    props = savepoint.metadata.properties
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    assert not props.synchronous
    assert not props.drain
    assert (Path(savepoint.location) / "_metadata").is_file()
    assert savepoint.checkpoint_id in [e.arg for e in log.of("sink") if e.name == "snapshot_state"]
    notified = {e.arg for e in log.events if e.name == "notify_checkpoint_complete"}
    assert savepoint.checkpoint_id not in notified
    job_dir = next(p for p in (tmp_path / "checkpoints").iterdir() if p.name != "savepoints")
    assert len([p for p in job_dir.glob("chk-*") if (p / "_metadata").exists()]) == 1, "num_retained=1"
    assert_counts_continue(committed(out), _key)


def test_savepoint_of_finished_job_part_then_drain(tmp_path: Path) -> None:
    # Stop-with-savepoint after the bounded part finished: its operators are fully finished in the savepoint.
    out = tmp_path / "out"
    log = EventLog()
    completed = Completed()

    async def scenario() -> CompletedCheckpoint:
        job = JobGraph("half")
        done = job.source(MixedSource([40]), uid="done", parallelism=1)
        live = job.source(MixedSource([None], first_split=10), uid="live", parallelism=1)
        job.operator(Recorder(log), uid="merge", inputs=[done, live], parallelism=1).sink(
            RecordingFileSink(str(out), log), uid="sink"
        )
        client = submit(job, job_config(tmp_path, interval=0.02))
        completed.watch(client)
        await completed.until(lambda c: status_of(c, "done") is OperatorStatus.FULLY_FINISHED)
        await asyncio.sleep(0.05)
        return await client.stop_with_savepoint(drain=True)

    savepoint = run(scenario())
    done_op = savepoint.metadata.operator("done")
    assert done_op is not None
    assert done_op.fully_finished
    output = committed(out)
    assert_exactly([r for r in output if r[0] == 0], expected_mixed([40]))
    assert len([r for r in output if r[0] == 10]) > 0


@pytest.mark.parametrize("drain", [True, False])
def test_failed_stop_with_savepoint_fails_over_and_job_can_stop_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drain: bool
) -> None:
    # SavepointITCase.testStopWithSavepointWithDrainGlobalFailoverIfSavepointAborted: the savepoint's
    # _metadata write fails -> the client gets StopWithSavepointError, the tasks fail over (G4) and the
    # job runs on from its latest checkpoint; a second stop succeeds and nothing is lost or duplicated.
    log = EventLog()
    out = tmp_path / "out"
    failed: list[int] = []
    real_commit = CheckpointWriter.commit

    def commit(self: CheckpointWriter, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        if metadata.properties.synchronous and not failed:
            failed.append(metadata.checkpoint_id)
            raise StorageError("injected: cannot write the savepoint's _metadata")
        return real_commit(self, metadata)

    monkeypatch.setattr(CheckpointWriter, "commit", commit)
    completed = Completed()

    async def scenario() -> tuple[JobResult, CompletedCheckpoint]:
        client = submit(
            _job(out, log, [None, None]), job_config(tmp_path, interval=0.03, tolerable_failed_checkpoints=5)
        )
        completed.watch(client)
        await completed.until(lambda c: c.checkpoint_id >= 2)
        with pytest.raises(StopWithSavepointError, match="Stop-with-savepoint failed"):
            await client.stop_with_savepoint(drain=drain)
        await completed.until(lambda c: c.checkpoint_id > failed[0])  # checkpoints resumed after the failover
        savepoint = await client.stop_with_savepoint(drain=drain)
        return await client.wait(), savepoint

    result, savepoint = run(scenario())
    assert result.status is JobStatus.FINISHED
    assert result.attempts == 2
    assert result.savepoint is not None
    assert result.savepoint.checkpoint_id == savepoint.checkpoint_id
    output = committed(out)
    for split in (0, 1):
        assert assert_prefixes([r[:2] for r in output if r[0] == split], [split])[split] > 0
    assert_counts_continue(output, _key)
