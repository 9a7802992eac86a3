"""The FLIP-147 end-to-end scenarios on both executors and both checkpoint storages, incremental checkpoints on.

Every scenario runs four times: executor embedded (``executor=None``) or Ray (docs/ray.md), times
checkpoint storage on local disk or on S3 (boto3 against moto's threaded server on 127.0.0.1, real HTTP;
the ``checkpoints`` fixture). The same job graphs, operators, sources and sinks run unchanged on all four.
Every subtask on Ray lives in its own worker process, so what a test observes crosses processes: committed
output is the files the two-phase-commit sink wrote (always on local disk: the sinks are not what is under
test), lifecycle calls go to a :class:`~tests.runtime.ray.support.FileLog`, and failures are armed through
a :class:`~tests.runtime.ray.support.FileFlag`. The coordinator runs in the test's process on both
executors, so checkpoints are watched there (``Completed``).

Scenarios (docs/flink-rules.md): checkpoints after some tasks finished and finished markers (B, D3-D4),
the final checkpoint (C5-C7), a chain of committers waiting for one final checkpoint, stop-with-savepoint
with and without drain (G1-G6), failover after some tasks finished (E1, E5), restore with
finished-on-restore (E5-E7) and a rescaled restore of a partially finished keyed operator (E6).

Incremental checkpoints (LMDB, ``CheckpointConfig(incremental=True)``) are asserted, not assumed. Every
scenario with keyed state over several checkpoints waits for a checkpoint whose keyed handles have deltas and
checks that it is incremental (deltas, ``is_incremental``, ``incremental_state_bytes < full_state_bytes``)
and that its merged state (base plus deltas, read as a restore reads it) is exactly what its sources had
emitted at it (for the rescaled operator: what its running subtask counted). The checkpoint a failover, a
restore or a rescaled restore starts from is such a checkpoint, and the job that runs from it is
exactly-once; after the failover the restarted attempt extends the restored chains. Chains re-base after
:data:`INCREMENTAL` ``max_chain_length`` deltas (asserted after the bounded branch finished); where a job
restores from whichever checkpoint was newest at that moment, chains never re-base (:data:`NO_REBASE`), so
that checkpoint has deltas. Savepoints, also those taken over incremental chains, are full and
self-contained: nothing under ``shared/``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import (
    JobConfig,
    JobGraph,
    JobResult,
    JobStatus,
    SequenceSource,
    TransactionalFileSink,
    submit,
)
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind, OperatorStatus
from tests.runtime.e2e_support import (
    Completed,
    CountingSource,
    EndedSource,
    Event,
    EventLog,
    FailWhen,
    Flag,
    KeyedCounter,
    MixedSource,
    Recorder,
    RecordingFileSink,
    RunningCount,
    Tally,
    assert_counts_continue,
    assert_exactly,
    assert_prefixes,
    committed,
    expected_mixed,
    run,
    staged,
    status_of,
    wait_for,
)
from tests.runtime.incremental_support import (
    assert_incremental,
    assert_self_contained,
    assert_state_matches_sources,
    has_deltas,
    keyed_handles,
    merged_values,
)
from tests.runtime.ray.support import CheckpointRoot, FileFlag, FileLog, config_on

pytestmark = pytest.mark.timeout(300)  # on Ray every attempt starts a worker process per subtask

RUNNING = OperatorStatus.RUNNING
FULLY = OperatorStatus.FULLY_FINISHED
PARTIAL = OperatorStatus.PARTIALLY_FINISHED
WITHIN = 90.0
"""Seconds a scenario waits for a checkpoint: Ray starts a worker process per subtask first."""

INCREMENTAL: dict[str, Any] = {"incremental": True, "max_chain_length": 3, "max_delta_ratio": 100.0}
"""Incremental keyed snapshots, re-based after 3 deltas. Every key changes between two checkpoints here, so a
delta is about as large as its base: the default ratio (1.0) would re-base after one delta."""
NO_REBASE: dict[str, Any] = {"max_chain_length": 500, "max_delta_ratio": 1000.0}
"""For scenarios that restore from whichever checkpoint was newest: its chain has not just been re-based."""


def _config(executor: Any, tmp_path: Path, checkpoints: CheckpointRoot, **kwargs: Any) -> JobConfig:
    """The scenario's job configuration: ``executor``, checkpoints under ``checkpoints``, :data:`INCREMENTAL`."""
    return config_on(executor, tmp_path, root=checkpoints, **{**INCREMENTAL, **kwargs})


