"""CheckpointStorage contract, finding: discovering, resolving and loading completed checkpoints and
savepoints (and never incomplete ones), then discarding them and cleaning up incomplete ones."""

from __future__ import annotations

import tracemalloc

import pytest

from keystate.storage import (
    METADATA_FILE,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointNotFoundError,
    CheckpointStorage,
    HandleScope,
    MetadataError,
    PutMode,
)
from keystate.storage.format import dump_metadata
from tests.storage.checkpoint_support import (
    BASE,
    JOB,
    OTHER_JOB,
    CheckpointStorageContract,
    assert_readable,
    checkpoint,
    keys,
    savepoint,
    write_state,
)


class TestCheckpointFinding(CheckpointStorageContract):
    # --- finding -------------------------------------------------------------------------------------

    def test_incomplete_directories_are_never_listed(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_checkpoint(JOB, 5)
        write_state(writer)
        assert keys(storage.store, writer.directory) != []
        assert storage.discover() == []
        assert storage.discover(JOB) == []
        assert storage.latest() is None
        for target in (f"{JOB}/chk-5", f"{JOB}/chk-5/{METADATA_FILE}", JOB, ""):
            with pytest.raises(CheckpointNotFoundError) as info:
                storage.resolve(target)
            assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(CheckpointNotFoundError, match="Cannot find meta data file '_metadata'"):
            storage.load(writer.directory)

    def test_discover_root_job_and_savepoints(self, storage: CheckpointStorage) -> None:
        for cid in (1, 2, 10):
            checkpoint(storage, cid)
        checkpoint(storage, 4, job=OTHER_JOB)
        sp, _ = savepoint(storage, 11, timestamp=5)
        storage.begin_checkpoint(JOB, 12).open_stream("x").close()  # incomplete
        storage.store.put(f"{BASE}/{JOB}/not-a-checkpoint/{METADATA_FILE}", b"{}")
        storage.store.put(f"{BASE}/unrelated/chk-3/{METADATA_FILE}", b"{}")
        root = storage.discover()
        assert [(p.kind, p.checkpoint_id) for p in root] == [
            (CheckpointKind.CHECKPOINT, 10),
            (CheckpointKind.CHECKPOINT, 4),
            (CheckpointKind.CHECKPOINT, 2),
            (CheckpointKind.CHECKPOINT, 1),
            (CheckpointKind.SAVEPOINT, None),
        ]
        assert root[1].directory == f"{BASE}/{OTHER_JOB}/chk-4"
        assert root[-1].directory == sp.directory
        assert [p.checkpoint_id for p in storage.discover(JOB)] == [10, 2, 1]
        assert [p.checkpoint_id for p in storage.list_checkpoints(JOB)] == [10, 2, 1]
        assert [p.directory for p in storage.discover("savepoints")] == [sp.directory]
        assert storage.discover("nothing-here") == []

    def test_latest_is_newest_by_timestamp_then_id_across_jobs_and_savepoints(self, storage: CheckpointStorage) -> None:
        checkpoint(storage, 5, timestamp=3_000)
        newest_checkpoint, _ = checkpoint(storage, 2, job=OTHER_JOB, timestamp=4_000)
        latest = storage.latest()
        assert latest is not None
        assert latest.directory == newest_checkpoint.directory
        sp, _ = savepoint(storage, 6, timestamp=4_000)  # same timestamp, higher id
        latest = storage.latest()
        assert latest is not None
        assert latest.directory == sp.directory
        job_latest = storage.latest(JOB)
        assert job_latest is not None
        assert job_latest.checkpoint_id == 5
        assert storage.resolve("").directory == sp.directory
        assert storage.resolve(OTHER_JOB).directory == newest_checkpoint.directory
        assert storage.resolve("savepoints").directory == sp.directory

    def test_resolve_accepts_directory_metadata_job_and_root(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        _, newest_written = checkpoint(storage, 2)
        assert_readable(storage.resolve(f"{JOB}/chk-1"), written)
        assert_readable(storage.resolve(f"{JOB}/chk-1/{METADATA_FILE}"), written)
        assert_readable(storage.resolve(JOB), newest_written)
        assert_readable(storage.resolve(), newest_written)
        # A storage whose base is the checkpoint directory itself still reaches its job's shared files.
        direct = CheckpointStorage(storage.store, completed.directory)
        assert_readable(direct.resolve(), written)
        assert_readable(CheckpointStorage(storage.store, f"{completed.directory}/{METADATA_FILE}").resolve(), written)

    def test_load_refuses_metadata_of_another_checkpoint(self, storage: CheckpointStorage) -> None:
        metadata = CheckpointMetadata(7, JOB, CheckpointKind.CHECKPOINT, 1, ())
        storage.store.put(f"{BASE}/{JOB}/chk-5/{METADATA_FILE}", dump_metadata(metadata))
        with pytest.raises(MetadataError, match="directory chk-5 holds metadata of checkpoint 7"):
            storage.load(f"{BASE}/{JOB}/chk-5")
        savepoint_md = CheckpointMetadata(5, JOB, CheckpointKind.SAVEPOINT, 1, ())
        storage.store.put(f"{BASE}/{JOB}/chk-5/{METADATA_FILE}", dump_metadata(savepoint_md), PutMode.OVERWRITE)
        with pytest.raises(MetadataError, match="holds metadata of savepoint 5"):
            storage.load(f"{BASE}/{JOB}/chk-5")

    def test_latest_skips_a_corrupt_newest_checkpoint_only_when_asked(self, storage: CheckpointStorage) -> None:
        good, written = checkpoint(storage, 1)
        storage.store.put(f"{BASE}/{JOB}/chk-2/{METADATA_FILE}", b'{"format_version": 1, "checkpoint_id": 2')
        with pytest.raises(MetadataError, match="chk-2"):
            storage.latest()
        with pytest.raises(MetadataError):
            storage.resolve(JOB)
        latest = storage.latest(skip_corrupt=True)
        assert latest is not None
        assert latest.directory == good.directory
        assert_readable(latest, written)

    def test_load_reads_a_bounded_amount(self, storage: CheckpointStorage) -> None:
        completed, _ = checkpoint(storage, 1)
        tracemalloc.start()
        try:
            storage.load(completed.directory)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 << 20, f"loading a small _metadata allocated {peak} bytes"

    # --- deleting ------------------------------------------------------------------------------------

    def test_discard_keeps_only_the_listed_shared_files(self, storage: CheckpointStorage) -> None:
        completed, _ = checkpoint(storage, 1)
        shared = [h for h in completed.metadata.handles() if h.scope is HandleScope.SHARED]
        assert len(shared) == 1
        assert shared[0].path is not None
        shared_key = completed.state_key(shared[0])
        assert shared_key is not None
        keep, _ = checkpoint(storage, 2)
        storage.discard(completed, keep_shared={shared[0].path})
        assert keys(storage.store, completed.directory) == []
        assert storage.store.exists(shared_key)
        assert [p.checkpoint_id for p in storage.discover(JOB)] == [2]
        third, _ = checkpoint(storage, 3)
        storage.discard(third)
        third_shared = [completed.state_key(h) for h in third.metadata.handles() if h.scope is HandleScope.SHARED]
        assert third_shared
        assert not any(k is not None and storage.store.exists(k) for k in third_shared)
        assert storage.store.exists(shared_key), "other checkpoints' shared files are not touched"
        assert [p.checkpoint_id for p in storage.discover(JOB)] == [2]
        assert storage.load(keep.directory).metadata == keep.metadata

    def test_cleanup_incomplete_removes_only_metadata_less_directories_below_the_id(
        self, storage: CheckpointStorage
    ) -> None:
        checkpoint(storage, 1)
        for cid in (2, 3, 4):
            write_state(storage.begin_checkpoint(JOB, cid))
        checkpoint(storage, 5, job=OTHER_JOB)
        write_state(storage.begin_checkpoint(OTHER_JOB, 2))
        removed = storage.cleanup_incomplete(JOB, below=4)
        assert removed == [f"{BASE}/{JOB}/chk-2", f"{BASE}/{JOB}/chk-3"]
        assert storage.store.list_dirs(f"{BASE}/{JOB}") == ["chk-1", "chk-4", "shared"]
        assert keys(storage.store, f"{BASE}/{OTHER_JOB}/chk-2") != []
        assert [p.checkpoint_id for p in storage.discover()] == [5, 1]
