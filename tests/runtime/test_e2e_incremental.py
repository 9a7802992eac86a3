"""End to end: incremental checkpoints (LMDB) and the lifetime of their shared files, on local disk and S3.

A job checkpoints often with retention 1..3; after every completed checkpoint, every shared file a
retained checkpoint references is in storage, and the checkpoint verifies and its merged keyed state
(base plus deltas) is exactly what its source position says. When the job ends, storage holds exactly
the shared files the retained checkpoints reference. Also: a restart in the middle continues the
chain (its first checkpoint extends the restored one), concurrent checkpoints, orphans removed when a
job starts (only those no checkpoint in flight may reference), a rescaled restore or one under another
job id from an incremental checkpoint (its first checkpoint is full), and a savepoint that is full,
self-contained and relocatable.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobConfig, JobGraph, JobStatus, TransactionalFileSink, submit
from keystate.storage.base import PutMode
from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind, HandleScope, KeyedStateHandle
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
from tests.runtime.incremental_support import (
    KEYS,
    check_checkpoint,
    describe,
    has_deltas,
    keyed_handles,
    referenced,
    shared_on_storage,
)

JOB_ID = "1ac0000000000000000000000000000d"
OTHER_JOB_ID = "1ac0000000000000000000000000000e"


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


def _chain(handle: KeyedStateHandle) -> list[str | None]:
    """The paths of a keyed handle's files: its base, then its deltas."""
    return [s.path for s in handle.streams()]


def _assert_full(checkpoint: CompletedCheckpoint, uid: str = "counts") -> None:
    """Every keyed handle of ``uid`` is a base this checkpoint wrote itself, without deltas."""
    handles = keyed_handles(checkpoint, uid)
    assert handles, f"{checkpoint}: {uid!r} has no keyed state"
    for handle in handles:
        assert not handle.deltas, f"{checkpoint}: {uid!r} builds on earlier files {_chain(handle)}"
        assert handle.stream.written_by == checkpoint.checkpoint_id, f"{checkpoint}: base {handle.stream}"


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
    # Long enough that the first run is still reading when it is cancelled: a paced source catches up
    # after a stall of the event loop (a loaded CI machine), and one that ran to its end before its
    # first delta would leave only bases to restore from.
    lengths = [6000]

    chains = {"max_delta_ratio": 100.0, "max_chain_length": 1000}  # no materialization in this test

    async def first() -> Watch:
        config = _config(tmp_path, where, interval=0.02, num_retained=2, **chains)
        client = submit(_job(MixedSource(lengths, rates=[1500.0]), sink=out), config, job_id=JOB_ID)
        watch = Watch(storage, sum(lengths)).watch(client)
        await watch.completed.until(lambda c: has_deltas(c, "counts") and c.checkpoint_id >= 5, within=30)
        await client.cancel()
        return watch

    before = run(first())
    assert before.problems == []
    latest = storage.latest()
    assert latest is not None
    assert has_deltas(latest, "counts"), f"{latest}: the restart must restore from a chain with deltas"
    restored_counts = latest.metadata.operator("counts")
    assert restored_counts is not None
    restored = {st.index: st.keyed for st in restored_counts.subtasks}

    async def second() -> tuple[Watch, Any]:
        config = _config(tmp_path, where, interval=0.02, num_retained=2, **chains)
        client = submit(
            _job(MixedSource(lengths, rates=[8000.0]), sink=out), config, restore_from=latest, job_id=JOB_ID
        )
        watch = Watch(storage, sum(lengths)).watch(client)
        return watch, await client.wait()

    after, result = run(second())
    assert result.status is JobStatus.FINISHED, result.error
    assert after.problems == []
    first_new = after.completed.checkpoints[0]
    assert first_new.checkpoint_id > latest.checkpoint_id
    # Same job, same job directory, a checkpoint, same parallelism: each subtask's first checkpoint after
    # the restore extends the restored chain (by one delta of its own, or none if no key changed) instead
    # of writing a new base.
    counts = first_new.metadata.operator("counts")
    assert counts is not None
    for st in counts.subtasks:
        (was,), (now,) = restored[st.index], st.keyed
        old_chain = _chain(was)
        assert _chain(now)[: len(old_chain)] == old_chain, (
            f"{first_new}: subtask {st.index} wrote {_chain(now)} instead of continuing {old_chain}"
        )
        added = now.deltas[len(was.deltas) :]
        assert len(added) <= 1
        assert all(d.stream.written_by == first_new.checkpoint_id for d in added)
    assert first_new.metadata.is_incremental
    assert first_new.metadata.incremental_state_bytes < first_new.metadata.full_state_bytes
    records = committed(Path(out))
    assert_exactly([r[:2] for r in records], expected_mixed(lengths))
    assert_counts_continue(records, key=lambda r: r[1] % KEYS)
    assert shared_on_storage(storage, JOB_ID) == referenced(after.client.coordinator.store.checkpoints)


