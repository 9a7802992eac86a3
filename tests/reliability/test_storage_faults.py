"""Storage faults under a running job: retried when transient, contained when persistent, one winner per id.

* Transient failures (throttling of state uploads and of the ``_metadata`` put, a timeout after the
  ``_metadata`` PUT landed, a commit whose outcome stays unknown for a while) are retried and the
  checkpoint completes: locally through the runtime's retry layer, on S3 (moto's server) through
  botocore's own retries.
* Persistent failures abort that one checkpoint: counted toward the tolerance, earlier checkpoints
  intact and readable, the aborted checkpoint's files gone, the job going on (or failing with
  "Exceeded checkpoint tolerable failure threshold." past the tolerance).
* Two jobs with one job id on one storage commit the same checkpoint id at the same moment: exactly
  one wins, the loser's abort never touches the winner's files, locally and on S3.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import (
    CheckpointFailureReason,
    JobGraph,
    JobResult,
    JobStatus,
    TransactionalFileSink,
    faults,
    submit,
)
from keystate.runtime.config import CheckpointConfig, JobConfig, RestartStrategy
from keystate.runtime.coordinator import CheckpointCoordinator, SubtaskSnapshot
from keystate.runtime.events import CheckpointOptions
from keystate.runtime.plan import SubtaskId, SubtaskStatus
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CompletedCheckpoint,
    DistributionMode,
    ObjectStore,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    PutMode,
    S3ObjectStore,
    SubtaskState,
    open_storage,
)
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
from keystate.storage.format.topology import Topology, TopologyOperator
from keystate.storage.retry import RetryPolicy
from keystate.storage.s3faults import S3FaultInjector, S3FaultRule
from tests.runtime.e2e_support import (
    Completed,
    Flag,
    HeldSource,
    MixedSource,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    committed,
    run,
    wait_for,
)

JOB_ID = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"
LENGTHS = [150, 150]
KEYS = 4
THRESHOLD = "Exceeded checkpoint tolerable failure threshold."
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.005)
PATIENT = RetryPolicy(max_attempts=12, initial_backoff=0.001, max_backoff=0.01)
"""More attempts than any transient rule below injects in a row."""


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    faults.disarm()
    yield
    faults.disarm()


def graph(out: Path, release: Flag | None = None) -> JobGraph:
    """The job under test; with ``release``, its sources end only once ``release`` is set."""
    job = JobGraph("storage-faults")
    rates: list[float | None] = [500.0, 500.0]
    mixed = MixedSource(LENGTHS, rates=rates) if release is None else HeldSource(LENGTHS, release, rates=rates)
    source = job.source(mixed, uid="src", parallelism=2)
    counts = source.key_by(lambda r: r[1] % KEYS).process(RunningCount(), uid="count", parallelism=2)
    counts.sink(TransactionalFileSink(str(out)), uid="sink")
    return job


def config(
    root: str,
    wrap: Callable[[ObjectStore], ObjectStore] | None,
    *,
    tolerable: int = 0,
    retry: RetryPolicy | None = FAST,
    endpoint: str | None = None,
) -> JobConfig:
    return JobConfig(
        checkpoint=CheckpointConfig(
            interval=0.03,
            storage=root,
            tolerable_failed_checkpoints=tolerable,
            num_retained=20,
            inline_threshold=256,  # real state files, so state uploads can fail
            # Full snapshots, so every state file of checkpoint 3 lies under chk-3/ where the fault rules
            # match it; the incremental path (under shared/) is tested by the crash campaigns and test_e2e_incremental.
            incremental=False,
            wrap_store=wrap,
            retry=retry,
            endpoint_url=endpoint,
        ),
        restart=RestartStrategy(max_attempts=0, delay=0.05),
        channel_capacity=4,
        batch_size=16,
    )


def run_job(out: Path, cfg: JobConfig, *, through: int = 5) -> tuple[JobResult, Completed]:
    """Run :func:`graph` writing to ``out``; its sources end once checkpoint ``through`` completed or failed.

    Holding the end makes every test see checkpoints 1..``through`` however loaded the machine is.
    """
    completed = Completed()
    release = Flag()

    def reached() -> bool:
        seen = [c.checkpoint_id for c in completed.checkpoints] + [i for i, _, _ in completed.failures]
        return max(seen, default=0) >= through

    async def hold() -> None:
        try:
            await wait_for(reached, within=30.0, what=f"checkpoint {through}")
        finally:
            release.value = 1

    async def scenario() -> JobResult:
        client = submit(graph(out, release), cfg, job_id=JOB_ID)
        completed.watch(client)
        holder = asyncio.ensure_future(hold())
        try:
            return await client.wait()
        finally:
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)

    return run(scenario()), completed


def assert_output(out: Path) -> None:
    records = committed(out)
    assert_exactly([r[:2] for r in records], [[s, n] for s, length in enumerate(LENGTHS) for n in range(length)])
    assert_counts_continue(records, key=lambda r: r[1] % KEYS)


def assert_readable(checkpoints: list[CompletedCheckpoint], root: str, endpoint: str | None = None) -> None:
    """Every checkpoint loads again from storage and every handle verifies (sizes and checksums)."""
    storage = open_storage(root, endpoint_url=endpoint)
    for checkpoint in checkpoints:
        loaded = storage.load(checkpoint.directory)
        for handle in loaded.metadata.handles():
            loaded.open_state(handle).verify()


def local_faults(*rules: FaultRule) -> tuple[FaultyObjectStore, Callable[[ObjectStore], ObjectStore]]:
    holder: list[FaultyObjectStore] = []

    def wrap(store: ObjectStore) -> ObjectStore:
        holder.append(FaultyObjectStore(store, rules, seed=3))
        return holder[0]

    class Proxy:
        """The faulty store created when the job starts (the test reads its record afterwards)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(holder[0], name)

    return Proxy(), wrap  # type: ignore[return-value]


