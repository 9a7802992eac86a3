"""End to end: checkpoint failures and retention (rules I1-I4 of docs/flink-rules.md;
docs/architecture.md#how-a-checkpoint-flows, step 5).

A checkpoint that times out, whose state cannot be written, or whose ``_metadata`` cannot be committed
is aborted: tasks are told, its files are removed, completed checkpoints stay loadable (and restorable),
and counted failures beyond the tolerance fail the job with Flink's message. Retention keeps
``num_retained`` checkpoints and never deletes savepoints.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import CheckpointFailureReason, JobGraph, JobStatus, Operator, load_checkpoint, submit
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import StorageError
from keystate.storage.format.metadata import CheckpointMetadata, HandleScope
from keystate.storage.streams import StateOutputStream
from tests.runtime.e2e_support import (
    BACKENDS,
    Completed,
    EventLog,
    FailWhen,
    Flag,
    MixedSource,
    RecordingFileSink,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    assert_prefixes,
    committed,
    expected_mixed,
    job_config,
    run,
    wait_for,
)

EXPIRED = CheckpointFailureReason.CHECKPOINT_EXPIRED
THRESHOLD = "Exceeded checkpoint tolerable failure threshold."


class SlowSnapshot(Operator):
    """Forwards records; its snapshot takes ``delay`` seconds for the checkpoint ids in ``slow`` (all if empty)."""

    def __init__(self, delay: float, slow: frozenset[int] = frozenset()) -> None:
        self.delay = delay
        self.slow = slow

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)

    async def snapshot_state(self, checkpoint_id: int) -> None:
        if not self.slow or checkpoint_id in self.slow:
            await asyncio.sleep(self.delay)


def _job(out: Path, operator: Operator, lengths: list[int | None], rate: float = 1000.0) -> JobGraph:
    job = JobGraph("coordinator")
    source = job.source(MixedSource(lengths, rates=[rate] * len(lengths)), uid="source", parallelism=len(lengths))
    slow = source.transform(operator, uid="slow", parallelism=1)
    slow.key_by(lambda r: r[1] % 4).process(RunningCount(), uid="count", parallelism=2).sink(
        RecordingFileSink(str(out), EventLog()), uid="sink"
    )
    return job


def test_checkpoint_timeout_beyond_tolerance_fails_job(tmp_path: Path) -> None:
    completed = Completed()

    async def scenario() -> tuple[JobStatus, int, BaseException | None]:
        config = job_config(tmp_path, interval=0.03, timeout=0.1, tolerable_failed_checkpoints=0)
        client = submit(_job(tmp_path / "out", SlowSnapshot(0.3), [None]), config)
        completed.watch(client)
        result = await client.wait()
        return result.status, result.attempts, result.error

    status, attempts, error = run(scenario())
    assert status is JobStatus.FAILED
    assert attempts == 1, "exceeding the tolerance fails the job for good, without a restart"
    assert error is not None, error
    assert str(error).startswith(THRESHOLD), error
    assert [reason for _, reason, _ in completed.failures][:1] == [EXPIRED]
    assert "expired before completing" in completed.failures[0][2]
    assert not completed.checkpoints


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_timeout_within_tolerance_keeps_going(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "out"
    completed = Completed()

    async def scenario() -> JobStatus:
        config = job_config(tmp_path, interval=0.03, timeout=0.3, tolerable_failed_checkpoints=3, backend=backend)
        client = submit(_job(out, SlowSnapshot(0.45, frozenset({2})), [600]), config)
        completed.watch(client)
        return (await client.wait()).status

    assert run(scenario()) is JobStatus.FINISHED, completed.failures
    expired = [i for i, reason, _ in completed.failures if reason is EXPIRED]
    assert 2 in expired, completed.failures
    assert completed.checkpoints
    assert not {c.checkpoint_id for c in completed.checkpoints} & set(expired)
    output = committed(out)
    assert_exactly([r[:2] for r in output], expected_mixed([600]))
    assert_counts_continue(output, lambda r: r[1] % 4)


def _patch_failure(monkeypatch: pytest.MonkeyPatch, kind: str, failing: int, fired: Flag) -> None:
    """Make checkpoint ``failing`` fail while writing the sink's state (``stream``) or its ``_metadata``."""
    if kind == "stream":
        real_open = CheckpointWriter.open_stream

        def open_stream(
            self: CheckpointWriter, hint: str, scope: HandleScope = HandleScope.EXCLUSIVE
        ) -> StateOutputStream:
            if self.checkpoint_id == failing and hint.startswith("sink/"):
                fired.value += 1
                raise StorageError(f"injected: cannot write {hint} of checkpoint {failing}")
            return real_open(self, hint, scope)

        monkeypatch.setattr(CheckpointWriter, "open_stream", open_stream)
    else:
        real_commit = CheckpointWriter.commit

        def commit(self: CheckpointWriter, metadata: CheckpointMetadata) -> CompletedCheckpoint:
            if metadata.checkpoint_id == failing:
                fired.value += 1
                raise StorageError(f"injected: cannot write _metadata of checkpoint {failing}")
            return real_commit(self, metadata)

        monkeypatch.setattr(CheckpointWriter, "commit", commit)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("stream", CheckpointFailureReason.CHECKPOINT_ASYNC_EXCEPTION),
        ("metadata", CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE),
    ],
)
def test_storage_failure_aborts_checkpoint_and_keeps_earlier_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, reason: CheckpointFailureReason
) -> None:
    out = tmp_path / "out"
    completed = Completed()
    fired = Flag()
    failing = 3
    _patch_failure(monkeypatch, kind, failing, fired)
    graph = _job(out, SlowSnapshot(0.0), [500], rate=800.0)

    async def scenario() -> tuple[JobStatus, BaseException | None]:
        config = job_config(tmp_path, interval=0.03, tolerable_failed_checkpoints=0, num_retained=5)
        client = submit(graph, config)
        completed.watch(client)
        result = await client.wait()
        return result.status, result.error

    status, error = run(scenario())
    assert status is JobStatus.FAILED
    assert fired.value >= 1
    assert error is not None
    assert str(error).startswith(THRESHOLD)
    failures = [(i, r) for i, r, _ in completed.failures if r is not CheckpointFailureReason.JOB_FAILOVER]
    assert failures == [(failing, reason)]
    job_dir = tmp_path / "checkpoints" / next(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not (job_dir / f"chk-{failing}").exists(), "the aborted checkpoint's files must be removed"
    earlier = [load_checkpoint(str(job_dir / f"chk-{i}")) for i in range(1, failing)]
    for checkpoint in earlier:
        for handle in checkpoint.metadata.handles():
            checkpoint.open_state(handle).read_all()  # sizes and checksums verified
    # The latest earlier checkpoint is restorable: the job completes from it with exact output.
    monkeypatch.undo()

    async def resume() -> JobStatus:
        client = submit(graph, job_config(tmp_path, interval=0.03), restore_from=earlier[-1].location)
        return (await client.wait()).status

    assert run(resume()) is JobStatus.FINISHED
    output = committed(out)
    assert_exactly([r[:2] for r in output], expected_mixed([500]))
    assert_counts_continue(output, lambda r: r[1] % 4)


def test_retention_keeps_num_retained_and_never_deletes_savepoints(tmp_path: Path) -> None:
    completed = Completed()

    async def scenario() -> list[CompletedCheckpoint]:
        client = submit(
            _job(tmp_path / "out", SlowSnapshot(0.0), [None]), job_config(tmp_path, interval=0.02, num_retained=2)
        )
        completed.watch(client)
        await completed.until(lambda c: True)
        savepoints = [await client.trigger_savepoint()]
        await completed.until(lambda c: c.checkpoint_id >= savepoints[0].checkpoint_id + 4)
        savepoints.append(await client.trigger_savepoint())
        await completed.until(lambda c: c.checkpoint_id >= savepoints[1].checkpoint_id + 4)
        savepoints.append(await client.stop_with_savepoint(drain=True))
        return savepoints

    savepoints = run(scenario())
    root = tmp_path / "checkpoints"
    job_dir = next(p for p in root.iterdir() if p.name != "savepoints")
    checkpoint_ids = sorted(c.checkpoint_id for c in completed.checkpoints if c.kind.value == "checkpoint")
    on_disk = sorted(int(p.name.removeprefix("chk-")) for p in job_dir.glob("chk-*"))
    assert on_disk == checkpoint_ids[-2:], f"retained {on_disk}, completed {checkpoint_ids}"
    assert all((job_dir / f"chk-{i}" / "_metadata").is_file() for i in on_disk)
    for savepoint in savepoints:
        assert (Path(savepoint.location) / "_metadata").is_file(), savepoint
        assert load_checkpoint(savepoint.location).checkpoint_id == savepoint.checkpoint_id
    assert len(list((root / "savepoints").iterdir())) == 3


def test_concurrent_checkpoints_completing_out_of_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # max_concurrent > 1 and a slow _metadata write for odd ids: a newer checkpoint may complete before
    # an older one, which is then subsumed at once (never retained, never committed after a newer one).
    out = tmp_path / "out"
    completed = Completed()
    real_commit = CheckpointWriter.commit

    def slow_odd_commit(self: CheckpointWriter, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        if metadata.checkpoint_id % 2 and not metadata.properties.synchronous:
            time.sleep(0.15)  # runs in the coordinator's worker thread
        return real_commit(self, metadata)

    monkeypatch.setattr(CheckpointWriter, "commit", slow_odd_commit)

    def out_of_order() -> bool:
        return any(reason is CheckpointFailureReason.CHECKPOINT_SUBSUMED for _, reason, _ in completed.failures)

    async def scenario() -> JobStatus:
        config = job_config(tmp_path, interval=0.01, max_concurrent=3, num_retained=2)
        client = submit(_job(out, SlowSnapshot(0.0), [None], rate=1000.0), config)
        completed.watch(client)
        await wait_for(out_of_order, what="a checkpoint completing after a newer one")
        seen = len(completed.checkpoints)
        await wait_for(lambda: len(completed.checkpoints) > seen + 1, what="checkpoints going on after that")
        await client.stop_with_savepoint(drain=True)
        return (await client.wait()).status

    assert run(scenario()) is JobStatus.FINISHED
    # Listeners only ever see completions in id order: a subsumed one is reported as a failure instead.
    order = [c.checkpoint_id for c in completed.checkpoints]
    assert order == sorted(order)
    subsumed = {i for i, reason, _ in completed.failures if reason is CheckpointFailureReason.CHECKPOINT_SUBSUMED}
    assert subsumed
    assert not subsumed & set(order)
    job_dir = next(p for p in (tmp_path / "checkpoints").iterdir() if p.name != "savepoints")
    on_disk = sorted(int(p.name.removeprefix("chk-")) for p in job_dir.glob("chk-*"))
    assert not subsumed & set(on_disk)
    assert len(on_disk) <= 2, on_disk
    assert all((job_dir / f"chk-{i}" / "_metadata").is_file() for i in on_disk)
    output = committed(out)
    assert assert_prefixes([r[:2] for r in output], [0])[0] > 0
    assert_counts_continue(output, lambda r: r[1] % 4)


def test_checkpoint_completing_during_failover_is_the_one_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task fails while checkpoint 3 is writing its _metadata: once written it is complete, so the
    # restart restores from it (and retention owns it) instead of leaving an orphan next to chk-2.
    out = tmp_path / "out"
    armed, fired = Flag(), Flag()
    completed = Completed()
    real_commit = CheckpointWriter.commit

    def slow_commit(self: CheckpointWriter, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        if metadata.checkpoint_id == 3:
            armed.value = 1  # the next record fails a task while this commit is still running
            time.sleep(0.15)
        return real_commit(self, metadata)

    monkeypatch.setattr(CheckpointWriter, "commit", slow_commit)

    async def scenario() -> int:
        client = submit(_job(out, FailWhen(armed, fired), [None], rate=600.0), job_config(tmp_path, interval=0.03))
        completed.watch(client)
        await wait_for(lambda: fired.value == 1, what="the injected failure")
        await completed.until(lambda c: c.checkpoint_id >= 5)
        await client.stop_with_savepoint(drain=True)
        return (await client.wait()).attempts

    assert run(scenario()) == 2
    assert 3 in [c.checkpoint_id for c in completed.checkpoints]
    job_dir = next(p for p in (tmp_path / "checkpoints").iterdir() if p.name != "savepoints")
    assert [p.name for p in job_dir.glob("chk-*")] == [f"chk-{completed.checkpoints[-2].checkpoint_id}"]
    output = committed(out)
    assert assert_prefixes([r[:2] for r in output], [0])[0] > 0
    assert_counts_continue(output, lambda r: r[1] % 4)
