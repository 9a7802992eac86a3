"""SharedStateRegistry: a shared file goes only when no retained checkpoint, no pending acknowledgement and
no subtask still building on a checkpoint needs it; failed checkpoints delete only their own files."""

from __future__ import annotations

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
    StreamHandle,
    SubtaskState,
)
from keystate.storage.checkpoints import CheckpointWriter

JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    return CheckpointStorage(LocalObjectStore(tmp_path, fsync=False))


def shared(writer: CheckpointWriter) -> StreamHandle:
    with writer.open_stream("op/0/keyed", HandleScope.SHARED) as s:
        s.start_block()
        s.write(os.urandom(64))
        return s.close()


def commit(writer: CheckpointWriter, *streams: StreamHandle) -> CompletedCheckpoint:
    base, *deltas = streams
    handle = KeyedStateHandle(
        KeyGroupRange(0, 0), (8,), base, tuple(KeyedStateHandle(KeyGroupRange(0, 0), (8,), d) for d in deltas)
    )
    op = OperatorState("op", 1, 128, subtasks=(SubtaskState(0, keyed=(handle,)),))
    metadata = CheckpointMetadata(writer.checkpoint_id, JOB, CheckpointKind.CHECKPOINT, 1, (op,))
    return writer.commit(metadata)


def exists(storage: CheckpointStorage, handle: StreamHandle) -> bool:
    assert handle.path is not None
    return storage.store.exists(f"{JOB}/shared/{handle.path}")


def test_shared_handles_are_files_with_their_writer(storage: CheckpointStorage) -> None:
    handle = shared(storage.begin_checkpoint(JOB, 7))
    assert handle.scope is HandleScope.SHARED
    assert handle.written_by == 7
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
    assert store.release_shared() == [f"{JOB}/shared/{base.path}"]
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


def test_orphans_go_at_recovery_unless_a_checkpoint_could_not_be_read(storage: CheckpointStorage) -> None:
    first = CompletedCheckpointStore(storage, JOB, num_retained=2)
    w1 = storage.begin_checkpoint(JOB, 1)
    base = shared(w1)
    first.add(commit(w1, base))
    orphan = shared(storage.begin_checkpoint(JOB, 2))  # its checkpoint never completed
    again = CompletedCheckpointStore(storage, JOB, num_retained=2)
    again.recover()
    assert again.remove_orphans() == [f"{JOB}/shared/{orphan.path}"]
    assert exists(storage, base)
    orphan = shared(storage.begin_checkpoint(JOB, 2))
    (Path(storage.store.describe(f"{JOB}/chk-1")) / "_metadata").write_bytes(b"{damaged")
    unreadable = CompletedCheckpointStore(storage, JOB, num_retained=2)
    unreadable.recover()
    assert unreadable.remove_orphans() == []
    assert exists(storage, orphan)
    assert exists(storage, base)
