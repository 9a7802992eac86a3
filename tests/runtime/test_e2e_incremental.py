"""End to end: incremental checkpoints (LMDB) and the lifetime of their shared files, on local disk and S3.

A job checkpoints often with retention 1..3; after every completed checkpoint, every shared file a
retained checkpoint references is in storage, and the checkpoint verifies and its merged keyed state
(base plus deltas) is exactly what its source position says. When the job ends, storage holds exactly
the shared files the retained checkpoints reference. Also: a restart in the middle continues the
chain, concurrent checkpoints, orphans removed when a job starts, a rescaled restore from an
incremental checkpoint, and a savepoint that is full, self-contained and relocatable.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobConfig, JobGraph, JobStatus, TransactionalFileSink, submit
from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind, HandleScope
from keystate.storage.uri import open_storage
from tests.runtime.e2e_support import (
    Completed,
    Flag,
    HeldSource,
    MixedSource,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    committed,
    expected_mixed,
    job_config,
    run,
)
from tests.runtime.incremental_support import KEYS, check_checkpoint, describe, referenced, shared_on_storage

JOB_ID = "1ac0000000000000000000000000000d"


def _job(source: Any, *, parallelism: int = 2, sink: str | None = None) -> JobGraph:
    job = JobGraph("incremental")
    counts = job.source(source, uid="source").key_by(lambda r: r[1] % KEYS)
    counted = counts.process(RunningCount(), uid="counts", parallelism=parallelism)
    if sink is not None:
        job.operator(TransactionalFileSink(sink), uid="sink", inputs=[counted.rebalance()], parallelism=1)
    return job


def _config(tmp_path: Path, root: str | None, **checkpoint: Any) -> JobConfig:
    config = job_config(tmp_path, **checkpoint)
    if root is None:
        return config
    return replace(config, checkpoint=replace(config.checkpoint, storage=root))


class Watch:
    """After every completed checkpoint: every retained checkpoint's shared files are in storage, and the
    new one verifies and restores exactly. Problems are collected."""

    def __init__(self, storage: CheckpointStorage, length: int | None = None) -> None:
        self.storage = storage
        self.length = length
        self.completed = Completed()
        self.problems: list[str] = []
        self.client: Any = None

    def watch(self, client: Any) -> Watch:
        self.client = client
        self.completed.watch(client)
        client.coordinator.listeners.append(self._check)
        return self

    def _check(self, checkpoint: CompletedCheckpoint) -> None:
        retained = self.client.coordinator.store.checkpoints
        missing = referenced(retained) - shared_on_storage(self.storage, checkpoint.metadata.job_id)
        if missing:
            self.problems.append(f"after {checkpoint}: retained checkpoints miss shared files {describe(missing)}")
        self.problems += check_checkpoint(checkpoint, length=self.length)


def _storage(tmp_path: Path, root: str | None, endpoint: str | None = None) -> CheckpointStorage:
    return open_storage(root or str(tmp_path / "checkpoints"), endpoint_url=endpoint)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """``None`` (local disk under tmp_path) or an ``s3://`` root on moto's threaded server."""
    if request.param == "local":
        return None
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("server_bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return f"s3://{bucket}/ckpt"


@pytest.mark.parametrize("retained", [1, 3])
def test_many_checkpoints_keep_exactly_the_referenced_shared_files(
    tmp_path: Path, where: str | None, retained: int
) -> None:
    storage = _storage(tmp_path, where)
    release = Flag()
    lengths = [1500]

    async def scenario() -> tuple[Watch, Any]:
        config = _config(tmp_path, where, interval=0.02, num_retained=retained, max_chain_length=3)
        client = submit(_job(HeldSource(lengths, release, rates=[3000.0])), config, job_id=JOB_ID)
        watch = Watch(storage, sum(lengths)).watch(client)
        await watch.completed.until(lambda c: c.checkpoint_id >= 12, within=30)
        release.value = 1
        return watch, await client.wait()

    watch, result = run(scenario())
    assert result.status is JobStatus.FINISHED, result.error
    assert watch.problems == []
    checkpoints = watch.completed.checkpoints
    assert any(c.metadata.is_incremental for c in checkpoints), "some checkpoints built on earlier ones"
    assert all(
        h.written_by is not None for c in checkpoints for h in c.metadata.handles() if h.scope is HandleScope.SHARED
    )
    retained_now = watch.client.coordinator.store.checkpoints
    assert len(retained_now) == retained
    on_storage = shared_on_storage(storage, JOB_ID)
    want = referenced(retained_now)
    assert on_storage == want, f"extra {describe(on_storage - want)}, missing {describe(want - on_storage)}"
    incremental = [c for c in checkpoints if c.metadata.is_incremental]
    assert all(c.metadata.incremental_state_bytes < c.metadata.full_state_bytes for c in incremental)
    assert all(c.metadata.statistics is not None for c in checkpoints)
    running = [c for c in checkpoints if not c.metadata.operators[-1].fully_finished]
    counts = running[-1].metadata.operator("counts")
    assert counts is not None
    assert counts.statistics is not None
    assert counts.statistics.acknowledged_subtasks == 2


def test_restart_in_the_middle_continues_the_chain_and_restores_exactly(tmp_path: Path, where: str | None) -> None:
    storage = _storage(tmp_path, where)
    out = str(tmp_path / "out")
    lengths = [1200]

    async def first() -> Watch:
        config = _config(tmp_path, where, interval=0.02, num_retained=2, max_delta_ratio=100.0)
        client = submit(_job(MixedSource(lengths, rates=[1500.0]), sink=out), config, job_id=JOB_ID)
        watch = Watch(storage, sum(lengths)).watch(client)
        await watch.completed.until(lambda c: c.metadata.is_incremental and c.checkpoint_id >= 5, within=30)
        await client.cancel()
        return watch

    before = run(first())
    assert before.problems == []
    latest = storage.latest()
    assert latest is not None
    assert latest.metadata.is_incremental or any(c.metadata.is_incremental for c in before.completed.checkpoints)

    async def second() -> tuple[Watch, Any]:
        config = _config(tmp_path, where, interval=0.02, num_retained=2, max_delta_ratio=100.0)
        client = submit(
            _job(MixedSource(lengths, rates=[3000.0]), sink=out), config, restore_from=latest, job_id=JOB_ID
        )
        watch = Watch(storage, sum(lengths)).watch(client)
        return watch, await client.wait()

    after, result = run(second())
    assert result.status is JobStatus.FINISHED, result.error
    assert after.problems == []
    first_new = after.completed.checkpoints[0]
    assert first_new.checkpoint_id > latest.checkpoint_id
    records = committed(Path(out))
    assert_exactly([r[:2] for r in records], expected_mixed(lengths))
    assert_counts_continue(records, key=lambda r: r[1] % KEYS)
    assert shared_on_storage(storage, JOB_ID) == referenced(after.client.coordinator.store.checkpoints)


def test_concurrent_checkpoints_never_lose_a_base(tmp_path: Path) -> None:
    storage = _storage(tmp_path, None)
    release = Flag()
    lengths = [1500]

    async def scenario() -> tuple[Watch, Any]:
        config = _config(tmp_path, None, interval=0.01, num_retained=1, max_concurrent=2, max_chain_length=4)
        client = submit(_job(HeldSource(lengths, release, rates=[3000.0])), config, job_id=JOB_ID)
        watch = Watch(storage, sum(lengths)).watch(client)
        await watch.completed.until(lambda c: c.checkpoint_id >= 15, within=30)
        release.value = 1
        return watch, await client.wait()

    watch, result = run(scenario())
    assert result.status is JobStatus.FINISHED, result.error
    assert watch.problems == []
    assert shared_on_storage(storage, JOB_ID) == referenced(watch.client.coordinator.store.checkpoints)


def test_orphans_are_removed_before_the_job_deploys(tmp_path: Path) -> None:
    storage = _storage(tmp_path, None)

    async def once(restore: CompletedCheckpoint | None) -> Watch:
        config = _config(tmp_path, None, interval=0.02, num_retained=1)
        client = submit(_job(MixedSource([None], rates=[1000.0])), config, restore_from=restore, job_id=JOB_ID)
        watch = Watch(storage).watch(client)
        await watch.completed.until(lambda c: c.metadata.is_incremental, within=30)
        await client.cancel()
        return watch

    run(once(None))
    kept = referenced([c for c in [storage.latest()] if c is not None])
    assert kept
    shared = tmp_path / "checkpoints" / JOB_ID / "shared"
    orphans = [shared / "counts" / "0" / "keyed-0000000000000000.ksf", shared / "stray.ksf"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"written by a checkpoint that never completed")

    async def started() -> set[str]:
        config = _config(tmp_path, None, interval=None)
        client = submit(_job(MixedSource([None], rates=[1000.0])), config, restore_from=storage.latest(), job_id=JOB_ID)
        await client._deployed()  # the job recovered its checkpoints and deployed
        on_storage = shared_on_storage(storage, JOB_ID)
        await client.cancel()
        return on_storage

    on_storage = run(started())
    assert not any(o.exists() for o in orphans)
    assert kept <= on_storage


def test_rescaled_restore_from_an_incremental_checkpoint(tmp_path: Path) -> None:
    storage = _storage(tmp_path, None)
    out = str(tmp_path / "out")
    lengths = [1000]

    async def first() -> CompletedCheckpoint:
        config = _config(tmp_path, None, interval=0.02, num_retained=2)
        client = submit(_job(MixedSource(lengths, rates=[1200.0]), sink=out), config, job_id=JOB_ID)
        completed = Completed().watch(client)
        checkpoint = await completed.until(lambda c: c.metadata.is_incremental and c.checkpoint_id >= 4, within=30)
        await client.cancel()
        return checkpoint

    incremental = run(first())
    counts = incremental.metadata.operator("counts")
    assert counts is not None
    assert any(k.deltas for st in counts.subtasks for k in st.keyed)
    latest = storage.latest()
    assert latest is not None

    async def rescaled() -> Any:
        config = _config(tmp_path, None, interval=0.02, num_retained=2)
        job = _job(MixedSource(lengths, rates=[3000.0]), parallelism=3, sink=out)
        return await submit(job, config, restore_from=latest, job_id="1ac0000000000000000000000000000e").wait()

    result = run(rescaled())
    assert result.status is JobStatus.FINISHED, result.error
    records = committed(Path(out))
    assert_exactly([r[:2] for r in records], expected_mixed(lengths))
    assert_counts_continue(records, key=lambda r: r[1] % KEYS)


def test_savepoint_is_full_self_contained_and_relocatable(tmp_path: Path) -> None:
    out = str(tmp_path / "out")

    async def stop() -> CompletedCheckpoint:
        config = _config(tmp_path, None, interval=0.02, num_retained=2)
        client = submit(_job(MixedSource([None], rates=[1000.0]), sink=out), config, job_id=JOB_ID)
        completed = Completed().watch(client)
        await completed.until(lambda c: c.metadata.is_incremental, within=30)
        return await client.stop_with_savepoint(drain=False)

    savepoint = run(stop())
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    assert not savepoint.metadata.is_incremental
    assert all(h.scope is not HandleScope.SHARED for h in savepoint.metadata.handles())
    moved = tmp_path / "moved" / Path(savepoint.location).name
    shutil.copytree(savepoint.location, moved)
    shutil.rmtree(tmp_path / "checkpoints")  # the job's shared/ directory is gone: the savepoint needs none
    relocated = open_storage(str(moved)).resolve()
    assert check_checkpoint(relocated) == []

    async def resume() -> Any:
        config = _config(tmp_path, None, interval=0.02)
        client = submit(_job(MixedSource([None], rates=[1000.0]), sink=out), config, restore_from=relocated)
        await Completed().watch(client).until(lambda c: c.metadata.is_incremental, within=30)
        return await client.cancel()

    result = run(resume())
    assert result.status is JobStatus.CANCELED
    assert_counts_continue(committed(Path(out)), key=lambda r: r[1] % KEYS)
