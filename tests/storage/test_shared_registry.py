"""SharedStateRegistry: a shared file goes only when no retained checkpoint, no pending acknowledgement and
no subtask still building on a checkpoint needs it; failed checkpoints delete only their own files; the
orphan removal at start never deletes a file a checkpoint still in flight (a zombie's) may reference, and
a commit never references a shared file that is not there. Every test runs on local disk and on S3 (moto)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from keystate.storage import (
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
    PutMode,
    S3ObjectStore,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.checkpoint_writer import shared_file_writer
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.errors import MissingStateFilesError
from tests.conftest import BUCKET

JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStorage:
    if request.param == "local":
        return CheckpointStorage(LocalObjectStore(tmp_path, fsync=False))
    return CheckpointStorage(S3ObjectStore(BUCKET, "tenant", client=request.getfixturevalue("s3_client")))


def shared(writer: CheckpointWriter) -> StreamHandle:
    with writer.open_stream("op/0/keyed", HandleScope.SHARED) as s:
        s.start_block()
        s.write(os.urandom(64))
        return s.close()


def metadata(checkpoint_id: int, *streams: StreamHandle) -> CheckpointMetadata:
    base, *deltas = streams
    handle = KeyedStateHandle(
        KeyGroupRange(0, 0), (8,), base, tuple(KeyedStateHandle(KeyGroupRange(0, 0), (8,), d) for d in deltas)
    )
    op = OperatorState("op", 1, 128, subtasks=(SubtaskState(0, keyed=(handle,)),))
    return CheckpointMetadata(checkpoint_id, JOB, CheckpointKind.CHECKPOINT, 1, (op,))


def commit(writer: CheckpointWriter, *streams: StreamHandle) -> CompletedCheckpoint:
    return writer.commit(metadata(writer.checkpoint_id, *streams))


def key(handle: StreamHandle) -> str:
    assert handle.path is not None
    return f"{JOB}/shared/{handle.path}"


def exists(storage: CheckpointStorage, handle: StreamHandle) -> bool:
    return storage.store.exists(key(handle))


def restarted(storage: CheckpointStorage, retained: int = 2) -> CompletedCheckpointStore:
    """A new run of the job: its retention recovered what is on storage (nothing deployed yet)."""
    store = CompletedCheckpointStore(storage, JOB, num_retained=retained)
    store.recover()
    return store


def test_shared_handles_are_files_named_after_their_writer(storage: CheckpointStorage) -> None:
    handle = shared(storage.begin_checkpoint(JOB, 7))
    assert handle.scope is HandleScope.SHARED
    assert handle.written_by == 7
    assert handle.path is not None
    assert handle.path.startswith("by-chk-7/op/0/keyed-")
    assert shared_file_writer(handle.path) == 7
    other = shared(storage.begin_checkpoint(JOB, 7))
    assert other.path != handle.path, "two writers of one checkpoint id never collide"


def test_a_subsumed_base_stays_while_a_subtask_builds_on_it(storage: CheckpointStorage) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=1)
    registry = store.registry
    registry.deployment_started()
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    store.add(commit(w1, base))
    w2 = storage.begin_checkpoint(JOB, 2)
    full = shared(w2)
    registry.acknowledged(2, "s0", [full], incremental=True, based_on=None)
    registry.completed_in_deployment()
    store.add(commit(w2, full))  # checkpoint 1 subsumed; the subtask reported no chain past it yet
    assert exists(storage, base), "the subtask may still build on checkpoint 1"
    w3 = storage.begin_checkpoint(JOB, 3)
    delta = shared(w3)
    registry.acknowledged(3, "s0", [full, delta], incremental=True, based_on=2)  # pending: protects full
    assert registry.low_watermark == 2
    assert store.release_shared() == [key(base)]
    store.add(commit(w3, full, delta))
    assert exists(storage, full)
    assert exists(storage, delta)


def test_a_pending_acknowledgement_keeps_what_it_references(storage: CheckpointStorage) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=1)
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    store.add(commit(w1, base))
    store.registry.acknowledged(3, "s0", [base], incremental=True, based_on=1)
    w2 = storage.begin_checkpoint(JOB, 2)
    store.add(commit(w2, shared(w2)))
    assert exists(storage, base), "pending checkpoint 3 references it"
    store.registry.pending_ended(3)
    store.registry.task_finished("s0")
    store.release_shared()
    assert not exists(storage, base)


def test_an_aborted_checkpoint_deletes_only_the_files_it_wrote(storage: CheckpointStorage) -> None:
    store = CompletedCheckpointStore(storage, JOB, num_retained=1)
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    store.add(commit(w1, base))
    w2 = storage.begin_checkpoint(JOB, 2)
    delta = shared(w2)
    w2.discard([base, delta])  # a late acknowledgement of an aborted checkpoint, base included
    assert exists(storage, base)
    assert not exists(storage, delta)
    w3 = storage.begin_checkpoint(JOB, 3)
    own = shared(w3)
    w3.abort()
    assert exists(storage, base)
    assert not exists(storage, own)


def test_orphans_of_checkpoints_up_to_the_latest_go_at_recovery(storage: CheckpointStorage) -> None:
    first = CompletedCheckpointStore(storage, JOB, num_retained=2)
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    first.add(commit(w1, base))
    w2 = storage.begin_checkpoint(JOB, 2)
    unused = shared(w2)  # checkpoint 2 wrote it but does not reference it
    first.add(commit(w2, base, shared(w2)))
    never = shared(storage.begin_checkpoint(JOB, 1))  # another writer of id 1: it can never commit now
    again = restarted(storage)
    assert sorted(again.remove_orphans()) == sorted([key(unused), key(never)])
    assert exists(storage, base)


def test_orphans_stay_when_a_completed_checkpoint_could_not_be_read(storage: CheckpointStorage) -> None:
    first = CompletedCheckpointStore(storage, JOB, num_retained=2)
    for cid in (1, 2):
        writer = storage.begin_checkpoint(JOB, cid)
        first.add(commit(writer, shared(writer)))
    orphan = shared(storage.begin_checkpoint(JOB, 1))
    storage.store.put(f"{JOB}/chk-1/_metadata", b"{damaged", PutMode.OVERWRITE)
    unreadable = restarted(storage)
    assert unreadable.remove_orphans() == []
    assert exists(storage, orphan)


def test_a_zombie_checkpoint_in_flight_above_the_latest_keeps_its_files_and_commits(
    storage: CheckpointStorage,
) -> None:
    """A driver that is still running (or a second submit of the job id) writes checkpoint 2 while a new
    run starts from checkpoint 1: the new run's orphan removal leaves checkpoint 2's files alone, and the
    zombie's commit is complete and readable."""
    first = CompletedCheckpointStore(storage, JOB, num_retained=1)
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    first.add(commit(w1, base))
    zombie = storage.begin_checkpoint(JOB, 2)
    delta = shared(zombie)  # written, not yet committed
    again = restarted(storage)
    assert again.remove_orphans() == []
    completed = commit(zombie, base, delta)
    for handle in completed.metadata.handles():
        completed.open_state(handle).verify()