def chk_dir(root: Path, checkpoint_id: int) -> Path:
    return root / JOB_ID / f"chk-{checkpoint_id}"


# --- transient failures: retried, the checkpoint completes ----------------------------------------------


TRANSIENT = {
    "throttled state uploads": [
        FaultRule(Fault.THROTTLE, {"open_writer", "write", "close"}, key="*.ksf", times=8),
        FaultRule(Fault.INTERNAL_ERROR, {"open_writer", "close"}, key="*.ksf", times=3),
    ],
    "throttled metadata put": [FaultRule(Fault.THROTTLE, "put", key="*/_metadata", times=9)],
    "timeout after the metadata put landed": [
        FaultRule(Fault.TIMEOUT_AFTER_WRITE, "put", key="*/_metadata", times=2),
        FaultRule(Fault.TIMEOUT_AFTER_WRITE, "put", key="*/_metadata", probability=0.5),
    ],
    "connection resets": [
        FaultRule(Fault.CONNECTION_RESET, "put", key="*/_metadata", times=3),
        FaultRule(Fault.CONNECTION_RESET, {"put", "get", "size", "exists", "open_writer", "close"}, probability=0.25),
    ],
}


@pytest.mark.parametrize("rules", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_failures_are_retried_and_checkpoints_complete(tmp_path: Path, rules: list[FaultRule]) -> None:
    faulty, wrap = local_faults(*rules)
    result, completed = run_job(tmp_path / "out", config(str(tmp_path / "ckpt"), wrap, retry=PATIENT))
    assert result.status is JobStatus.FINISHED, result.error
    assert faulty.count() > 0, "faults were injected"
    assert completed.failures == [], "every fault was retried away"
    assert len(completed.checkpoints) >= 3
    assert_readable(completed.checkpoints, str(tmp_path / "ckpt"))
    assert_output(tmp_path / "out")


def test_unknown_commit_outcome_is_resolved_by_committing_the_same_bytes_again(tmp_path: Path) -> None:
    # Every attempt of the retry layer fails on the PUT (it may have landed) and on the read-back:
    # the commit's outcome is unknown, and the coordinator commits the same bytes again.
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.005)
    faulty, wrap = local_faults(
        FaultRule(Fault.CONNECTION_RESET, "put", key="*/chk-2/_metadata", times=2),
        FaultRule(Fault.THROTTLE, "get", key="*/chk-2/_metadata", times=2),
    )
    result, completed = run_job(tmp_path / "out", config(str(tmp_path / "ckpt"), wrap, retry=retry))
    assert result.status is JobStatus.FINISHED, result.error
    assert faulty.count(Fault.CONNECTION_RESET) == 2
    assert 2 in [c.checkpoint_id for c in completed.checkpoints]
    assert completed.failures == []
    assert_output(tmp_path / "out")