# --- checkpoints after some tasks finished -----------------------------------------------------------------


BOUNDED = [150, 100]


def _bounded_and_unbounded(out: Path) -> JobGraph:
    job = JobGraph("mixed")
    bounded = job.source(MixedSource(BOUNDED), uid="bounded", parallelism=2)
    unbounded = job.source(MixedSource([None, None], first_split=10, rates=[300, 300]), uid="unbounded", parallelism=2)
    b_tally = bounded.key_by(lambda r: r[1] % 7).process(Tally(), uid="bounded-tally", parallelism=2)
    u_tally = unbounded.key_by(lambda r: r[1] % 7).process(Tally(), uid="unbounded-tally", parallelism=2)
    job.operator(
        TransactionalFileSink(str(out)), uid="sink", inputs=[b_tally.rebalance(), u_tally.rebalance()], parallelism=1
    )
    return job


def test_checkpoints_continue_after_bounded_branch_finished(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    out = tmp_path / "out"
    completed = Completed()

    def branch_done(c: CompletedCheckpoint) -> bool:
        return status_of(c, "bounded") is FULLY and status_of(c, "bounded-tally") is FULLY

    def rebased_after(earlier: CompletedCheckpoint) -> Any:
        # Every subtask's chain starts at a base written after ``earlier``: each re-based (max_chain_length).
        def rebased(c: CompletedCheckpoint) -> bool:
            bases = [k.stream.written_by or 0 for k in keyed_handles(c, "unbounded-tally")]
            return len(bases) == 2 and min(bases) > earlier.checkpoint_id

        return rebased

    async def scenario() -> tuple[CompletedCheckpoint, ...]:
        config = _config(executor, tmp_path, checkpoints, interval=0.05, num_retained=50)
        client = submit(_bounded_and_unbounded(out), config)
        completed.watch(client)
        first = await completed.until(branch_done, within=WITHIN)
        later = await completed.until(lambda c: c.checkpoint_id > first.checkpoint_id + 1, within=WITHIN)
        after = lambda c: c.checkpoint_id > first.checkpoint_id and has_deltas(c, "unbounded-tally")  # noqa: E731
        incremental = await completed.until(after, within=WITHIN)
        rebased = await completed.until(rebased_after(incremental), within=WITHIN)
        savepoint = await client.stop_with_savepoint(drain=True)
        assert (await client.wait()).status is JobStatus.FINISHED
        return first, later, incremental, rebased, savepoint

    first, later, incremental, rebased, savepoint = run(scenario())
    for checkpoint in (first, later, incremental, rebased):
        for uid in ("unbounded", "unbounded-tally", "sink"):
            assert status_of(checkpoint, uid) is RUNNING, uid
        finished = checkpoint.metadata.operator("bounded-tally")
        assert finished is not None
        assert finished.subtasks == ()
        running = checkpoint.metadata.operator("unbounded-tally")
        assert running is not None
        assert running.has_keyed_state, "the workers' keyed state files are in the checkpoint"
        assert {s.index for s in running.subtasks} == {0, 1}
    assert_incremental(incremental, "unbounded-tally")
    for checkpoint in (incremental, rebased):
        assert_state_matches_sources(checkpoint, "unbounded-tally", "unbounded", lambda r: r[1] % 7, first_split=10)
    assert_self_contained(savepoint)
    checkpoints.assert_holds(*completed.checkpoints)
    output = committed(out)
    assert_exactly([r for r in output if r[0] < 10], expected_mixed(BOUNDED))
    lengths = assert_prefixes([r for r in output if r[0] >= 10], [10, 11])
    assert all(n > 0 for n in lengths.values())
    assert staged(out) == []


def test_partially_finished_source_gets_finished_markers(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    out = tmp_path / "out"
    completed = Completed()
    job = JobGraph("partial")
    # Parallelism 3 over 2 splits: subtask 2 has nothing to read and finishes at once; map[2] (forward) too.
    numbers = job.source(SequenceSource(None, splits=2, rate=300), uid="numbers", parallelism=3)
    numbers.map(lambda n: n, uid="map", parallelism=3).sink(TransactionalFileSink(str(out)), uid="sink")

    def partial(c: CompletedCheckpoint) -> bool:
        return status_of(c, "numbers") is PARTIAL and status_of(c, "map") is PARTIAL

    async def scenario() -> tuple[CompletedCheckpoint, CompletedCheckpoint, JobStatus]:
        client = submit(job, _config(executor, tmp_path, checkpoints, interval=0.05))
        completed.watch(client)
        checkpoint = await completed.until(partial, within=WITHIN)
        await completed.until(lambda c: c.checkpoint_id > checkpoint.checkpoint_id, within=WITHIN)
        savepoint = await client.stop_with_savepoint(drain=True)
        return checkpoint, savepoint, (await client.wait()).status

    checkpoint, savepoint, status = run(scenario())
    assert status is JobStatus.FINISHED
    for uid in ("numbers", "map"):
        op = checkpoint.metadata.operator(uid)
        assert op is not None, uid
        assert op.finished_subtasks == [2], uid
        marker = op.subtask(2)
        assert marker is not None
        assert marker.finished
        assert not list(marker.handles())
    assert status_of(checkpoint, "sink") is RUNNING
    # No keyed state: incremental snapshots have nothing to build on, every checkpoint is full.
    assert not [c for c in completed.checkpoints if c.metadata.is_incremental]
    assert_self_contained(savepoint)
    checkpoints.assert_holds(*completed.checkpoints)
    assert_prefixes([[n % 2, n // 2] for n in committed(out)], [0, 1])


# --- the final checkpoint ------------------------------------------------------------------------------------


COUNT = 300


async def _run_watched(job: JobGraph, config: JobConfig, completed: Completed) -> JobResult:
    client = submit(job, config)
    completed.watch(client)
    return await client.wait()


def test_huge_interval_finishes_with_one_immediate_final_checkpoint(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    job = JobGraph("immediate")
    for name in ("a", "b"):
        numbers = job.source(SequenceSource(COUNT, splits=3), uid=f"{name}-source", parallelism=2)
        keyed = numbers.key_by(lambda n: n % 10).process(Tally(), uid=f"{name}-keyed", parallelism=2)
        keyed.sink(TransactionalFileSink(str(tmp_path / name)), uid=f"{name}-sink", parallelism=1)
    completed = Completed()
    started = time.monotonic()
    result = run(_run_watched(job, _config(executor, tmp_path, checkpoints, interval=3600), completed))
    assert result.status is JobStatus.FINISHED, result.error
    assert time.monotonic() - started < WITHIN, "the job waited for a periodic checkpoint"
    assert result.checkpoints == 1, "exactly the immediate final checkpoint"
    (final,) = completed.checkpoints
    assert not final.metadata.is_incremental, "the only checkpoint has nothing to build on"
    checkpoints.assert_holds(final)
    for name in ("a", "b"):
        assert_exactly(committed(tmp_path / name), list(range(COUNT)))
        assert staged(tmp_path / name) == []


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


def test_chain_of_committers_waits_for_one_final_checkpoint(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    log = FileLog(tmp_path / "events.jsonl")
    job = JobGraph("chain")
    stream = job.source(SequenceSource(COUNT, splits=2), uid="numbers", parallelism=2)
    for k in range(3):
        stream = stream.transform(CommittingMap(str(tmp_path / f"out-{k}"), log), uid=f"commit-{k}", parallelism=1)
    completed = Completed()
    result = run(_run_watched(job, _config(executor, tmp_path, checkpoints, interval=3600), completed))
    assert result.status is JobStatus.FINISHED, result.error
    assert result.checkpoints == 1
    finals = {_finals(log, f"commit-{k}")[0] for k in range(3)}
    assert len(finals) == 1, f"the committing operators used different final checkpoints: {finals}"
    (final,) = finals
    assert [c.checkpoint_id for c in completed.checkpoints] == [final]
    checkpoints.assert_holds(*completed.checkpoints)
    for k in range(3):
        assert _finals(log, f"commit-{k}")[1] == [final], f"commit-{k}"
        assert_exactly(committed(tmp_path / f"out-{k}"), list(range(COUNT)))
        assert staged(tmp_path / f"out-{k}") == []


# --- stop-with-savepoint -------------------------------------------------------------------------------------


LENGTHS = [600, 600]
RECORDED = (("map", 2), ("sink", 1))


def _key(record: list[int]) -> int:
    return record[1] % 5


def _stop_job(out: Path, log: EventLog, lengths: list[int | None], rate: float = 600.0) -> JobGraph:
    job = JobGraph("stop")
    source = job.source(MixedSource(lengths, rates=[rate, rate]), uid="source", parallelism=2)
    mapped = source.transform(Recorder(log), uid="map", parallelism=2)
    counts = mapped.key_by(_key).process(RunningCount(), uid="counts", parallelism=2)
    counts.sink(RecordingFileSink(str(out), log), uid="sink", parallelism=1)
    return job


def _after(events: list[Event], checkpoint_id: int) -> list[tuple[str, Any]]:
    """``(name, arg)`` of ``events`` without (asynchronous) notifications of checkpoints before ``checkpoint_id``."""
    return [(e.name, e.arg) for e in events if not (e.name == "notify_checkpoint_complete" and e.arg < checkpoint_id)]


def test_stop_with_savepoint_drain_commits_everything(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    log = FileLog(tmp_path / "events.jsonl")
    out = tmp_path / "out"
    completed = Completed()

    async def scenario() -> tuple[CompletedCheckpoint, CompletedCheckpoint, JobStatus]:
        # Retained until the end: the test reads ``incremental`` after the job ended, and by then a re-base
        # (after 3 deltas) could have subsumed it and deleted its shared files.
        config = _config(executor, tmp_path, checkpoints, interval=0.05, num_retained=20)
        client = submit(_stop_job(out, log, [None, None]), config)
        completed.watch(client)
        incremental = await completed.until(lambda c: has_deltas(c, "counts"), within=WITHIN)
        savepoint = await client.stop_with_savepoint(drain=True)
        return incremental, savepoint, (await client.wait()).status

    incremental, savepoint, status = run(scenario())
    assert status is JobStatus.FINISHED
    assert_incremental(incremental, "counts")
    assert_state_matches_sources(incremental, "counts", "source", _key)
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    assert savepoint.metadata.properties.drain
    assert_self_contained(savepoint)
    checkpoints.assert_holds(*completed.checkpoints, savepoint)
    for uid, parallelism in RECORDED:
        for index in range(parallelism):
            events = log.of(uid, index)
            names = [e.name for e in events]
            fin = names.index("finish")
            assert names.index("end_input") < fin, f"{uid}[{index}]: {names[-8:]}"
            assert _after(events[fin + 1 :], savepoint.checkpoint_id) == [
                ("snapshot_state", savepoint.checkpoint_id),
                ("notify_checkpoint_complete", savepoint.checkpoint_id),
                ("close", None),
            ], f"{uid}[{index}]: {names[-8:]}"
    output = committed(out)
    assert_exactly(output, [e.arg for e in log.of("sink") if e.name == "process"])
    assert len(output) > 0
    assert_counts_continue(output, _key)
    assert staged(out) == []


def test_stop_without_drain_then_resume_exactly_where_stopped(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    log = FileLog(tmp_path / "first.jsonl")
    out = tmp_path / "out"
    completed = Completed()
    config = _config(executor, tmp_path, checkpoints, interval=0.05)

    async def first_run() -> tuple[CompletedCheckpoint, CompletedCheckpoint]:
        # 12 s of input at this rate: the job is stopped well before its end, even on a loaded machine.
        client = submit(_stop_job(out, log, list(LENGTHS), rate=50.0), config)
        completed.watch(client)
        await wait_for(lambda: sum(e.name == "process" for e in log.of("sink")) > 60, within=WITHIN, what="output")
        incremental = await completed.until(lambda c: has_deltas(c, "counts"), within=WITHIN)
        savepoint = await client.stop_with_savepoint(drain=False)
        assert (await client.wait()).status is JobStatus.FINISHED
        return incremental, savepoint

    incremental, savepoint = run(first_run())
    assert_incremental(incremental, "counts")
    assert not savepoint.metadata.properties.drain
    # Taken from incremental chains, the savepoint is full and holds exactly the state at its barrier.
    assert_self_contained(savepoint)
    assert_state_matches_sources(savepoint, "counts", "source", _key)
    checkpoints.assert_holds(*completed.checkpoints, savepoint)
    for uid, parallelism in RECORDED:
        for index in range(parallelism):
            names = log.names(uid, index)
            assert not {"end_input", "finish"} & set(names), f"{uid}[{index}] drained: {names[-8:]}"
            assert names[-1] == "close", f"{uid}[{index}]: {names[-8:]}"
    stopped_at = committed(out)
    assert 0 < len(stopped_at) < sum(LENGTHS), "the first run must stop part way"

    second = FileLog(tmp_path / "second.jsonl")

    async def second_run() -> JobStatus:
        job = _stop_job(out, second, list(LENGTHS), rate=3000.0)  # rates are not state
        client = submit(job, config, restore_from=savepoint.location)
        return (await client.wait()).status

    assert run(second_run()) is JobStatus.FINISHED
    output = committed(out)
    assert_exactly([r[:2] for r in output], expected_mixed(LENGTHS))
    assert_counts_continue(output, _key)
    resumed = [e.arg for e in second.of("map") if e.name == "process"]
    assert_exactly(resumed + [r[:2] for r in stopped_at], expected_mixed(LENGTHS))
    assert staged(out) == []


# --- failover ------------------------------------------------------------------------------------------------


A_OPERATORS = ("a-source", "a-pass", "a-sink")


def test_failover_after_some_tasks_finished_is_exactly_once(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    log = FileLog(tmp_path / "events.jsonl")
    readers = FileLog(tmp_path / "readers.jsonl")
    armed, fired = FileFlag(tmp_path / "armed"), FileFlag(tmp_path / "fired")
    completed = Completed()
    by_attempt: dict[int, list[CompletedCheckpoint]] = {0: [], 1: []}
    job = JobGraph("failover-after-finish")
    a = job.source(CountingSource([25, 15], readers), uid="a-source", parallelism=2)
    a.transform(Recorder(log), uid="a-pass", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out-a"), log), uid="a-sink"
    )
    b = job.source(MixedSource([None], rates=[600.0], first_split=10), uid="b-source", parallelism=1)
    b.transform(FailWhen(armed, fired), uid="b-fail").key_by(lambda r: r[1] % 3).process(
        RunningCount(), uid="b-count", parallelism=2
    ).sink(TransactionalFileSink(str(tmp_path / "out-b")), uid="b-sink")

    async def scenario() -> tuple[int, JobStatus, CompletedCheckpoint]:
        client = submit(job, _config(executor, tmp_path, checkpoints, interval=0.05, **NO_REBASE))
        completed.watch(client)
        # A checkpoint completes while attempt n runs (the coordinator settles before the next attempt).
        client.coordinator.listeners.append(lambda c: by_attempt.setdefault(client.attempt, []).append(c))
        finished = await completed.until(lambda c: all(status_of(c, u) is FULLY for u in A_OPERATORS), within=WITHIN)
        after = lambda c: c.checkpoint_id > finished.checkpoint_id and has_deltas(c, "b-count")  # noqa: E731
        await completed.until(after, within=WITHIN)
        armed.value = 1
        await wait_for(lambda: fired.value == 1, within=WITHIN, what="the injected failure")
        last = completed.checkpoints[-1].checkpoint_id
        await completed.until(lambda c: c.checkpoint_id > last + 1, within=WITHIN)  # the restarted attempt
        await client.stop_with_savepoint(drain=True)
        result = await client.wait()
        return result.attempts, result.status, finished

    attempts, status, finished = run(scenario())
    assert status is JobStatus.FINISHED
    assert attempts == 2
    assert not [e for e in log.events if e.attempt > 0], "pipeline A was finished-on-restore, it never ran again"
    assert sorted(e.index for e in readers.events) == [0, 1], "each A split was read once"
    after = [c for c in completed.checkpoints if c.checkpoint_id > finished.checkpoint_id]
    assert all(status_of(c, u) is FULLY for c in after for u in A_OPERATORS)
    # The failover restored the newest checkpoint of attempt 0: incremental, and exactly its sources' state.
    restored_from = max(by_attempt[0], key=lambda c: c.checkpoint_id)
    assert_incremental(restored_from, "b-count")
    assert_state_matches_sources(restored_from, "b-count", "b-source", lambda r: r[1] % 3, first_split=10)
    # Attempt 1 continued the restored chains: its first checkpoint's deltas extend them.
    continued = min((c for c in by_attempt[1] if c.kind is CheckpointKind.CHECKPOINT), key=lambda c: c.checkpoint_id)
    for old, new in zip(keyed_handles(restored_from, "b-count"), keyed_handles(continued, "b-count"), strict=True):
        chain = list(old.streams())
        assert list(new.streams())[: len(chain)] == chain, f"{continued} re-based {old.key_groups}"
    checkpoints.assert_holds(*completed.checkpoints)
    assert_exactly(committed(tmp_path / "out-a"), expected_mixed([25, 15]))
    output = committed(tmp_path / "out-b")
    assert assert_prefixes([r[:2] for r in output], [10])[10] > 0
    assert_counts_continue(output, lambda r: r[1] % 3)


# --- restore -------------------------------------------------------------------------------------------------


A_LENGTHS = [30, 20]
B_LENGTHS = [1000]


def _two_pipelines(tmp_path: Path, log: EventLog, readers: EventLog, *, b_rate: float | None = 200.0) -> JobGraph:
    job = JobGraph("two-pipelines")
    a = job.source(CountingSource(A_LENGTHS, readers), uid="a-source", parallelism=2)
    a.transform(Recorder(log), uid="a-pass", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out-a"), log), uid="a-sink", parallelism=1
    )
    b = job.source(MixedSource(B_LENGTHS, rates=[b_rate], first_split=10), uid="b-source", parallelism=1)
    b.key_by(lambda r: r[1] % 4).process(RunningCount(), uid="b-keyed", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out-b"), log), uid="b-sink", parallelism=1
    )
    return job


def test_restore_after_some_tasks_finished_deploys_them_finished(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    first_log = FileLog(tmp_path / "first.jsonl")
    readers = FileLog(tmp_path / "readers.jsonl")
    completed = Completed()
    config = _config(executor, tmp_path, checkpoints, interval=0.05, **NO_REBASE)

    async def first_run() -> CompletedCheckpoint:
        client = submit(_two_pipelines(tmp_path, first_log, readers), config)
        completed.watch(client)
        finished = await completed.until(lambda c: all(status_of(c, u) is FULLY for u in A_OPERATORS), within=WITHIN)
        after = lambda c: c.checkpoint_id > finished.checkpoint_id and has_deltas(c, "b-keyed")  # noqa: E731
        await completed.until(after, within=WITHIN)
        await client.cancel()
        latest = client.coordinator.latest_checkpoint
        assert latest is not None
        return latest

    latest = run(first_run())
    assert all(status_of(latest, uid) is FULLY for uid in A_OPERATORS)
    assert_incremental(latest, "b-keyed")
    assert_state_matches_sources(
        latest, "b-keyed", "b-source", lambda r: r[1] % 4, first_split=10, lengths={"split-0": 1000}
    )
    checkpoints.assert_holds(*completed.checkpoints)
    assert 0 < len(committed(tmp_path / "out-b")) < sum(B_LENGTHS)
    readers_before = len(readers.events)

    second_log = FileLog(tmp_path / "second.jsonl")
    restored = Completed()

    async def second_run() -> JobStatus:
        job = _two_pipelines(tmp_path, second_log, readers, b_rate=None)
        client = submit(job, config, restore_from=latest.location)
        restored.watch(client)
        return (await client.wait()).status

    assert run(second_run()) is JobStatus.FINISHED
    assert not [e for e in second_log.events if e.uid in A_OPERATORS], "finished-on-restore ran operator code"
    assert len(readers.events) == readers_before, "a finished split was read again"
    assert restored.checkpoints
    for checkpoint in restored.checkpoints:
        assert all(status_of(checkpoint, uid) is FULLY for uid in A_OPERATORS), checkpoint
    assert_exactly(committed(tmp_path / "out-a"), expected_mixed(A_LENGTHS))
    output = committed(tmp_path / "out-b")
    assert_exactly([r[:2] for r in output], expected_mixed(B_LENGTHS, first_split=10))
    assert_counts_continue(output, lambda r: r[1] % 4)
    assert staged(tmp_path / "out-b") == []


def _partial_keyed_job(log: EventLog, parallelism: int, end: Flag) -> JobGraph:
    job = JobGraph("partial-keyed")
    # Paced, and ended by the test once the running subtask's state changed across checkpoints (deltas).
    keyed_input = job.source(EndedSource(2, end, rates=[300.0, 300.0]), uid="bounded", parallelism=2)
    # Split 0 ends after 30 records, split 1 never: pointwise, keeper[0] finishes and keeper[1] runs.
    keeper = job.source(MixedSource([30, None], first_split=10), uid="keeper", parallelism=2)
    job.operator(
        KeyedCounter(log),
        uid="counter",
        inputs=[keyed_input.key_by(lambda r: r[1] % 10), keeper.rescale()],
        parallelism=parallelism,
    )
    return job


def test_rescale_restore_of_partially_finished_keyed_operator(
    tmp_path: Path, executor: Any, checkpoints: CheckpointRoot
) -> None:
    log = FileLog(tmp_path / "first.jsonl")
    end = FileFlag(tmp_path / "end")
    completed = Completed()
    config = _config(executor, tmp_path, checkpoints, interval=0.05, num_retained=20, **NO_REBASE)

    def running_has_deltas(c: CompletedCheckpoint) -> bool:
        op = c.metadata.operator("counter")
        running = op.subtask(1) if op is not None else None
        return running is not None and any(k.deltas for k in running.keyed)

    def partial(c: CompletedCheckpoint) -> bool:
        return status_of(c, "counter") is PARTIAL and status_of(c, "bounded") is FULLY

    async def first_run() -> CompletedCheckpoint:
        client = submit(_partial_keyed_job(log, 2, end), config)
        completed.watch(client)
        await completed.until(running_has_deltas, within=WITHIN)
        end.value = 1  # the keyed input ends: counter[0] finishes, counter[1] keeps its chain (no re-base)
        checkpoint = await completed.until(partial, within=WITHIN)
        await client.cancel()
        return checkpoint

    checkpoint = run(first_run())
    counter = checkpoint.metadata.operator("counter")
    assert counter is not None
    assert counter.finished_subtasks == [0]
    assert counter.has_keyed_state
    assert_incremental(checkpoint, "counter")
    checkpoints.assert_holds(*completed.checkpoints)
    per_subtask = {i: Counter(e.arg for e in log.of("counter", i) if e.name == "counted") for i in range(2)}
    assert per_subtask[0], "both subtasks must have owned keys for the test to mean anything"
    assert per_subtask[1], "both subtasks must have owned keys for the test to mean anything"
    # Only the running subtask's state is in the checkpoint (rule E6), base plus deltas.
    assert merged_values(checkpoint, "counter") == dict(per_subtask[1])

    second = FileLog(tmp_path / "second.jsonl")

    async def second_run() -> None:
        client = submit(_partial_keyed_job(second, 3, end), config, restore_from=checkpoint.location)
        opened = lambda: {e.index for e in second.events if e.name == "open"} == {0, 1, 2}  # noqa: E731
        await wait_for(opened, within=WITHIN, what="three subtasks opened")
        await client.cancel()

    run(second_run())
    restored = [e for e in second.events if e.name == "restored"]
    keys = [e.arg[0] for e in restored]
    assert len(keys) == len(set(keys)), f"a key was restored into two subtasks: {sorted(keys)}"
    # Only the running subtask's state survives (rule E6); the finished subtask's keys start empty.
    assert dict(e.arg for e in restored) == dict(per_subtask[1])