def test_concurrent_checkpoints_never_lose_a_base(tmp_path: Path, where: str | None) -> None:
    storage = _storage(tmp_path, where)
    release = Flag()
    lengths = [1500]

    async def scenario() -> tuple[Watch, Any]:
        config = _config(tmp_path, where, interval=0.01, num_retained=1, max_concurrent=2, max_chain_length=4)
        client = submit(_job(HeldSource(lengths, release, rates=[3000.0])), config, job_id=JOB_ID)
        watch = Watch(storage, sum(lengths)).watch(client)
        await watch.completed.until(lambda c: c.checkpoint_id >= (15 if where is None else 10), within=30)
        release.value = 1
        return watch, await client.wait()

    watch, result = run(scenario())
    assert result.status is JobStatus.FINISHED, result.error
    assert watch.problems == []
    assert shared_on_storage(storage, JOB_ID) == referenced(watch.client.coordinator.store.checkpoints)


def test_orphans_are_removed_before_the_job_deploys_unless_still_in_flight(tmp_path: Path, where: str | None) -> None:
    """At start, an unreferenced shared file goes if the checkpoint that wrote it is at or below the latest
    completed one (no writer can commit it any more); one written by a later checkpoint (maybe a zombie's,
    still in flight) stays until this run completes a checkpoint with that id; one whose name says
    nothing about its writer stays."""
    storage = _storage(tmp_path, where)

    async def once() -> None:
        config = _config(tmp_path, where, interval=0.02, num_retained=1)
        client = submit(_job(MixedSource([None], rates=[1000.0])), config, job_id=JOB_ID)
        await Watch(storage).watch(client).completed.until(lambda c: c.metadata.is_incremental, within=30)
        await client.cancel()

    run(once())
    latest = storage.latest()
    assert latest is not None
    kept = referenced([latest])
    assert kept
    last = latest.checkpoint_id
    gone = [f"by-chk-{last}/counts/0/keyed-0000000000000000.ksf", "by-chk-1/stray.ksf"]
    in_flight = f"by-chk-{last + 4}/counts/1/keyed-0000000000000000.ksf"
    unnamed = "counts/0/keyed-0000000000000000.ksf"
    shared = f"{storage.job_directory(JOB_ID)}/shared"
    for path in [*gone, in_flight, unnamed]:
        storage.store.put(f"{shared}/{path}", b"written by a checkpoint that never completed", PutMode.CREATE)

    async def started() -> tuple[set[str], set[str]]:
        config = _config(tmp_path, where, interval=0.02, num_retained=1)
        client = submit(_job(MixedSource([None], rates=[1000.0])), config, restore_from=latest, job_id=JOB_ID)
        watch = Watch(storage).watch(client)
        await client._deployed()  # the job recovered its checkpoints and deployed
        at_start = shared_on_storage(storage, JOB_ID)
        await watch.completed.until(lambda c: c.checkpoint_id >= last + 4, within=30)
        later = shared_on_storage(storage, JOB_ID)
        await client.cancel()
        assert watch.problems == []
        return at_start, later

    at_start, later = run(started())
    assert not set(gone) & at_start
    assert {in_flight, unnamed} <= at_start
    assert kept <= at_start
    assert in_flight not in later, "checkpoint 4 after the latest completed: its other writer can never commit"
    assert unnamed in later


@pytest.mark.parametrize(("parallelism", "job_id"), [(3, JOB_ID), (2, OTHER_JOB_ID)], ids=["rescaled", "other-job"])
def test_a_restore_that_cannot_continue_the_chain_checkpoints_full_first(
    tmp_path: Path, parallelism: int, job_id: str
) -> None:
    """From an incremental checkpoint: at another parallelism (same job), or under another job id (same
    parallelism), the restore reads the chain, but the first checkpoint after it writes full bases (docs/
    runtime.md, Incremental checkpoints: the chain continues only for the same job, job directory and
    parallelism, from a checkpoint); the job then goes on exactly once."""
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

    async def restored() -> tuple[Any, Completed]:
        config = _config(tmp_path, None, interval=0.02, num_retained=2)
        job = _job(MixedSource(lengths, rates=[3000.0]), parallelism=parallelism, sink=out)
        client = submit(job, config, restore_from=latest, job_id=job_id)
        after = Completed().watch(client)
        return await client.wait(), after

    result, after = run(restored())
    assert result.status is JobStatus.FINISHED, result.error
    first_new = after.first(lambda c: bool(keyed_handles(c, "counts")))
    assert first_new is not None
    assert len(keyed_handles(first_new, "counts")) == parallelism
    _assert_full(first_new)
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

    async def resume() -> tuple[Any, Completed]:
        config = _config(tmp_path, None, interval=0.02)
        client = submit(_job(MixedSource([None], rates=[1000.0]), sink=out), config, restore_from=relocated)
        completed = Completed().watch(client)
        await completed.until(lambda c: c.metadata.is_incremental, within=30)
        return await client.cancel(), completed

    result, completed = run(resume())
    assert result.status is JobStatus.CANCELED
    _assert_full(completed.checkpoints[0])  # a savepoint never starts a chain
    assert_counts_continue(committed(Path(out)), key=lambda r: r[1] % KEYS)