def test_commit_outcome_that_stays_unknown_fails_the_job_and_keeps_the_files(tmp_path: Path) -> None:
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.005)
    _, wrap = local_faults(
        FaultRule(Fault.CONNECTION_RESET, "put", key="*/chk-3/_metadata"),
        FaultRule(Fault.THROTTLE, "get", key="*/chk-3/_metadata"),
    )
    root = tmp_path / "ckpt"
    result, completed = run_job(tmp_path / "out", config(str(root), wrap, retry=retry, tolerable=5))
    assert result.status is JobStatus.FAILED
    assert "unknown outcome" in str(result.error)
    assert [c.checkpoint_id for c in completed.checkpoints] == [1, 2]
    assert chk_dir(root, 3).is_dir(), "the files of a checkpoint that may be complete are kept"
    assert not (chk_dir(root, 3) / "_metadata").exists()
    assert_readable(completed.checkpoints, str(root))


# --- persistent failures: that checkpoint aborts, the rest is untouched ----------------------------------


PERSISTENT = {
    "state upload": (
        FaultRule(Fault.THROTTLE, {"open_writer", "put"}, key="*/chk-3/count/1/*"),
        CheckpointFailureReason.CHECKPOINT_ASYNC_EXCEPTION,
    ),
    "metadata put": (
        FaultRule(Fault.INTERNAL_ERROR, "put", key="*/chk-3/_metadata"),
        CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE,
    ),
}


@pytest.mark.parametrize(("rule", "reason"), PERSISTENT.values(), ids=PERSISTENT.keys())
def test_persistent_failure_aborts_one_checkpoint_and_the_job_goes_on(
    tmp_path: Path, rule: FaultRule, reason: CheckpointFailureReason
) -> None:
    root = tmp_path / "ckpt"
    faulty, wrap = local_faults(rule)
    result, completed = run_job(tmp_path / "out", config(str(root), wrap, tolerable=1))
    assert result.status is JobStatus.FINISHED, result.error
    ids = [c.checkpoint_id for c in completed.checkpoints]
    assert [(i, r) for i, r, _ in completed.failures] == [(3, reason)], (ids, completed.failures)
    assert faulty.count() >= FAST.max_attempts, "retried before giving up"
    assert 3 not in ids
    assert [i for i in ids if i < 3] == [1, 2]
    assert any(i > 3 for i in ids), "checkpoints went on after the failure"
    assert not chk_dir(root, 3).exists(), "the aborted checkpoint's files are removed"
    assert_readable(completed.checkpoints, str(root))
    assert_output(tmp_path / "out")


@pytest.mark.parametrize(("rule", "reason"), PERSISTENT.values(), ids=PERSISTENT.keys())
def test_persistent_failure_past_the_tolerance_fails_the_job(
    tmp_path: Path, rule: FaultRule, reason: CheckpointFailureReason
) -> None:
    root = tmp_path / "ckpt"
    _, wrap = local_faults(rule)
    result, completed = run_job(tmp_path / "out", config(str(root), wrap, tolerable=0))
    assert result.status is JobStatus.FAILED
    assert str(result.error).startswith(THRESHOLD)
    assert [(i, r) for i, r, _ in completed.failures if r is not CheckpointFailureReason.JOB_FAILOVER] == [(3, reason)]
    assert [c.checkpoint_id for c in completed.checkpoints] == [1, 2]
    assert not chk_dir(root, 3).exists()
    assert_readable(completed.checkpoints, str(root))


# --- S3 (moto's server): botocore retries, the same containment -------------------------------------------


