"""A restored incremental chain: continued by the next checkpoint of the same job (one new delta file,
based on the restored checkpoint), refused after a savepoint, for another job or job directory and
after a rescale; a failed write removes only the file it was writing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pytest

from keystate.statebackend import KVKeyedStateBackend, StateSnapshotError, key_group_range_for_subtask
from keystate.storage import CheckpointStorage, CompletedCheckpoint, HandleScope, KeyedStateHandle, KeyGroupRange
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.errors import StorageError
from keystate.storage.format.metadata import CheckpointKind
from tests.statebackend.incremental_support import (
    INCREMENTAL,
    LIST,
    MAP,
    VALUE,
    checkpoint,
    commit,
    restored_contents,
)
from tests.statebackend.support import JOB_ID, BackendFactory, key_group_of, keyed_metadata, kv_contents, storage_at

OTHER_JOB = "0b" + "1" * 30


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*.ksf"))


def _update(backend: KVKeyedStateBackend, keys: range, offset: int = 0) -> None:
    value = backend.get_state(VALUE)
    for k in keys:
        backend.set_current_key(k)
        value.update(k + offset)


def _chain(backend: KVKeyedStateBackend, storage: CheckpointStorage) -> tuple[CompletedCheckpoint, KeyedStateHandle]:
    """Checkpoints 1 (a base) and 2 (one delta), both confirmed; returns checkpoint 2 and its handle."""
    _update(backend, range(100))
    checkpoint(storage, backend, 1)
    _update(backend, range(0, 100, 9), offset=1000)
    second, chain, based_on = checkpoint(storage, backend, 2)
    assert based_on == 1
    assert chain is not None
    assert len(chain.deltas) == 1
    return second, chain


def test_the_next_checkpoint_of_the_same_job_adds_one_delta_to_the_restored_chain(
    new_backend: BackendFactory, storage: CheckpointStorage, tmp_path: Path
) -> None:
    second, chain = _chain(new_backend(), storage)
    resumed = new_backend()
    resumed.restore([(second, chain)])
    _update(resumed, range(3), offset=5000)
    before = _files(tmp_path)
    third, extended, based_on = checkpoint(storage, resumed, 3)
    assert based_on == 2
    assert extended is not None
    assert extended.stream == chain.stream  # the restored base
    assert extended.deltas[:-1] == chain.deltas
    assert extended.deltas[-1].stream.written_by == 3
    new_files = _files(tmp_path) - before
    assert len(new_files) == 1
    assert extended.deltas[-1].stream.path is not None
    assert next(iter(new_files)).name == Path(extended.deltas[-1].stream.path).name
    assert restored_contents("heap", third, extended) == kv_contents(resumed)
    # The chain goes on from there: the next delta builds on checkpoint 3.
    _update(resumed, range(5, 7), offset=6000)
    _, fourth, based_on = checkpoint(storage, resumed, 4)
    assert based_on == 3
    assert fourth is not None
    assert fourth.stream == chain.stream
    assert len(fourth.deltas) == 3


HALVES = [key_group_range_for_subtask(128, 2, i) for i in range(2)]


def _halves(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> tuple[CompletedCheckpoint, list[KeyedStateHandle]]:
    """Two subtasks (a half of the key groups each) with state: checkpoints 1 (bases) and 2 (deltas)."""
    old = [new_backend(key_groups=r, subtask_index=i) for i, r in enumerate(HALVES)]
    for i, b in enumerate(old):
        value = b.get_state(VALUE)
        for k in (k for k in range(300) if key_group_of(k) in HALVES[i]):
            b.set_current_key(k)
            value.update(k)
    commit(storage, 1, [b.snapshot(1, INCREMENTAL) for b in old])
    for b in old:
        b.notify_checkpoint_complete(1)
        b.set_current_key(next(k for k in range(300) if key_group_of(k) in b.key_groups))
        b.get_state(VALUE).update(-1)
    second, handles = commit(storage, 2, [b.snapshot(2, INCREMENTAL) for b in old])
    assert all(h is not None and len(h.deltas) == 1 for h in handles)
    return second, [h for h in handles if h is not None]


def test_handles_of_other_key_groups_do_not_stop_the_continuation(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    second, handles = _halves(new_backend, storage)
    resumed = new_backend(key_groups=HALVES[0])
    resumed.restore([(second, h) for h in handles])
    snapshot = resumed.snapshot(3, INCREMENTAL)
    assert snapshot.based_on == 2
    snapshot.release()


def test_a_restored_savepoint_is_not_continued(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    backend = new_backend()
    _chain(backend, storage)
    writer = storage.begin_savepoint(JOB_ID, 3)
    handle = backend.snapshot(3).write(writer, "op/0/keyed")
    assert handle is not None
    assert handle.stream.scope is not HandleScope.SHARED
    metadata = dataclasses.replace(keyed_metadata(3, "op", 128, [handle]), kind=CheckpointKind.SAVEPOINT)
    savepoint = writer.commit(metadata)
    resumed = new_backend()
    resumed.restore([(savepoint, handle)])
    _update(resumed, range(2), offset=7000)
    fourth, base, based_on = checkpoint(storage, resumed, 4)
    assert based_on is None
    assert base is not None
    assert base.deltas == ()
    assert base.stream.scope is HandleScope.SHARED
    assert base.stream.written_by == 4
    assert restored_contents("heap", fourth, base) == kv_contents(resumed)


def _write_for(storage: CheckpointStorage, job_id: str, backend: KVKeyedStateBackend, checkpoint_id: int) -> Any:
    snapshot = backend.snapshot(checkpoint_id, INCREMENTAL)
    taken_on = snapshot.based_on
    writer = storage.begin_checkpoint(job_id, checkpoint_id)
    handle = snapshot.write(writer, "op/0/keyed")
    completed = writer.commit(dataclasses.replace(keyed_metadata(checkpoint_id, "op", 128, [handle]), job_id=job_id))
    return completed, handle, taken_on, snapshot.based_on


@pytest.mark.parametrize("where", ["another job", "another job directory"])
def test_a_restored_chain_is_not_continued_by_another_job_or_directory(
    new_backend: BackendFactory, storage: CheckpointStorage, tmp_path: Path, where: str
) -> None:
    second, chain = _chain(new_backend(), storage)
    resumed = new_backend()
    resumed.restore([(second, chain)])
    _update(resumed, range(4), offset=8000)
    job_id, target = (OTHER_JOB, storage) if where == "another job" else (JOB_ID, storage_at(tmp_path / "elsewhere"))
    third, base, taken_on, based_on = _write_for(target, job_id, resumed, 3)
    assert taken_on == 2  # what the snapshot could tell before it knew the writer
    assert based_on is None
    assert base is not None
    assert base.deltas == ()
    assert base.stream.written_by == 3
    assert base.stream != chain.stream
    assert restored_contents("heap", third, base) == kv_contents(resumed)
    # Until a checkpoint of the new job is confirmed, every snapshot is a full base; then deltas again.
    _, again, taken_on, _ = _write_for(target, job_id, resumed, 4)
    assert taken_on is None
    assert again is not None
    assert again.deltas == ()
    resumed.notify_checkpoint_complete(4)
    _update(resumed, range(1), offset=9000)
    _, delta, taken_on, based_on = _write_for(target, job_id, resumed, 5)
    assert (taken_on, based_on) == (4, 4)
    assert delta is not None
    assert delta.stream == again.stream
    assert len(delta.deltas) == 1


@pytest.mark.parametrize("scale", ["out", "in"])
def test_a_rescaled_restore_is_not_continued(
    new_backend: BackendFactory, storage: CheckpointStorage, scale: str
) -> None:
    if scale == "out":  # one subtask of all key groups restored by a subtask of half of them
        second, chain = _chain(new_backend(), storage)
        resumed = new_backend(key_groups=key_group_range_for_subtask(128, 2, 0))
        resumed.restore([(second, chain)])
    else:  # two halves restored by one subtask of all key groups
        second, handles = _halves(new_backend, storage)
        resumed = new_backend(key_groups=KeyGroupRange(0, 127))
        resumed.restore([(second, h) for h in handles])
    snapshot = resumed.snapshot(3, INCREMENTAL)
    assert snapshot.based_on is None
    snapshot.release()


class _FailingStream:
    """A state stream whose second write fails (a disk that fills up halfway)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, data: bytes) -> None:
        self._writes += 1
        if self._writes > 1:
            raise StorageError("no space left on the device")
        self._stream.write(data)

    def __enter__(self) -> _FailingStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stream.__exit__(kind, exc, tb)


