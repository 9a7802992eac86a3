"""CheckpointStorage contract, writing: streams and their scopes, committing (the commit point under
conflicts and failures), aborting, and what each object store ends up holding."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import (
    METADATA_FILE,
    AlreadyExistsError,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointNotFoundError,
    CheckpointProperties,
    CheckpointStorage,
    CommitConflictError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    CompletedCheckpoint,
    Compression,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    MetadataError,
    ObjectStore,
    OperatorState,
    PutMode,
    RequestOutcomeUnknownError,
    S3ObjectStore,
    StorageError,
    StorageUnavailableError,
    StreamOptions,
    SubtaskState,
)
from keystate.storage.format import dump_metadata
from tests.conftest import BUCKET
from tests.storage.checkpoint_support import (
    BASE,
    JOB,
    OPTIONS,
    OTHER_JOB,
    CheckpointStorageContract,
    FlakyStore,
    assert_readable,
    bare,
    checkpoint,
    keys,
    write_state,
)


class TestCheckpointWriting(CheckpointStorageContract):
    # --- writing and reading back ---------------------------------------------------------------------

    def test_commit_then_load_and_resolve(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        assert completed.directory == f"{BASE}/{JOB}/chk-1"
        assert completed.kind is CheckpointKind.CHECKPOINT
        assert completed.checkpoint_id == 1
        assert completed.location == storage.store.describe(completed.directory)
        assert storage.store.exists(f"{BASE}/{JOB}/chk-1/{METADATA_FILE}")
        assert_readable(completed, written)
        assert_readable(storage.load(completed.directory), written)
        assert_readable(storage.resolve(f"{JOB}/chk-1"), written)

    def test_inline_threshold_is_inclusive(self, raw_store: ObjectStore) -> None:
        threshold = 300
        options = StreamOptions(inline_threshold=threshold, compression=Compression.NONE, block_size=4096)
        storage = CheckpointStorage(raw_store, BASE, options=options)
        writer = storage.begin_checkpoint(JOB, 1)
        overhead = 8 + 16 + 16  # file header, one block header, trailer
        with writer.open_stream("at") as stream:
            stream.write(b"a" * (threshold - overhead))
            at = stream.close()
        assert at.scope is HandleScope.INLINE
        assert at.size == threshold
        assert at.path is None
        assert keys(raw_store, writer.directory) == [], "an inline stream writes no object"
        with writer.open_stream("above") as stream:
            stream.write(b"b" * (threshold - overhead + 1))
            above = stream.close()
        assert above.scope is HandleScope.EXCLUSIVE
        assert above.size == threshold + 1
        assert above.path is not None
        assert keys(raw_store, writer.directory) == [f"{writer.directory}/{above.path}"]
        assert raw_store.size(f"{writer.directory}/{above.path}") == threshold + 1
        completed = writer.commit(CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 1, ()))
        assert completed.open_state(at).read_all() == b"a" * (threshold - overhead)
        assert completed.open_state(above).read_all() == b"b" * (threshold - overhead + 1)

    def test_shared_streams_live_under_the_job_and_resolve(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        op = completed.metadata.operator("op")
        assert op is not None
        handles = list(op.handles())
        assert [h.scope for h in handles] == [HandleScope.EXCLUSIVE, HandleScope.INLINE, HandleScope.SHARED]
        shared = handles[2]
        assert shared.path is not None
        assert shared.path.startswith("by-chk-1/op/1/keyed-")
        assert shared.path.endswith(".ksf")
        key = completed.state_key(shared)
        assert key == f"{BASE}/{JOB}/shared/{shared.path}"
        assert storage.store.exists(key)
        assert completed.state_key(handles[0]) == f"{BASE}/{JOB}/chk-1/{handles[0].path}"
        assert completed.state_key(handles[1]) is None
        assert_readable(storage.resolve(f"{JOB}/chk-1/{METADATA_FILE}"), written)

    def test_savepoints_are_self_contained(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_savepoint(JOB, 7)
        assert re.fullmatch(rf"{BASE}/savepoints/savepoint-{JOB[:6]}-[0-9a-f]{{12}}", writer.directory)
        assert storage.begin_savepoint(JOB, 7).directory != writer.directory
        written = write_state(writer, properties=CheckpointProperties(synchronous=True, drain=True))
        completed = writer.commit(written.metadata)
        assert completed.directory == writer.directory
        handles = list(written.metadata.handles())
        assert HandleScope.SHARED not in {h.scope for h in handles}, "shared requests become exclusive"
        assert keys(storage.store, f"{BASE}/{JOB}") == []
        assert all(k.startswith(writer.directory + "/") for k in keys(storage.store, BASE))
        loaded = storage.resolve(writer.directory.removeprefix(BASE + "/"))
        assert loaded.kind is CheckpointKind.SAVEPOINT
        assert loaded.metadata.properties.drain
        assert_readable(loaded, written)
        assert [p.directory for p in storage.discover("savepoints")] == [writer.directory]

    def test_savepoint_metadata_naming_shared_state_is_refused(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_savepoint(JOB, 1)
        handle = storage.begin_checkpoint(JOB, 1).open_stream("x", HandleScope.SHARED)
        handle.write(os.urandom(1000))
        shared = handle.close()
        assert shared.scope is HandleScope.SHARED  # never inlined, however small
        assert shared.written_by == 1
        op = OperatorState(
            "op", 1, 4, subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 0), (8,), shared),)),)
        )
        with pytest.raises(MetadataError, match="savepoints must be self-contained"):
            writer.commit(CheckpointMetadata(1, JOB, CheckpointKind.SAVEPOINT, 1, (op,)))
        assert not storage.discover()
        # A savepoint read from elsewhere that names shared state cannot open it either.
        metadata = CheckpointMetadata(1, JOB, CheckpointKind.SAVEPOINT, 1, (op,))
        completed = CompletedCheckpoint(storage, writer.directory, metadata)
        with pytest.raises(MetadataError, match="savepoints must be self-contained"):
            completed.open_state(shared)

    # --- commit semantics ----------------------------------------------------------------------------

    def test_second_commit_with_different_metadata_conflicts(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 3)
        loser = storage.begin_checkpoint(JOB, 3)
        with pytest.raises(CommitConflictError, match="already committed by another writer") as info:
            loser.commit(bare(written.metadata, timestamp=99))
        assert isinstance(info.value, CommitFailedError)
        assert isinstance(info.value, AlreadyExistsError)
        assert_readable(storage.load(completed.directory), written)

    def test_second_commit_with_identical_bytes_succeeds(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 3)
        second = storage.begin_checkpoint(JOB, 3)
        second.adopt(written.metadata.handles())  # another writer's files: vouched for, not written here
        again = second.commit(written.metadata)
        assert again.metadata == written.metadata
        assert_readable(storage.load(completed.directory), written)

    @pytest.mark.parametrize(
        "change",
        [{"checkpoint_id": 2}, {"job_id": OTHER_JOB}, {"kind": CheckpointKind.SAVEPOINT}],
        ids=["id", "job", "kind"],
    )
    def test_commit_of_mismatched_metadata_is_refused(self, storage: CheckpointStorage, change: dict[str, Any]) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        good = CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 1, ())
        with pytest.raises(ValueError, match="does not match the location"):
            writer.commit(bare(good, **change))
        assert not storage.store.exists(f"{writer.directory}/{METADATA_FILE}")
        assert writer.commit(good).metadata == good, "a refused commit leaves the writer usable"
        with pytest.raises(CommitFailedError, match="already committed"):
            writer.commit(good)

    def test_put_that_landed_before_the_error_is_a_successful_commit(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer)
        flaky.put_fails = flaky.put_lands = True
        assert_readable(writer.commit(written.metadata), written)
        assert_readable(storage.load(writer.directory), written)

    def test_put_that_did_not_land_is_a_failed_commit(self, storage: CheckpointStorage, flaky: FlakyStore) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer)
        flaky.put_fails = True
        with pytest.raises(CommitFailedError, match="was not committed") as info:
            writer.commit(written.metadata)
        assert not isinstance(info.value, CommitConflictError)
        assert isinstance(info.value.__cause__, StorageUnavailableError)
        with pytest.raises(CheckpointNotFoundError):
            storage.load(writer.directory)
        assert storage.discover() == []
        assert keys(storage.store, BASE) != []
        writer.abort()  # the commit definitely failed: the coordinator's abort removes the state files
        assert keys(storage.store, BASE) == []

    def test_request_that_may_still_land_is_an_unknown_outcome(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer)
        flaky.put_fails, flaky.put_error = True, RequestOutcomeUnknownError
        with pytest.raises(CommitOutcomeUnknownError, match="may still land"):
            writer.commit(written.metadata)
        writer.abort()  # must leave the state files: the PUT may land after the read-back
        flaky.inner.put(f"{writer.directory}/{METADATA_FILE}", dump_metadata(written.metadata), PutMode.CREATE)
        assert_readable(storage.load(writer.directory), written)

    def test_abort_after_a_lost_conflict_removes_only_the_losers_files(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 3)
        loser = storage.begin_checkpoint(JOB, 3)
        lost = write_state(loser, timestamp=7)
        with pytest.raises(CommitConflictError):
            loser.commit(lost.metadata)
        loser.abort()
        assert_readable(storage.load(completed.directory), written)
        for handle in lost.metadata.handles():
            key = completed.state_key(handle)
            assert key is None or not storage.store.exists(key)

    def test_put_and_read_back_failing_is_an_unknown_outcome(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        for lands, checkpoint_id in ((False, 1), (True, 2)):
            writer = storage.begin_checkpoint(JOB, checkpoint_id)
            written = write_state(writer)
            flaky.put_fails, flaky.put_lands, flaky.get_fails = True, lands, True
            with pytest.raises(CommitOutcomeUnknownError, match="load the checkpoint") as info:
                writer.commit(written.metadata)
            assert not isinstance(info.value, CommitFailedError), "an unknown outcome is not a failed commit"
            flaky.put_fails = flaky.get_fails = False
            writer.abort()  # what a coordinator does next; it must not destroy a possibly complete checkpoint
            if lands:
                assert_readable(storage.load(writer.directory), written)
            else:
                with pytest.raises(CheckpointNotFoundError):
                    storage.load(writer.directory)

    def test_conflict_whose_read_back_fails_is_an_unknown_outcome(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        completed, written = checkpoint(storage, 1)
        flaky.get_fails = True
        with pytest.raises(CommitOutcomeUnknownError):
            storage.begin_checkpoint(JOB, 1).commit(bare(written.metadata, timestamp=5))
        assert_readable(storage.load(completed.directory), written)

    # --- abort ---------------------------------------------------------------------------------------

    def test_abort_removes_everything_the_checkpoint_wrote(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        before = keys(storage.store, BASE)
        writer = storage.begin_checkpoint(JOB, 2)
        write_state(writer)  # closed exclusive, shared and inline streams
        open_stream = writer.open_stream("op/9/keyed")
        open_stream.write(os.urandom(2000))  # past the inline threshold: an object write in progress
        open_shared = writer.open_stream("op/9/shared", HandleScope.SHARED)
        open_shared.write(os.urandom(2000))
        assert keys(storage.store, writer.directory) != []
        writer.abort()
        writer.abort()  # idempotent
        assert keys(storage.store, BASE) == before, "only the completed checkpoint's files are left"
        assert storage.discover() == [storage.discover()[0]]
        assert_readable(storage.load(completed.directory), written)
        with pytest.raises(StorageError):
            writer.open_stream("late")
        with pytest.raises(CommitFailedError):
            writer.commit(bare(written.metadata, checkpoint_id=2))
        with pytest.raises(StorageError):
            open_stream.write(b"x")

    def test_abort_never_touches_a_checkpoint_another_writer_completed(self, storage: CheckpointStorage) -> None:
        loser = storage.begin_checkpoint(JOB, 2)
        with loser.open_stream("op/0/keyed") as stream:
            stream.write(os.urandom(2000))
            loser_handle = stream.close()
        other = CheckpointStorage(storage.store, BASE, options=OPTIONS)
        completed, written = checkpoint(other, 2)
        loser.abort()
        assert_readable(storage.load(completed.directory), written)
        assert loser_handle.path is not None
        assert not storage.store.exists(f"{loser.directory}/{loser_handle.path}"), "the loser's own files go"

    def test_stream_aborted_on_error_leaves_nothing(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        stream = writer.open_stream("op/0/keyed")

        def snapshot() -> None:
            with stream:
                stream.write(os.urandom(5000))
                raise RuntimeError("snapshot failed")

        with pytest.raises(RuntimeError, match="snapshot failed"):
            snapshot()
        assert keys(storage.store, BASE) == []
        with pytest.raises(StorageError, match="aborted"):
            stream.close()

    def test_inline_scope_cannot_be_requested(self, storage: CheckpointStorage) -> None:
        with pytest.raises(ValueError, match="inline"):
            storage.begin_checkpoint(JOB, 1).open_stream("x", HandleScope.INLINE)

    def test_invalid_ids_are_refused(self, storage: CheckpointStorage) -> None:
        with pytest.raises(ValueError, match="job_id"):
            storage.begin_checkpoint("not-a-job", 1)
        with pytest.raises(ValueError, match="job_id"):
            storage.begin_savepoint(JOB.upper(), 1)
        with pytest.raises(ValueError, match="checkpoint ID"):
            storage.begin_checkpoint(JOB, -1)


# --- what each object store holds --------------------------------------------------------------------


def test_local_store_on_disk_layout(tmp_path: Path) -> None:
    storage = CheckpointStorage(LocalObjectStore(tmp_path), BASE, options=OPTIONS)
    checkpoint(storage, 1)
    chk = tmp_path / BASE / JOB / "chk-1"
    assert (chk / METADATA_FILE).is_file()
    assert [p.name for p in (chk / "op" / "0").iterdir() if p.name.startswith("keyed-")]
    assert [p.name for p in (tmp_path / BASE / JOB / "shared" / "by-chk-1" / "op" / "1").iterdir()]


def test_local_store_abort_leaves_no_directories_or_temp_files(tmp_path: Path) -> None:
    storage = CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), BASE, options=OPTIONS)
    writer = storage.begin_checkpoint(JOB, 1)
    write_state(writer, shared=False)
    stream = writer.open_stream("op/5/keyed")
    stream.write(os.urandom(5000))
    assert any(name.startswith(".tmp-") for _, _, names in os.walk(tmp_path) for name in names)
    writer.abort()
    assert not (tmp_path / BASE / JOB / "chk-1").exists()
    assert [name for _, _, names in os.walk(tmp_path) for name in names] == []


def test_s3_objects_land_under_the_prefix(s3_client: Any) -> None:
    storage = CheckpointStorage(S3ObjectStore(BUCKET, "tenant", client=s3_client), BASE, options=OPTIONS)
    checkpoint(storage, 1)
    listed = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert f"tenant/{BASE}/{JOB}/chk-1/{METADATA_FILE}" in listed
    assert all(k.startswith(f"tenant/{BASE}/{JOB}/") for k in listed)
    assert any(k.startswith(f"tenant/{BASE}/{JOB}/shared/") for k in listed)