def s3_faults(*rules: S3FaultRule) -> tuple[S3FaultInjector, Callable[[ObjectStore], ObjectStore]]:
    injector = S3FaultInjector(rules, seed=5)

    def wrap(store: ObjectStore) -> ObjectStore:
        assert isinstance(store, S3ObjectStore)
        injector.install(store.client)
        return store

    return injector, wrap


def s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    store = S3ObjectStore(bucket, endpoint_url=endpoint)
    return [o.key for o in store.list_objects(prefix)]


@pytest.mark.usefixtures("s3_backoffs")
def test_s3_transient_failures_are_retried_by_botocore(tmp_path: Path, moto_endpoint: str, server_bucket: str) -> None:
    injector, wrap = s3_faults(
        S3FaultRule(Fault.THROTTLE, "PutObject", key="*.ksf", times=6),
        S3FaultRule(Fault.INTERNAL_ERROR, "PutObject", key="*/_metadata", times=3),
        S3FaultRule(Fault.TIMEOUT_AFTER_WRITE, "PutObject", key="*/chk-2/_metadata", times=1),
        S3FaultRule(Fault.CONNECTION_RESET, {"GetObject", "HeadObject"}, times=3),
    )
    root = f"s3://{server_bucket}/ckpt"
    result, completed = run_job(tmp_path / "out", config(root, wrap, endpoint=moto_endpoint))
    assert result.status is JobStatus.FINISHED, result.error
    assert len(injector.injected) >= 10
    assert "timeout_after_write" in [f.what for f in injector.injected]
    assert completed.failures == []
    assert 2 in [c.checkpoint_id for c in completed.checkpoints]
    assert_readable(completed.checkpoints, root, moto_endpoint)
    assert_output(tmp_path / "out")


@pytest.mark.usefixtures("s3_backoffs")
def test_s3_persistent_failure_aborts_one_checkpoint(tmp_path: Path, moto_endpoint: str, server_bucket: str) -> None:
    _, wrap = s3_faults(S3FaultRule(Fault.THROTTLE, "PutObject", key="*/chk-3/_metadata"))
    root = f"s3://{server_bucket}/ckpt"
    result, completed = run_job(tmp_path / "out", config(root, wrap, tolerable=1, endpoint=moto_endpoint))
    assert result.status is JobStatus.FINISHED, result.error
    assert [(i, r) for i, r, _ in completed.failures] == [(3, CheckpointFailureReason.FINALIZE_CHECKPOINT_FAILURE)]
    assert s3_keys(moto_endpoint, server_bucket, f"ckpt/{JOB_ID}/chk-3") == [], "the aborted checkpoint is gone"
    assert s3_keys(moto_endpoint, server_bucket, f"ckpt/{JOB_ID}/chk-2"), "earlier ones are kept"
    assert_readable(completed.checkpoints, root, moto_endpoint)
    assert_output(tmp_path / "out")


# --- two coordinators, one checkpoint id ------------------------------------------------------------------


def test_two_writers_of_one_checkpoint_id_never_destroy_each_other(tmp_path: Path) -> None:
    # Another writer of the same id (a second coordinator of the same job) aborts while this one is
    # still writing: the abort removes only its own files, and this one's checkpoint completes whole.
    storage = open_storage(str(tmp_path / "ckpt"))
    mine, theirs = storage.begin_checkpoint(JOB_ID, 7), storage.begin_checkpoint(JOB_ID, 7)
    handles = []
    for writer in (mine, theirs):
        with writer.open_stream("op/0/operator") as stream:
            stream.write(os.urandom(30_000))
            handles.append(stream.close())
    theirs.abort()
    entry = OperatorStateEntry("s", DistributionMode.SPLIT, (0,), "bytes")
    state = OperatorState(
        "op", 1, 128, subtasks=(SubtaskState(0, operator=(OperatorStateHandle((entry,), handles[0]),)),)
    )
    completed = mine.commit(CheckpointMetadata(7, JOB_ID, CheckpointKind.CHECKPOINT, 1, (state,)))
    assert_readable([completed], str(tmp_path / "ckpt"))
    assert handles[1].path is not None
    assert not (tmp_path / "ckpt" / JOB_ID / "chk-7" / handles[1].path).exists(), "the aborted writer's file went"


