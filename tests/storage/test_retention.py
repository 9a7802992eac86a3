"""Retention of completed checkpoints (CompletedCheckpointStore) over a real local store."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from keystate.storage import (
    METADATA_FILE,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    OperatorState,
    StorageError,
    StreamHandle,
    StreamOptions,
    SubtaskState,
)

JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    return CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), options=StreamOptions(inline_threshold=0))


def complete(
    storage: CheckpointStorage, checkpoint_id: int, reuse_shared: StreamHandle | None = None
) -> tuple[CompletedCheckpoint, StreamHandle]:
    """Commit checkpoint ``checkpoint_id`` with one exclusive file and one shared file.

    The shared file is new unless ``reuse_shared`` is given (an incremental checkpoint reusing it).
    Returns the checkpoint and its shared handle.
    """
    writer = storage.begin_checkpoint(JOB, checkpoint_id)
    with writer.open_stream("op/0/keyed") as s:
        s.start_block()
        s.write(os.urandom(100))
        exclusive = s.close()
    if reuse_shared is None:
        with writer.open_stream("op/1/keyed", HandleScope.SHARED) as s:
            s.start_block()
            s.write(os.urandom(100))
            shared = s.close()
    else:
        shared = reuse_shared
    op = OperatorState(
        "op",
        2,
        128,
        subtasks=(
            SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 0), (8,), exclusive),)),
            SubtaskState(1, keyed=(KeyedStateHandle(KeyGroupRange(64, 64), (8,), shared),)),
        ),
    )
    metadata = CheckpointMetadata(checkpoint_id, JOB, CheckpointKind.CHECKPOINT, 1_000 + checkpoint_id, (op,))
    return writer.commit(metadata), shared


def shared_file(root: Path, handle: StreamHandle) -> Path:
    assert handle.path is not None
    return root / JOB / "shared" / handle.path


def chk(root: Path, checkpoint_id: int) -> Path:
    return root / JOB / f"chk-{checkpoint_id}"


def test_num_retained_one_discards_the_previous_checkpoint(storage: CheckpointStorage, tmp_path: Path) -> None:
    store = CompletedCheckpointStore(storage, JOB)
    first, first_shared = complete(storage, 1)
    assert store.add(first) == []
    second, second_shared = complete(storage, 2)
    discarded = store.add(second)
    assert [c.checkpoint_id for c in discarded] == [1]
    assert not chk(tmp_path, 1).exists()
    assert not shared_file(tmp_path, first_shared).exists(), "an unreferenced shared file is deleted"
    assert (chk(tmp_path, 2) / METADATA_FILE).is_file()
    assert shared_file(tmp_path, second_shared).is_file()
    assert [c.checkpoint_id for c in store.checkpoints] == [2]
    latest = store.latest()
    assert latest is not None
    assert latest.checkpoint_id == 2
    assert storage.load(latest.directory).metadata == second.metadata


def test_num_retained_three_discards_oldest_first(storage: CheckpointStorage, tmp_path: Path) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=3)
    for cid in (1, 2, 3):
        assert store.add(complete(storage, cid)[0]) == []
    assert [c.checkpoint_id for c in store.checkpoints] == [1, 2, 3]
    for cid in (4, 5):
        discarded = store.add(complete(storage, cid)[0])
        assert [c.checkpoint_id for c in discarded] == [cid - 3]
        assert not chk(tmp_path, cid - 3).exists()
    assert [c.checkpoint_id for c in store.checkpoints] == [3, 4, 5]
    assert sorted(p.name for p in (tmp_path / JOB).iterdir()) == ["chk-3", "chk-4", "chk-5", "shared"]
    assert [p.checkpoint_id for p in storage.list_checkpoints(JOB)] == [5, 4, 3]


def test_shared_files_referenced_by_a_retained_checkpoint_survive(storage: CheckpointStorage, tmp_path: Path) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=2)
    first, reused = complete(storage, 1)
    store.add(first)
    second, _ = complete(storage, 2, reuse_shared=reused)
    store.add(second)
    third, own = complete(storage, 3)
    assert [c.checkpoint_id for c in store.add(third)] == [1]
    assert shared_file(tmp_path, reused).is_file(), "checkpoint 2 still references it"
    reader = second.open_state(reused)
    assert len(reader.read_all()) == 100
    fourth, _ = complete(storage, 4, reuse_shared=own)
    assert [c.checkpoint_id for c in store.add(fourth)] == [2]
    assert not shared_file(tmp_path, reused).exists(), "no retained checkpoint references it any more"
    assert shared_file(tmp_path, own).is_file()
    assert not chk(tmp_path, 1).exists()
    assert not chk(tmp_path, 2).exists()


def test_savepoints_are_never_retained_or_discarded(storage: CheckpointStorage, tmp_path: Path) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=1)
    writer = storage.begin_savepoint(JOB, 2)
    savepoint = writer.commit(CheckpointMetadata(2, JOB, CheckpointKind.SAVEPOINT, 5, ()))
    store.add(complete(storage, 1)[0])
    assert store.add(savepoint) == []
    assert [c.checkpoint_id for c in store.checkpoints] == [1]
    for cid in (3, 4):
        store.add(complete(storage, cid)[0])
    assert [p.directory for p in storage.discover("savepoints")] == [savepoint.directory]
    assert storage.load(savepoint.directory).kind is CheckpointKind.SAVEPOINT


def test_ids_must_increase(storage: CheckpointStorage) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=3)
    third, _ = complete(storage, 3)
    store.add(third)
    second, _ = complete(storage, 2)
    with pytest.raises(ValueError, match="checkpoint 2 is not newer than the latest retained 3"):
        store.add(second)
    with pytest.raises(ValueError, match="not newer"):
        store.add(third)
    assert [c.checkpoint_id for c in store.checkpoints] == [3]
    assert storage.load(second.directory).checkpoint_id == 2, "a refused checkpoint is not discarded"


def test_num_retained_must_be_positive(storage: CheckpointStorage) -> None:
    with pytest.raises(ValueError, match="num_retained"):
        CompletedCheckpointStore(storage, JOB, num_retained=0)


def test_recover_after_a_restart_and_subsume_on_the_next_add(storage: CheckpointStorage, tmp_path: Path) -> None:
    before = CompletedCheckpointStore(storage, JOB, num_retained=3)
    for cid in (1, 2, 3):
        before.add(complete(storage, cid)[0])
    # A restart: new storage and store objects over the same directory, with a smaller retention.
    reopened = CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), options=StreamOptions(inline_threshold=0))
    after = CompletedCheckpointStore(reopened, JOB, num_retained=2)
    assert after.latest() is None
    recovered = after.recover()
    assert [c.checkpoint_id for c in recovered] == [1, 2, 3]
    assert [c.checkpoint_id for c in after.checkpoints] == [1, 2, 3]
    assert [c.metadata for c in recovered] == [c.metadata for c in before.checkpoints]
    discarded = after.add(complete(reopened, 4)[0])
    assert [c.checkpoint_id for c in discarded] == [1, 2]
    assert sorted(p.name for p in (tmp_path / JOB).iterdir()) == ["chk-3", "chk-4", "shared"]


def test_recover_skips_a_corrupt_checkpoint(
    storage: CheckpointStorage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for cid in (1, 2, 3):
        complete(storage, cid)
    (chk(tmp_path, 2) / METADATA_FILE).write_bytes(b'{"format_version": 1, "checkpoint')
    writer = storage.begin_checkpoint(JOB, 4)
    with writer.open_stream("incomplete") as s:
        s.write(b"x")
        s.close()  # no _metadata: never recovered
    store = CompletedCheckpointStore(storage, JOB, num_retained=5)
    with caplog.at_level(logging.WARNING, logger="keystate.storage.retention"):
        recovered = store.recover()
    assert [c.checkpoint_id for c in recovered] == [1, 3]
    assert any("chk-2" in r.getMessage() for r in caplog.records)
    latest = store.latest()
    assert latest is not None
    assert latest.checkpoint_id == 3


class FailingDeletes(LocalObjectStore):
    """A local store whose deletes fail, as on a read-only mount or a revoked S3 permission."""

    def delete(self, key: str) -> None:
        raise StorageError(f"cannot delete {self.describe(key)}: read-only file system")

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)


def test_discard_failure_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = CheckpointStorage(FailingDeletes(tmp_path, fsync=False), options=StreamOptions(inline_threshold=0))
    store = CompletedCheckpointStore(storage, JOB)
    first, _ = complete(storage, 1)
    store.add(first)
    second, _ = complete(storage, 2)
    with caplog.at_level(logging.WARNING, logger="keystate.storage.retention"):
        discarded = store.add(second)
    assert [c.checkpoint_id for c in discarded] == [1]
    assert [c.checkpoint_id for c in store.checkpoints] == [2]
    assert any("could not discard" in r.getMessage() and "chk-1" in r.getMessage() for r in caplog.records)
    assert (chk(tmp_path, 1) / METADATA_FILE).is_file(), "nothing was deleted"


def test_recover_orders_by_id_keeps_savepoints_and_the_restored_checkpoint(
    storage: CheckpointStorage, tmp_path: Path
) -> None:
    """An earlier run left checkpoints 8..13 (ids past 9, so a string order would be wrong) and a savepoint;
    a new run restores from chk-10 and recovers them all, deleting nothing until its own checkpoint completes."""
    earlier = CompletedCheckpointStore(storage, JOB, num_retained=10)
    for cid in range(8, 14):
        earlier.add(complete(storage, cid)[0])
    savepoint = storage.begin_savepoint(JOB, 14).commit(CheckpointMetadata(14, JOB, CheckpointKind.SAVEPOINT, 5, ()))
    restored = storage.load(str(chk(tmp_path, 10).relative_to(tmp_path)))

    store = CompletedCheckpointStore(storage, JOB, num_retained=2)
    recovered = store.recover()
    assert [c.checkpoint_id for c in recovered] == [8, 9, 10, 11, 12, 13]
    assert (chk(tmp_path, 10) / METADATA_FILE).is_file(), "recovering deletes nothing"
    assert store.recover() == recovered, "recovering twice changes nothing"
    new, _ = complete(storage, 15)
    assert [c.checkpoint_id for c in store.add(new)] == [8, 9, 10, 11, 12]
    assert not chk(tmp_path, restored.checkpoint_id).exists(), "subsumed once a newer checkpoint completed"
    assert sorted(p.name for p in (tmp_path / JOB).iterdir()) == ["chk-13", "chk-15", "shared"]
    assert storage.load(savepoint.directory).kind is CheckpointKind.SAVEPOINT


def test_recover_keeps_checkpoints_added_before_it(storage: CheckpointStorage, tmp_path: Path) -> None:
    complete(storage, 1)
    store = CompletedCheckpointStore(storage, JOB, num_retained=3)
    second, _ = complete(storage, 2)
    store.add(second)
    (chk(tmp_path, 2) / METADATA_FILE).unlink()  # not listed any more, but retained: still subsumed later
    assert [c.checkpoint_id for c in store.recover()] == [1, 2]
    assert store.latest() is second