def test_kept_orphans_go_once_a_checkpoint_at_or_above_their_writer_completes(storage: CheckpointStorage) -> None:
    first = CompletedCheckpointStore(storage, JOB, num_retained=1)
    w1 = storage.begin_checkpoint(JOB, 1)
    first.add(commit(w1, shared(w1)))
    in_flight = shared(storage.begin_checkpoint(JOB, 2))  # its run died before checkpoint 2 completed
    beyond = shared(storage.begin_checkpoint(JOB, 3))
    again = restarted(storage, retained=1)
    assert again.remove_orphans() == []
    w2 = storage.begin_checkpoint(JOB, 2)  # the new run's checkpoint 2: the other writer of 2 lost
    own = shared(w2)
    again.add(commit(w2, own))
    assert not exists(storage, in_flight)
    assert exists(storage, beyond), "checkpoint 3 may still complete"
    assert exists(storage, own)
    w3 = storage.begin_checkpoint(JOB, 3)
    again.add(commit(w3, own, shared(w3)))
    assert not exists(storage, beyond)
    assert exists(storage, own)


def test_unnamed_and_unattributable_files_are_never_orphans(
    storage: CheckpointStorage, caplog: pytest.LogCaptureFixture
) -> None:
    stray = f"{JOB}/shared/op/0/keyed-0000000000000000.ksf"  # no by-chk-<id>: who wrote it is unknown
    storage.store.put(stray, b"written by hand or by an older keystate")
    nothing_completed = shared(storage.begin_checkpoint(JOB, 1))
    assert restarted(storage).remove_orphans() == [], "no completed checkpoint: every writer may be in flight"
    w1 = storage.begin_checkpoint(JOB, 1)
    first = CompletedCheckpointStore(storage, JOB)
    first.add(commit(w1, shared(w1)))
    with caplog.at_level(logging.WARNING, logger="keystate.storage.shared_registry"):
        assert restarted(storage).remove_orphans() == [key(nothing_completed)]
    assert storage.store.exists(stray)
    assert "whose names do not say which checkpoint wrote them" in caplog.text


def test_a_commit_refuses_a_shared_file_of_its_own_that_was_removed(storage: CheckpointStorage) -> None:
    kept = shared(storage.begin_checkpoint(JOB, 3))  # a base it reuses, still there
    writer = storage.begin_checkpoint(JOB, 4)
    removed = shared(writer)
    storage.store.delete(key(removed))  # e.g. another run's orphan removal
    with pytest.raises(MissingStateFilesError, match=r"shared state file\(s\)") as caught:
        commit(writer, kept, removed)
    message = str(caught.value)
    assert removed.describe in message
    assert f"expected {removed.size} bytes, found not in the store" in message
    assert "operator 'op' subtask 0" in message
    assert [h for _, _, h in caught.value.missing] == [removed]
    assert not storage.store.exists(f"{JOB}/chk-4/_metadata"), "nothing was written"


def test_a_commit_refuses_a_shared_file_of_another_size(storage: CheckpointStorage) -> None:
    writer = storage.begin_checkpoint(JOB, 4)
    handle = shared(writer)
    storage.store.put(key(handle), b"short", PutMode.OVERWRITE)
    with pytest.raises(MissingStateFilesError, match=f"expected {handle.size} bytes, found 5 bytes in the store"):
        commit(writer, handle)


def test_a_commit_refuses_a_reused_base_that_an_orphan_removal_deleted(storage: CheckpointStorage) -> None:
    """A zombie's subtask still builds on checkpoint 1, which its retention subsumed (``_metadata`` gone, the
    base kept for the subtask); a new run deletes that base as an orphan. The zombie's next checkpoint must
    not commit a reference to it."""
    first = CompletedCheckpointStore(storage, JOB, num_retained=1)
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    first.add(commit(w1, base))
    w2 = storage.begin_checkpoint(JOB, 2)
    first.registry.deployment_started()  # the subtasks may build on checkpoint 1: its base stays
    first.add(commit(w2, shared(w2)))
    assert not storage.store.exists(f"{JOB}/chk-1/_metadata")
    assert exists(storage, base)
    assert restarted(storage).remove_orphans() == [key(base)]
    zombie = storage.begin_checkpoint(JOB, 3)
    with pytest.raises(MissingStateFilesError, match="written by checkpoint 1; expected"):
        commit(zombie, base, shared(zombie))