class _FailingWriter:
    def __init__(self, writer: CheckpointWriter) -> None:
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def open_stream(self, hint: str, scope: HandleScope = HandleScope.EXCLUSIVE) -> Any:
        return _FailingStream(self._writer.open_stream(hint, scope))


def test_a_failed_delta_removes_only_its_own_file_and_its_changes_go_into_the_next(
    new_backend: BackendFactory, storage: CheckpointStorage, tmp_path: Path
) -> None:
    backend = new_backend()
    second, chain = _chain(backend, storage)
    _update(backend, range(50), offset=4000)
    before = _files(tmp_path)
    snapshot = backend.snapshot(3, INCREMENTAL)
    assert snapshot.based_on == 2
    writer = storage.begin_checkpoint(JOB_ID, 3)
    with pytest.raises(StateSnapshotError, match="no space left"):
        snapshot.write(cast(CheckpointWriter, _FailingWriter(writer)), "op/0/keyed")
    writer.abort()
    assert _files(tmp_path) == before  # the base and the delta of checkpoint 2 are still there
    backend.notify_checkpoint_aborted(3)
    fourth, delta, based_on = checkpoint(storage, backend, 4)
    assert based_on == 2
    assert delta is not None
    assert delta.stream == chain.stream
    assert len(delta.deltas) == 2
    assert restored_contents("heap", fourth, delta) == kv_contents(backend)
    assert restored_contents("heap", second, chain) != kv_contents(backend)


