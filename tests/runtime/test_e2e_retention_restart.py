"""End to end: retention across runs of one job id (Flink's ``DefaultCompletedCheckpointStore`` recovery).

A job started again with the same job id takes the completed checkpoints earlier runs left under its
directory into retention: they are subsumed, oldest id first, once the new run completes checkpoints of
its own; savepoints are never deleted, and the checkpoint the run restores from stays until a newer one
completed. New checkpoint ids continue after the newest completed one, so they never collide with it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from keystate.runtime import CheckpointFailedError, CheckpointFailureReason, JobClient, JobGraph, JobStatus, submit
from keystate.storage.checkpoints import METADATA_FILE, CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind
from tests.runtime.e2e_support import Completed, MixedSource, RunningCount, job_config, run

JOB_ID = "5eed0000000000000000000000000008"
RETAINED = 2


def _job() -> JobGraph:
    job = JobGraph("retention-restart")
    job.source(MixedSource([None], rates=[2000.0]), uid="source").key_by(lambda r: r[1] % 4).process(
        RunningCount(), uid="counts", parallelism=2
    )
    return job


def _on_disk(tmp_path: Path) -> list[int]:
    """Ids of the completed checkpoints (directories with ``_metadata``) in the job's directory."""
    job_dir = tmp_path / "checkpoints" / JOB_ID
    return sorted(int(p.name[4:]) for p in job_dir.glob("chk-*") if (p / METADATA_FILE).is_file())


async def _trigger_when_running(client: JobClient) -> CompletedCheckpoint:
    """A checkpoint, as soon as every task runs."""
    for _ in range(1000):
        try:
            return await client.trigger_checkpoint()
        except CheckpointFailedError as exc:
            if exc.reason is not CheckpointFailureReason.NOT_ALL_REQUIRED_TASKS_RUNNING:
                raise
        await asyncio.sleep(0.01)
    raise AssertionError("the job never ran")


def _run_once(
    tmp_path: Path, *, restore_from: str | None, checkpoints: int, savepoint: bool = False
) -> tuple[list[CompletedCheckpoint], list[int], JobStatus]:
    """Run the job until it completed ``checkpoints`` checkpoints of its own, then cancel it (or stop
    it with a savepoint). Returns its checkpoints, the ids retention held before the run's first
    checkpoint completed, and how the run ended."""
    completed = Completed()

    async def scenario() -> tuple[list[int], JobStatus]:
        config = job_config(tmp_path, interval=0.02, num_retained=RETAINED)
        client = submit(_job(), config, restore_from=restore_from, job_id=JOB_ID)
        completed.watch(client)
        retained_at_start = [c.checkpoint_id for c in await client.coordinator.recover()]
        await completed.until(
            lambda c: sum(x.kind is CheckpointKind.CHECKPOINT for x in completed.checkpoints) >= checkpoints
        )
        if savepoint:
            await client.stop_with_savepoint(drain=False)
            return retained_at_start, (await client.wait()).status
        return retained_at_start, (await client.cancel()).status

    retained_at_start, status = run(scenario())
    own = [c for c in completed.checkpoints if c.kind is CheckpointKind.CHECKPOINT]
    failures = [f for f in completed.failures if f[1] is not CheckpointFailureReason.JOB_FAILOVER]
    assert not failures, "only the checkpoint pending when the run was canceled may fail"
    return own, retained_at_start, status


def test_a_restarted_job_subsumes_the_checkpoints_earlier_runs_left(tmp_path: Path) -> None:
    first, _, status = _run_once(tmp_path, restore_from=None, checkpoints=4, savepoint=True)
    assert status is JobStatus.FINISHED
    assert _on_disk(tmp_path) == [c.checkpoint_id for c in first[-RETAINED:]]
    savepoints = sorted((tmp_path / "checkpoints" / "savepoints").iterdir())
    assert len(savepoints) == 1

    # Second run, same job id, restored from the newest checkpoint: the first run's checkpoints are
    # retained (nothing deleted before a checkpoint of this run completed), then subsumed.
    latest = first[-1]
    second, retained_at_start, status = _run_once(tmp_path, restore_from=latest.location, checkpoints=3)
    assert status is JobStatus.CANCELED
    assert retained_at_start == [c.checkpoint_id for c in first[-RETAINED:]]
    assert second[0].checkpoint_id > latest.checkpoint_id
    assert _on_disk(tmp_path) == [c.checkpoint_id for c in second[-RETAINED:]], "earlier runs' checkpoints left"
    assert sorted((tmp_path / "checkpoints" / "savepoints").iterdir()) == savepoints, "a savepoint was deleted"

    # Third run restores from the OLDER of the two retained checkpoints: its ids continue after the
    # newest completed one (no collision with it), and the restored checkpoint is there until a
    # checkpoint of this run completed.
    older = second[-RETAINED]
    third, retained_at_start, status = _run_once(tmp_path, restore_from=older.location, checkpoints=3)
    assert status is JobStatus.CANCELED
    assert retained_at_start == [c.checkpoint_id for c in second[-RETAINED:]]
    assert third[0].checkpoint_id > second[-1].checkpoint_id
    assert _on_disk(tmp_path) == [c.checkpoint_id for c in third[-RETAINED:]]
    assert sorted((tmp_path / "checkpoints" / "savepoints").iterdir()) == savepoints


def test_the_restored_checkpoint_survives_until_the_new_run_completes_one(tmp_path: Path) -> None:
    first, _, _ = _run_once(tmp_path, restore_from=None, checkpoints=3)
    older = first[-RETAINED]
    completed = Completed()

    async def scenario() -> tuple[list[int], list[int], JobStatus]:
        # No periodic checkpoints: nothing of this run completes until the test triggers one.
        client = submit(_job(), job_config(tmp_path, interval=None, num_retained=1), restore_from=older.location,
                        job_id=JOB_ID)  # fmt: skip
        completed.watch(client)
        before = [c.checkpoint_id for c in await client.coordinator.recover()]
        on_disk_before = _on_disk(tmp_path)
        new = await _trigger_when_running(client)
        assert new.checkpoint_id == first[-1].checkpoint_id + 1
        return before, on_disk_before, (await client.cancel()).status

    before, on_disk_before, status = run(scenario())
    assert status is JobStatus.CANCELED
    assert before == [c.checkpoint_id for c in first[-RETAINED:]]
    assert on_disk_before == before, "retention deleted something before a checkpoint of this run completed"
    assert _on_disk(tmp_path) == [first[-1].checkpoint_id + 1]
