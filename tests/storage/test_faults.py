"""The fault-injection harness (``keystate.storage.faults``, ``keystate.storage.s3faults``) and the retry layer
(``keystate.storage.retry``).

Every fault does what the table in ``storage/faults.py`` says (raised class, applied or not); rules
select calls by operation, key, mode, n-th hit, count and seeded probability; the retry layer retries
transient faults, never writes a create-only object twice blindly (the identical-bytes rule), and
turns a commit whose PUT landed before its timeout into a complete checkpoint, locally and through
botocore's own retries against moto's server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from keystate.storage import (
    AlreadyExistsError,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CommitOutcomeUnknownError,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectStore,
    OperatorState,
    PutMode,
    RequestOutcomeUnknownError,
    S3ObjectStore,
    StorageError,
    StorageUnavailableError,
    make_s3_client,
)
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
from keystate.storage.format import dump_metadata
from keystate.storage.retry import RetryingObjectStore, RetryPolicy, with_retries
from keystate.storage.s3faults import S3FaultInjector, S3FaultRule

REPO = Path(__file__).resolve().parents[2]
JOB = "0123456789abcdef0123456789abcdef"
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.0)


def metadata(checkpoint_id: int, timestamp: int = 1_700_000_000_000) -> CheckpointMetadata:
    return CheckpointMetadata(checkpoint_id, JOB, CheckpointKind.CHECKPOINT, timestamp, (OperatorState("src", 1, 128),))


# --- FaultyObjectStore ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "applied"),
    [
        (Fault.THROTTLE, StorageUnavailableError, False),
        (Fault.INTERNAL_ERROR, StorageUnavailableError, False),
        (Fault.CONNECTION_RESET, RequestOutcomeUnknownError, False),
        (Fault.TIMEOUT_AFTER_WRITE, RequestOutcomeUnknownError, True),
    ],
)
def test_each_fault_raises_its_error_and_applies_the_call_or_not(
    fault: Fault, error: type[Exception], applied: bool
) -> None:
    store = FaultyObjectStore(MemoryObjectStore(), [FaultRule(fault, "put")])
    with pytest.raises(error) as info:
        store.put("a/b", b"data", PutMode.CREATE)
    assert "injected" in str(info.value)
    assert "memory://default/a/b" in str(info.value)
    assert store.exists("a/b") is applied
    assert store.injected[0].fault is fault
    assert store.count(fault, "put") == 1
    if fault is not Fault.TIMEOUT_AFTER_WRITE:
        assert not isinstance(info.value, RequestOutcomeUnknownError) or fault is Fault.CONNECTION_RESET


def test_throttled_reads_and_listings_are_storage_unavailable() -> None:
    inner = MemoryObjectStore()
    inner.put("d/k", b"v")
    store = FaultyObjectStore(
        inner, [FaultRule(Fault.THROTTLE, {"get", "size", "exists", "list_dirs", "list_objects"})]
    )
    for call in (
        lambda: store.get("d/k"),
        lambda: store.size("d/k"),
        lambda: store.exists("d/k"),
        lambda: store.list_dirs("d"),
        lambda: list(store.list_objects("d")),
    ):
        with pytest.raises(StorageUnavailableError, match="SlowDown"):
            call()
    assert store.count(Fault.THROTTLE) == 5


def test_rules_select_by_key_mode_nth_hit_and_count() -> None:
    store = FaultyObjectStore(
        MemoryObjectStore(),
        [FaultRule(Fault.THROTTLE, "put", key="*/_metadata", mode=PutMode.CREATE, after=1, times=2)],
    )
    store.put("chk-1/state", b"s", PutMode.CREATE)  # another key
    store.put("chk-0/_metadata", b"m", PutMode.OVERWRITE)  # another mode
    store.put("chk-1/_metadata", b"m", PutMode.CREATE)  # first match: let through (after=1)
    outcomes = []
    for i in range(2, 6):
        try:
            store.put(f"chk-{i}/_metadata", b"m", PutMode.CREATE)
            outcomes.append("ok")
        except StorageUnavailableError:
            outcomes.append("throttled")
    assert outcomes == ["throttled", "throttled", "ok", "ok"]
    assert [f.key for f in store.injected] == ["chk-2/_metadata", "chk-3/_metadata"]


def test_probability_is_reproducible_from_the_seed() -> None:
    def pattern(seed: int) -> list[bool]:
        store = FaultyObjectStore(
            MemoryObjectStore(), [FaultRule(Fault.INTERNAL_ERROR, "get", probability=0.3)], seed=seed
        )
        store.inner.put("k", b"v")
        seen = []
        for _ in range(200):
            try:
                store.get("k")
                seen.append(False)
            except StorageUnavailableError:
                seen.append(True)
        return seen

    assert pattern(5) == pattern(5)
    assert pattern(5) != pattern(6)
    assert 30 < sum(pattern(5)) < 90


def test_writer_faults_on_write_and_close() -> None:
    store = FaultyObjectStore(
        MemoryObjectStore(),
        [FaultRule(Fault.THROTTLE, "write", times=1), FaultRule(Fault.TIMEOUT_AFTER_WRITE, "close", times=1)],
    )
    writer = store.open_writer("w", PutMode.CREATE)
    with pytest.raises(StorageUnavailableError):
        writer.write(b"lost")  # not applied
    writer.write(b"kept")
    with pytest.raises(RequestOutcomeUnknownError):
        writer.close()  # applied, then the answer is lost
    assert store.get("w") == b"kept"


def test_slow_calls_sleep_then_succeed() -> None:
    store = FaultyObjectStore(MemoryObjectStore(), [FaultRule(Fault.SLOW, "put", delay=0.05)])
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert store.count(Fault.SLOW) == 1


def test_clear_disarms_every_rule() -> None:
    store = FaultyObjectStore(MemoryObjectStore(), [FaultRule(Fault.THROTTLE, "put")])
    store.clear()
    store.put("k", b"v")
    assert store.get("k") == b"v"


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault operation"):
        FaultRule(Fault.THROTTLE, "upload")
    with pytest.raises(ValueError, match="probability"):
        FaultRule(Fault.THROTTLE, "put", probability=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        FaultRule(Fault.THROTTLE, "put", times=-1)


CRASHING_PUT = """
import sys
from keystate.storage import LocalObjectStore, PutMode
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
store = FaultyObjectStore(LocalObjectStore(sys.argv[1]), [FaultRule(Fault.CRASH, "put", key="*/_metadata")])
store.put("chk-1/state", b"s" * 100, PutMode.CREATE)
print("before", flush=True)
store.put("chk-1/_metadata", b"m" * 1000, PutMode.CREATE)
print("after", flush=True)
"""


def test_crash_kills_the_process_in_the_middle_of_a_put(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_PUT, str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout == "before\n"
    [temp] = [p for p in (tmp_path / "chk-1").iterdir() if p.name.startswith(".tmp-_metadata")]
    assert temp.read_bytes() == b"m" * 500, "half of the bytes reached the temp file"
    assert not (tmp_path / "chk-1" / "_metadata").exists()
    assert LocalObjectStore(tmp_path).get("chk-1/state") == b"s" * 100


# --- RetryingObjectStore -------------------------------------------------------------------------------


def retrying(*rules: FaultRule) -> tuple[RetryingObjectStore, FaultyObjectStore]:
    faulty = FaultyObjectStore(MemoryObjectStore(), rules)
    return RetryingObjectStore(faulty, FAST), faulty


@pytest.mark.parametrize("fault", [Fault.THROTTLE, Fault.INTERNAL_ERROR, Fault.CONNECTION_RESET])
def test_transient_create_only_put_is_retried(fault: Fault) -> None:
    store, faulty = retrying(FaultRule(fault, "put", times=3))
    store.put("k", b"v", PutMode.CREATE)
    assert store.get("k") == b"v"
    assert faulty.count(fault) == 3


def test_create_only_put_whose_first_attempt_landed_succeeds_by_identical_bytes() -> None:
    store, faulty = retrying(FaultRule(Fault.TIMEOUT_AFTER_WRITE, "put", times=1))
    store.put("k", b"v", PutMode.CREATE)
    assert store.get("k") == b"v"
    assert faulty.count() == 1


def test_create_only_put_is_never_retried_blindly() -> None:
    # The answer was lost, and meanwhile another writer's object is there: not ours, so not a success.
    store, faulty = retrying(FaultRule(Fault.CONNECTION_RESET, "put", times=1))
    faulty.inner.put("k", b"another writer")
    with pytest.raises(AlreadyExistsError):
        store.put("k", b"mine", PutMode.CREATE)
    # A plain conflict (no uncertain attempt before it) is never resolved by reading back.
    with pytest.raises(AlreadyExistsError):
        store.put("k", b"another writer", PutMode.CREATE)


def test_exhausted_retries_after_an_uncertain_attempt_are_an_unknown_outcome() -> None:
    store, _ = retrying(FaultRule(Fault.CONNECTION_RESET, "put", times=1), FaultRule(Fault.THROTTLE, "put"))
    with pytest.raises(RequestOutcomeUnknownError, match="may have landed"):
        store.put("k", b"v", PutMode.CREATE)
    store2, faulty2 = retrying(FaultRule(Fault.THROTTLE, "put"))
    with pytest.raises(StorageUnavailableError) as info:
        store2.put("k", b"v", PutMode.CREATE)
    assert not isinstance(info.value, RequestOutcomeUnknownError)
    assert faulty2.count() == FAST.max_attempts


def test_idempotent_calls_are_retried_even_after_an_unknown_outcome() -> None:
    store, faulty = retrying(
        FaultRule(Fault.TIMEOUT_AFTER_WRITE, {"put", "delete"}, times=2),
        FaultRule(Fault.INTERNAL_ERROR, "get", times=2),
    )
    store.put("k", b"v")
    assert store.get("k") == b"v"
    store.delete("k")
    assert not store.exists("k")
    assert faulty.count() == 4


def test_streaming_write_retries_but_never_repeats_a_chunk_that_may_have_landed() -> None:
    store, _ = retrying(FaultRule(Fault.THROTTLE, "write", times=2), FaultRule(Fault.INTERNAL_ERROR, "close", times=2))
    with store.open_writer("w", PutMode.CREATE) as writer:
        writer.write(b"abc")
        writer.write(b"def")
    assert store.get("w") == b"abcdef"
    store2, _ = retrying(FaultRule(Fault.TIMEOUT_AFTER_WRITE, "write", times=1))
    writer2 = store2.open_writer("w2", PutMode.CREATE)
    with pytest.raises(RequestOutcomeUnknownError):
        writer2.write(b"abc")
    writer2.abort()
    assert not store2.exists("w2")


def test_a_retried_close_is_believed_only_if_the_object_is_whole() -> None:
    store, _ = retrying(FaultRule(Fault.TIMEOUT_AFTER_WRITE, "close", times=1))
    with store.open_writer("w", PutMode.CREATE) as writer:
        writer.write(b"x" * 1000)
    assert store.get("w") == b"x" * 1000

    class LyingStore(MemoryObjectStore):
        """A store whose writer loses the object on a failed close and then claims success."""

        def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> Any:
            real = super().open_writer(key, mode)
            calls = []

            class Writer:
                bytes_written = 3

                def write(self, data: bytes) -> None:
                    real.write(data)

                def close(self) -> None:
                    calls.append(1)
                    if len(calls) == 1:
                        raise StorageUnavailableError("first close failed")

                def abort(self) -> None:
                    real.abort()

            return Writer()

    lying = RetryingObjectStore(LyingStore(), FAST)
    writer = lying.open_writer("w", PutMode.CREATE)
    writer.write(b"abc")
    with pytest.raises(StorageUnavailableError, match="first close failed"):
        writer.close()


def test_with_retries_wraps_only_stores_that_do_not_retry(tmp_path: Path) -> None:
    local = LocalObjectStore(tmp_path)
    assert isinstance(with_retries(local, RetryPolicy()), RetryingObjectStore)
    assert with_retries(local, None) is local
    assert with_retries(local, RetryPolicy(max_attempts=1)) is local
    s3: ObjectStore = S3ObjectStore("bucket", client=object())
    assert with_retries(s3, RetryPolicy()) is s3, "botocore retries S3 requests already"
    faulty = FaultyObjectStore(s3)
    assert isinstance(with_retries(faulty, RetryPolicy()), RetryingObjectStore), "injected faults are not"


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, jitter=False)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    assert all(0 <= RetryPolicy(initial_backoff=0.1).backoff(3) <= 0.4 for _ in range(50))
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_attempts=0)


# --- the commit point through the harness ----------------------------------------------------------------


def test_timeout_after_the_metadata_put_landed_is_a_complete_checkpoint(tmp_path: Path) -> None:
    for retry in (True, False):
        faulty = FaultyObjectStore(LocalObjectStore(tmp_path / str(retry), fsync=False))
        faulty.add(FaultRule(Fault.TIMEOUT_AFTER_WRITE, "put", key="*/_metadata", times=1))
        store: ObjectStore = RetryingObjectStore(faulty, FAST) if retry else faulty
        storage = CheckpointStorage(store, "base")
        completed = storage.begin_checkpoint(JOB, 1).commit(metadata(1))
        assert storage.load(completed.directory).metadata == metadata(1)
        assert faulty.count(Fault.TIMEOUT_AFTER_WRITE) == 1


def test_unknown_commit_outcome_can_be_committed_again(tmp_path: Path) -> None:
    faulty = FaultyObjectStore(MemoryObjectStore())
    storage = CheckpointStorage(faulty, "base")
    for lands in (False, True):
        cid = 2 if lands else 1
        writer = storage.begin_checkpoint(JOB, cid)
        fault = Fault.TIMEOUT_AFTER_WRITE if lands else Fault.CONNECTION_RESET
        faulty.add(FaultRule(fault, "put", key="*/_metadata", times=1))
        faulty.add(FaultRule(Fault.THROTTLE, "get", key="*/_metadata", times=1))  # and the read-back fails too
        with pytest.raises(CommitOutcomeUnknownError):
            writer.commit(metadata(cid))
        writer.abort()  # must keep everything: the commit may have happened
        with pytest.raises(ValueError, match="retried as it was"):
            writer.commit(metadata(cid, timestamp=5))
        assert writer.commit(metadata(cid)).metadata == metadata(cid)
        assert storage.load(writer.directory).metadata == metadata(cid)
        faulty.clear()
    with pytest.raises(StorageError, match="already committed"):
        writer.commit(metadata(2))


# --- botocore injection against moto's server ------------------------------------------------------------


def test_s3_injector_throttling_is_retried_by_botocore(moto_endpoint: str, server_bucket: str) -> None:
    store = S3ObjectStore(server_bucket, "p", client=make_s3_client(endpoint_url=moto_endpoint, max_attempts=5))
    injector = S3FaultInjector([S3FaultRule(Fault.THROTTLE, "PutObject", key="*/k", times=2)]).install(store.client)
    store.put("k", b"v", PutMode.CREATE)
    assert store.get("k") == b"v"
    assert [f.what for f in injector.injected] == ["throttle", "throttle"]
    assert len(injector.attempts) == 3


def test_s3_timeout_after_the_metadata_put_landed_completes_the_checkpoint(
    moto_endpoint: str, server_bucket: str
) -> None:
    store = S3ObjectStore(server_bucket, "", client=make_s3_client(endpoint_url=moto_endpoint, max_attempts=3))
    injector = S3FaultInjector([S3FaultRule(Fault.TIMEOUT_AFTER_WRITE, "PutObject", key="*/_metadata", times=1)])
    injector.install(store.client)
    storage = CheckpointStorage(store, "ckpt")
    completed = storage.begin_checkpoint(JOB, 1).commit(metadata(1))
    assert len(injector.attempts) == 2, "botocore retried the PUT; the retry met its own object (412)"
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    body = raw.get_object(Bucket=server_bucket, Key=f"ckpt/{JOB}/chk-1/_metadata")["Body"].read()
    assert body == dump_metadata(metadata(1))
    assert completed.metadata == metadata(1)


def test_s3_injector_connection_reset_and_explicit_errors(moto_endpoint: str, server_bucket: str) -> None:
    store = S3ObjectStore(server_bucket, "p", client=make_s3_client(endpoint_url=moto_endpoint, max_attempts=2))
    S3FaultInjector(
        [S3FaultRule(Fault.CONNECTION_RESET, "GetObject"), S3FaultRule(status=403, code="AccessDenied", key="*/denied")]
    ).install(store.client)
    store.put("k", b"v")
    with pytest.raises(RequestOutcomeUnknownError):
        store.get("k")
    with pytest.raises(StorageError, match="access denied"):
        store.put("denied", b"v")
    with pytest.raises(ValueError, match="either a fault"):
        S3FaultRule()