class _Gateway:
    def __init__(self) -> None:
        self.status = SubtaskStatus.RUNNING

    def trigger_checkpoint(self, checkpoint_id: int, options: CheckpointOptions) -> bool:
        return True

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        return None

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        return None


def test_late_acknowledgement_of_an_aborted_checkpoint_is_discarded(tmp_path: Path) -> None:
    # A snapshot whose file was published after its checkpoint was aborted (an S3 PUT in flight
    # during the abort): the acknowledgement that comes late removes it (Flink's discardSubtaskState).
    storage = open_storage(str(tmp_path / "ckpt"))
    topology = Topology((TopologyOperator("src", 2),))
    fatal: list[BaseException] = []

    async def scenario() -> None:
        coordinator = CheckpointCoordinator(
            job_id=JOB_ID, topology=topology, storage=storage, config=CheckpointConfig(), on_fatal=fatal.append
        )
        subs = [SubtaskId("src", 0), SubtaskId("src", 1)]
        coordinator.attach({s: _Gateway() for s in subs})
        trigger = asyncio.ensure_future(coordinator.trigger())
        await asyncio.sleep(0)
        writer = coordinator.writer_for(1)
        assert writer is not None
        with writer.open_stream("src/1/operator") as stream:
            stream.write(os.urandom(30_000))
            late = stream.close()
        coordinator.decline(subs[0], 1, RuntimeError("snapshot failed"))
        await asyncio.gather(trigger, return_exceptions=True)
        await asyncio.sleep(0.1)  # the abort ran in its thread
        assert late.path is not None
        storage.store.put(f"{writer.directory}/{late.path}", b"published late", PutMode.CREATE)
        entry_handle = OperatorStateHandle((), late)
        coordinator.acknowledge(subs[1], 1, SubtaskSnapshot(operator=(entry_handle,)))
        await coordinator.close()

    run(scenario())
    assert not chk_dir(tmp_path / "ckpt", 1).exists()
    assert [str(e).startswith(THRESHOLD) for e in fatal] == [True], "the decline counted (tolerance 0)"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_with_one_job_id_commit_each_checkpoint_id_once(
    tmp_path: Path, where: str, moto_endpoint: str, server_bucket: str, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        request.getfixturevalue("s3_backoffs")
    root = str(tmp_path / "ckpt") if where == "local" else f"s3://{server_bucket}/ckpt"
    endpoint = moto_endpoint if where == "s3" else None
    # Both coordinators write checkpoint 1's _metadata at the same moment.
    both_ready = threading.Barrier(2, timeout=10)
    faults.arm(
        "metadata.commit.before", faults.call(lambda n, c: both_ready.wait()), times=2,
        when=lambda c: c["checkpoint_id"] == 1,
    )  # fmt: skip
    jobs = [graph(tmp_path / f"out-{i}") for i in range(2)]
    completed = [Completed(), Completed()]

    async def scenario() -> list[JobResult]:
        clients = [submit(job, config(root, None, tolerable=100, endpoint=endpoint), job_id=JOB_ID) for job in jobs]
        for client, seen in zip(clients, completed, strict=True):
            seen.watch(client)
        return list(await asyncio.gather(*(c.wait() for c in clients)))

    results = run(scenario())
    assert [r.status for r in results] == [JobStatus.FINISHED] * 2, [r.error for r in results]
    ids = [{c.checkpoint_id for c in seen.checkpoints} for seen in completed]
    assert ids[0].isdisjoint(ids[1]), f"a checkpoint id completed by both jobs: {sorted(ids[0] & ids[1])}"
    assert 1 in ids[0] | ids[1], "checkpoint 1 has exactly one winner"
    lost = [(i, msg) for seen in completed for i, _, msg in seen.failures if i == 1]
    assert len(lost) == 1, "the other job lost checkpoint 1"
    assert "already committed by another writer" in lost[0][1]
    assert_readable([c for seen in completed for c in seen.checkpoints], root, endpoint)
    for i in range(2):
        assert_output(tmp_path / f"out-{i}")
