"""CheckpointWriter.commit refuses metadata that references exclusive state files nobody vouched for.

The committing writer knows what it wrote (every stream it closed successfully); files other writers put
into the same checkpoint directory (worker processes of an embedding runtime) are vouched for with
``CheckpointWriter.adopt``, with the handles the workers shipped as JSON. Inline handles need no file and
shared ones are not checked. The check costs no request to the store.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import pytest

from keystate.storage import (
    METADATA_FILE,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CommitFailedError,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    MemoryObjectStore,
    ObjectInfo,
    ObjectWriter,
    OperatorState,
    PutMode,
    StorageError,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.errors import MissingStateFilesError
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
from keystate.storage.format import handle_from_json, handle_to_json, subtask_state_from_json, subtask_state_to_json
from tests.storage.checkpoint_support import (
    BASE,
    JOB,
    OPTIONS,
    CheckpointStorageContract,
    assert_readable,
    keys,
    write_state,
)


def _stream(
    storage: CheckpointStorage, writer_id: int, hint: str, scope: HandleScope = HandleScope.EXCLUSIVE
) -> StreamHandle:
    """One state file of ``hint`` written into checkpoint ``writer_id`` by a writer of its own (a worker)."""
    with storage.begin_checkpoint(JOB, writer_id).open_stream(hint, scope) as stream:
        stream.start_block()
        stream.write(os.urandom(2000))
        return stream.close()


def _metadata(checkpoint_id: int, *subtasks: SubtaskState) -> CheckpointMetadata:
    return CheckpointMetadata(
        checkpoint_id,
        JOB,
        CheckpointKind.CHECKPOINT,
        1_000,
        (OperatorState("op", len(subtasks), 4, subtasks=subtasks),),
    )


def _keyed(index: int, stream: StreamHandle) -> SubtaskState:
    return SubtaskState(index, keyed=(KeyedStateHandle(KeyGroupRange(index, index), (8,), stream),))


class CountingStore(MemoryObjectStore):
    """A memory store that records the name of every request made to it (to show the check makes none)."""

    def __init__(self) -> None:
        super().__init__("counting")
        self.calls: list[str] = []

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self.calls.append("get_range")
        return super().get_range(key, start, length)

    def size(self, key: str) -> int:
        self.calls.append("size")
        return super().size(key)

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        self.calls.append("put")
        super().put(key, data, mode)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        self.calls.append("open_writer")
        return super().open_writer(key, mode)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls.append("list_objects")
        return super().list_objects(prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        self.calls.append("list_dirs")
        return super().list_dirs(prefix)


class TestCommitFileCheck(CheckpointStorageContract):
    def test_a_file_nobody_wrote_is_refused_and_nothing_is_written(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer, shared=False)
        ghost = dataclasses.replace(next(written.metadata.handles()), path="ghost/2/keyed-0123456789abcdef.ksf")
        other = OperatorState("ghost", 3, 4, subtasks=(_keyed(2, ghost),))
        forged = dataclasses.replace(written.metadata, operators=(*written.metadata.operators, other))
        before = keys(storage.store, BASE)
        with pytest.raises(MissingStateFilesError) as info:
            writer.commit(forged)
        assert isinstance(info.value, CommitFailedError)
        message = str(info.value)
        assert "operator 'ghost' subtask 2: exclusive:ghost/2/keyed-0123456789abcdef.ksf" in message
        assert "1 exclusive state file(s)" in message
        assert "writer.adopt" in message
        assert [(uid, index, h.path) for uid, index, h in info.value.missing] == [("ghost", 2, ghost.path)]
        assert keys(storage.store, BASE) == before, "a refused commit writes nothing"
        assert not storage.store.exists(f"{writer.directory}/{METADATA_FILE}")
        # The writer is still usable: the real metadata commits.
        assert_readable(writer.commit(written.metadata), written)

    def test_files_written_by_other_writers_commit_once_adopted(self, storage: CheckpointStorage) -> None:
        # Two workers, each with its own writer for checkpoint 2, ship their state as JSON.
        forms = [json.dumps(subtask_state_to_json(_keyed(i, _stream(storage, 2, f"op/{i}/keyed")))) for i in (0, 1)]
        subtasks = tuple(subtask_state_from_json(json.loads(f)) for f in forms)
        metadata = _metadata(2, *subtasks)
        coordinator = storage.begin_checkpoint(JOB, 2)
        with pytest.raises(MissingStateFilesError, match="operator 'op' subtask 0: exclusive:op/0/keyed-") as info:
            coordinator.commit(metadata)
        assert [index for _, index, _ in info.value.missing] == [0, 1]
        coordinator.adopt(subtasks[:1])
        with pytest.raises(MissingStateFilesError, match="subtask 1") as info:
            coordinator.commit(metadata)
        assert [index for _, index, _ in info.value.missing] == [1]
        # A single handle shipped on its own (handle_to_json) is adopted the same way.
        coordinator.adopt([handle_from_json(json.loads(json.dumps(handle_to_json(subtasks[1].keyed[0]))))])
        completed = coordinator.commit(metadata)
        loaded = storage.load(completed.directory)
        for subtask in loaded.metadata.operators[0].subtasks:
            assert loaded.open_state(subtask.keyed[0].stream).verify() == 2000

    def test_inline_and_shared_handles_need_no_adoption(self, storage: CheckpointStorage) -> None:
        shared = _stream(storage, 3, "op/0/keyed", HandleScope.SHARED)
        assert shared.scope is HandleScope.SHARED
        coordinator = storage.begin_checkpoint(JOB, 3)
        with coordinator.open_stream("op/1/keyed") as stream:
            stream.write(b"tiny")
            inline = stream.close()
        assert inline.scope is HandleScope.INLINE
        completed = coordinator.commit(_metadata(3, _keyed(0, shared), _keyed(1, inline)))
        assert storage.load(completed.directory).metadata == completed.metadata

    def test_adopting_after_the_commit_is_refused(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_checkpoint(JOB, 4)
        writer.commit(CheckpointMetadata(4, JOB, CheckpointKind.CHECKPOINT, 1, ()))
        with pytest.raises(StorageError, match="cannot adopt"):
            writer.adopt([])


def test_a_stream_whose_close_failed_is_not_vouched_for() -> None:
    faulty = FaultyObjectStore(MemoryObjectStore("check"))
    storage = CheckpointStorage(faulty, BASE, options=OPTIONS)
    writer = storage.begin_checkpoint(JOB, 1)
    with writer.open_stream("op/0/keyed") as good:
        good.write(os.urandom(2000))
        kept = good.close()
    faulty.add(FaultRule(Fault.INTERNAL_ERROR, "close", key="*op/1/*"))
    failed = writer.open_stream("op/1/keyed")
    failed.write(os.urandom(2000))
    with pytest.raises(StorageError):
        failed.close()
    # What a buggy runtime might still put into metadata: the handle the failed stream would have had.
    assert kept.path is not None
    lost = dataclasses.replace(kept, path=kept.path.replace("op/0/", "op/1/"))
    with pytest.raises(MissingStateFilesError, match="subtask 1"):
        writer.commit(_metadata(1, _keyed(0, kept), _keyed(1, lost)))
    writer.commit(_metadata(1, _keyed(0, kept)))


def test_the_check_makes_no_request() -> None:
    store = CountingStore()
    storage = CheckpointStorage(store, BASE, options=OPTIONS)
    worker = _stream(storage, 1, "op/0/keyed")
    coordinator = storage.begin_checkpoint(JOB, 1)
    coordinator.adopt([worker])
    store.calls.clear()
    with pytest.raises(MissingStateFilesError):
        coordinator.commit(_metadata(1, _keyed(0, worker), _keyed(1, dataclasses.replace(worker, path="op/1/x.ksf"))))
    assert store.calls == [], "refusing costs no request"
    coordinator.commit(_metadata(1, _keyed(0, worker)))
    assert store.calls == ["put"], "a commit is one create-only put"


def test_a_discarded_file_no_longer_vouches() -> None:
    storage = CheckpointStorage(MemoryObjectStore("discard"), BASE, options=OPTIONS)
    writer = storage.begin_checkpoint(JOB, 1)
    with writer.open_stream("op/0/keyed") as stream:
        stream.write(os.urandom(2000))
        handle = stream.close()
    writer.discard(iter([handle]))  # the part of a snapshot that failed halfway
    with pytest.raises(MissingStateFilesError, match="subtask 0"):
        writer.commit(_metadata(1, _keyed(0, handle)))