@pytest.mark.parametrize("restore_kind", ["heap", "lmdb"])
@pytest.mark.parametrize("write", ["m_put", "v_update", "l_add"])
def test_state_written_after_restoring_an_empty_checkpoint_is_in_the_next_checkpoints(
    new_backend: BackendFactory, storage: CheckpointStorage, restore_kind: str, write: str
) -> None:
    # The falsifying example of the property test: checkpoint an empty backend, restore it (no handle),
    # write one entry, checkpoint again (twice: a base, then a delta on it), restore each.
    empty = new_backend()
    _, nothing, _ = checkpoint(storage, empty, 1)
    assert nothing is None
    resumed = new_backend(restore_kind)
    resumed.restore([])
    resumed.set_current_key(0)
    if write == "m_put":
        resumed.get_state(MAP).put(0, "")
    elif write == "v_update":
        resumed.get_state(VALUE).update(7)
    else:
        resumed.get_state(LIST).add("x")
    expected = kv_contents(resumed)
    assert len(expected) == 1
    second, base, based_on = checkpoint(storage, resumed, 2)
    assert based_on is None  # no chain to extend: a full shared base
    assert base is not None
    assert base.deltas == ()
    assert base.stream.written_by == 2
    resumed.set_current_key(1)
    resumed.get_state(VALUE).update(8)
    third, chain, based_on = checkpoint(storage, resumed, 3)
    assert based_on == 2
    assert chain is not None
    assert len(chain.deltas) == 1
    assert chain.stream == base.stream
    for kind in ("heap", "lmdb"):
        assert restored_contents(kind, second, base) == expected
        assert restored_contents(kind, third, chain) == kv_contents(resumed)
    again = new_backend(restore_kind)
    again.restore([(third, chain)])
    again.set_current_key(0)
    if write == "m_put":
        assert list(again.get_state(MAP).items()) == [(0, "")]
    elif write == "v_update":
        assert again.get_state(VALUE).value() == 7
    else:
        assert again.get_state(LIST).get() == ["x"]
    again.set_current_key(1)
    assert again.get_state(VALUE).value() == 8
