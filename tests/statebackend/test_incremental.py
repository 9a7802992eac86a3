"""Incremental keyed snapshots: deltas, tombstones, TTL, chains across restores and rescales, materialization,
aborted checkpoints, damaged delta files, and delta sizes that follow the changes, not the state."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from keystate.statebackend import (
    AggregatingStateDescriptor,
    BytesSerializer,
    IntSerializer,
    KVKeyedStateBackend,
    StateRestoreError,
    ValueStateDescriptor,
    key_group_range_for_subtask,
)
from keystate.statebackend.inspection import check_keyed_handle, read_keyed_entries
from keystate.statebackend.state import SnapshotOptions
from keystate.statebackend.ttl import TtlConfig
from keystate.storage import CheckpointStorage, HandleScope, KeyGroupRange
from tests.statebackend.incremental_support import (
    INCREMENTAL,
    LIST,
    MAP,
    SUM,
    VALUE,
    checkpoint,
    commit,
    restored_contents,
)
from tests.statebackend.support import JOB_ID, BackendFactory, ManualClock, kv_contents, make_backend


class _Count:
    def create_accumulator(self) -> int:
        return 0

    def add(self, value: int, accumulator: int) -> int:
        return accumulator + 1

    def get_result(self, accumulator: int) -> int:
        return accumulator


COUNT = AggregatingStateDescriptor[int, int, int](name="count", serializer=IntSerializer(), aggregate_function=_Count())


def fill(backend: KVKeyedStateBackend, keys: range) -> None:
    v, items, m, total = (
        backend.get_state(VALUE),
        backend.get_state(LIST),
        backend.get_state(MAP),
        backend.get_state(SUM),
    )
    count = backend.get_state(COUNT)
    for k in keys:
        backend.set_current_key(k)
        v.update(k)
        items.add(f"e{k}")
        m.put(k % 5, f"m{k}")
        total.add(k)
        count.add(k)


def test_a_delta_holds_every_kind_of_change_and_restores_exactly(
    new_backend: BackendFactory, storage: CheckpointStorage, backend_kind: str
) -> None:
    backend = new_backend()
    fill(backend, range(40))
    _first, base, based_on = checkpoint(storage, backend, 1)
    assert base is not None
    assert based_on is None
    assert not base.deltas
    assert base.stream.scope is HandleScope.SHARED
    assert base.stream.written_by == 1
    v, items, m, total = (
        backend.get_state(VALUE),
        backend.get_state(LIST),
        backend.get_state(MAP),
        backend.get_state(SUM),
    )
    count = backend.get_state(COUNT)
    backend.set_current_key(3)
    v.clear()  # a tombstone over the base's value
    items.add("appended")  # a list append: the delta holds the whole list
    m.remove(3)
    m.put(9, "new")
    total.add(100)
    count.add(1)
    backend.set_current_key(4)
    m.clear()  # delete_prefix
    for state in (v, items, m):
        state.set_namespace(b"window-1")
        state.clear()
        state.set_namespace(b"")
    backend.set_current_key(7)
    v.set_namespace(b"window-2")
    v.update(77)
    second, chain, based_on = checkpoint(storage, backend, 2)
    assert chain is not None
    assert based_on == 1
    assert chain.stream == base.stream
    assert len(chain.deltas) == 1
    assert chain.deltas[0].stream.written_by == 2
    assert chain.deltas[0].stream.scope is HandleScope.SHARED
    assert chain.deltas[0].stream.size < base.stream.size
    expected = kv_contents(backend)
    for kind in ("lmdb", "heap"):
        assert restored_contents(kind, second, chain) == expected
    merged = {(e.state.name, e.key, e.namespace, e.user_key): e.values for e in read_keyed_entries(second, chain, "op")}
    assert len(merged) == len(expected)
    assert check_keyed_handle(second, chain, "op") == len(expected)


def test_no_change_reuses_the_chain_and_aborted_changes_go_into_the_next_delta(
    backend: KVKeyedStateBackend, storage: CheckpointStorage
) -> None:
    fill(backend, range(20))
    checkpoint(storage, backend, 1)
    _, unchanged, based_on = checkpoint(storage, backend, 2)
    assert unchanged is not None
    assert based_on == 1
    assert not unchanged.deltas
    backend.set_current_key(1)
    backend.get_state(VALUE).update(1000)
    _aborted_cp, _aborted, _ = checkpoint(storage, backend, 3, confirm=False)
    backend.notify_checkpoint_aborted(3)
    backend.set_current_key(2)
    backend.get_state(VALUE).update(2000)
    failed = backend.snapshot(4, INCREMENTAL)
    failed.release()  # its write never happened
    backend.set_current_key(5)
    backend.get_state(VALUE).clear()
    fifth, chain, based_on = checkpoint(storage, backend, 5)
    assert based_on == 2
    assert chain is not None
    assert len(chain.deltas) == 1
    restored = make_backend("heap")
    try:
        restored.restore([(fifth, chain)])
        value = restored.get_state(VALUE)
        for key, want in ((1, 1000), (2, 2000), (5, None), (6, 6)):
            restored.set_current_key(key)
            assert value.value() == want
    finally:
        restored.close()


def test_materialization_by_count_and_by_ratio(backend: KVKeyedStateBackend, storage: CheckpointStorage) -> None:
    fill(backend, range(200))
    value = backend.get_state(VALUE)
    by_count = SnapshotOptions(incremental=True, max_chain_length=2, max_delta_ratio=100.0)
    lengths = []
    for checkpoint_id in range(1, 8):
        backend.set_current_key(checkpoint_id)
        value.update(-checkpoint_id)
        _, handle, _ = checkpoint(storage, backend, checkpoint_id, by_count)
        assert handle is not None
        lengths.append(len(handle.deltas))
    assert lengths == [0, 1, 2, 0, 1, 2, 0]
    by_ratio = SnapshotOptions(incremental=True, max_chain_length=100, max_delta_ratio=0.01)
    backend.set_current_key(0)
    value.update(5)
    _, handle, _ = checkpoint(storage, backend, 8, by_ratio)  # on 7's new base: one delta
    assert handle is not None
    assert len(handle.deltas) == 1
    backend.set_current_key(0)
    value.update(6)
    ninth, handle, based_on = checkpoint(storage, backend, 9, by_ratio)  # the delta outweighs 1 % of the base
    assert handle is not None
    assert not handle.deltas
    assert based_on is None
    assert handle.stream.written_by == 9
    assert restored_contents("heap", ninth, handle) == kv_contents(backend)


def test_a_savepoint_is_full_and_leaves_the_chain_alone(
    backend: KVKeyedStateBackend, storage: CheckpointStorage
) -> None:
    fill(backend, range(30))
    checkpoint(storage, backend, 1)
    backend.set_current_key(2)
    backend.get_state(VALUE).update(222)
    snapshot = backend.snapshot(2, SnapshotOptions(incremental=False))
    assert snapshot.based_on is None
    writer = storage.begin_savepoint(JOB_ID, 2)
    savepoint = snapshot.write(writer, "op/0/keyed")
    writer.abort()
    assert savepoint is not None
    assert not savepoint.deltas
    assert savepoint.stream.scope is not HandleScope.SHARED
    backend.notify_checkpoint_complete(2)  # not an incremental snapshot: ignored
    third, chain, based_on = checkpoint(storage, backend, 3)
    assert based_on == 1
    assert chain is not None
    assert len(chain.deltas) == 1
    assert restored_contents("heap", third, chain) == kv_contents(backend)


def test_a_restore_of_the_same_key_groups_continues_the_chain(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    backend = new_backend()
    fill(backend, range(30))
    checkpoint(storage, backend, 1)
    backend.set_current_key(1)
    backend.get_state(VALUE).update(11)
    second, chain, _ = checkpoint(storage, backend, 2)
    assert chain is not None
    resumed = new_backend()
    resumed.restore([(second, chain)])
    resumed.set_current_key(2)
    resumed.get_state(VALUE).update(22)
    third, extended, based_on = checkpoint(storage, resumed, 3)
    assert based_on == 2
    assert extended is not None
    assert extended.stream == chain.stream
    assert extended.deltas[:1] == chain.deltas
    assert len(extended.deltas) == 2
    assert restored_contents("heap", third, extended) == kv_contents(resumed)


def test_a_rescaled_restore_reads_its_key_groups_of_a_chain_and_starts_a_new_base(
    new_backend: BackendFactory, storage: CheckpointStorage, backend_kind: str
) -> None:
    halves = [key_group_range_for_subtask(128, 2, i) for i in range(2)]
    old = [new_backend(key_groups=r, subtask_index=i) for i, r in enumerate(halves)]
    keys = range(200)
    owners = {k: next(i for i, r in enumerate(halves) if _kg(k) in r) for k in keys}
    for k in keys:
        b = old[owners[k]]
        b.set_current_key(k)
        b.get_state(VALUE).update(k)
    commit(storage, 1, [b.snapshot(1, INCREMENTAL) for b in old])
    for b in old:
        b.notify_checkpoint_complete(1)
    for k in range(0, 200, 7):
        b = old[owners[k]]
        b.set_current_key(k)
        b.get_state(VALUE).clear() if k % 2 else b.get_state(VALUE).update(-k)
    second, handles = commit(storage, 2, [b.snapshot(2, INCREMENTAL) for b in old])
    assert all(h is not None and len(h.deltas) == 1 for h in handles)
    whole = new_backend(key_groups=KeyGroupRange(0, 127))
    whole.restore([(second, h) for h in handles if h is not None])
    value = whole.get_state(VALUE)
    for k in keys:
        whole.set_current_key(k)
        assert value.value() == (None if k % 7 == 0 and k % 2 else -k if k % 7 == 0 else k)
    snapshot = whole.snapshot(3, INCREMENTAL)
    assert snapshot.based_on is None  # after a rescale the next checkpoint is a full base
    snapshot.release()


def _kg(key: int) -> int:
    from tests.statebackend.support import key_group_of

    return key_group_of(key)


def test_ttl_values_carry_their_timestamps_and_expired_ones_become_tombstones(
    new_backend: BackendFactory, storage: CheckpointStorage, backend_kind: str
) -> None:
    clock = ManualClock()
    backend = new_backend(clock=clock)
    ttl = ValueStateDescriptor[int](name="ttl", serializer=IntSerializer(), ttl=TtlConfig(1000))
    value = backend.get_state(ttl)
    for k in range(10):
        backend.set_current_key(k)
        value.update(k)
    checkpoint(storage, backend, 1)
    clock.advance(600)
    backend.set_current_key(1)
    value.update(100)  # a fresh timestamp
    clock.advance(600)  # key 1 lives (600 ms old), the others expired
    second, chain, _ = checkpoint(storage, backend, 2)
    assert chain is not None
    assert len(chain.deltas) == 1
    restored = new_backend(clock=clock)
    restored.restore([(second, chain)])
    restored_value = restored.get_state(ttl)
    for k in range(10):
        restored.set_current_key(k)
        assert restored_value.value() == (100 if k == 1 else None)
    restored.set_current_key(1)
    clock.advance(500)
    assert restored_value.value() is None  # the restored timestamp is the written one


def test_delta_bytes_follow_the_changes_not_the_state(tmp_path: Path) -> None:
    sizes = []
    for total in (2_000, 20_000):
        storage = CheckpointStorage.__new__(CheckpointStorage)
        from tests.statebackend.support import storage_at

        storage = storage_at(tmp_path / f"s{total}")
        backend = make_backend("lmdb", buffer_entries=10_000, map_size=64 << 20)
        try:
            blob = backend.get_state(ValueStateDescriptor[bytes](name="b", serializer=BytesSerializer()))
            rng = random.Random(total)
            for k in range(total):
                backend.set_current_key(k)
                blob.update(rng.randbytes(100))
            checkpoint(storage, backend, 1)
            for k in rng.sample(range(total), 100):  # the same number of changed keys
                backend.set_current_key(k)
                blob.update(rng.randbytes(100))
            _, chain, _ = checkpoint(storage, backend, 2)
            assert chain is not None
            assert len(chain.deltas) == 1
            sizes.append((chain.stream.size, chain.deltas[0].stream.size))
        finally:
            backend.close()
    (base_small, delta_small), (base_large, delta_large) = sizes
    assert base_large > 8 * base_small
    assert delta_large < 1.3 * delta_small


@pytest.fixture
def chain_on_disk(storage: CheckpointStorage, tmp_path: Path) -> tuple[object, object, Path]:
    backend = make_backend("heap")
    try:
        fill(backend, range(50))
        checkpoint(storage, backend, 1)
        backend.set_current_key(3)
        backend.get_state(VALUE).update(3333)
        second, chain, _ = checkpoint(storage, backend, 2)
    finally:
        backend.close()
    assert chain is not None
    assert chain.deltas[0].stream.path is not None
    shared = tmp_path / "checkpoints" / JOB_ID / "shared" / chain.deltas[0].stream.path
    assert shared.is_file()
    return second, chain, shared


def test_a_damaged_delta_is_a_restore_error_naming_the_file(chain_on_disk: tuple[object, object, Path]) -> None:
    second, chain, path = chain_on_disk
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    restored = make_backend("heap")
    try:
        with pytest.raises(StateRestoreError, match=r"delta file .*") as info:
            restored.restore([(second, chain)])  # type: ignore[list-item]
        assert path.name in str(info.value)
    finally:
        restored.close()


def test_a_truncated_delta_is_a_restore_error(chain_on_disk: tuple[object, object, Path]) -> None:
    second, chain, path = chain_on_disk
    path.write_bytes(path.read_bytes()[:-30])
    restored = make_backend("lmdb")
    try:
        with pytest.raises(StateRestoreError, match=path.name):
            restored.restore([(second, chain)])  # type: ignore[list-item]
    finally:
        restored.close()


def test_a_delta_that_does_not_belong_to_its_handle_is_refused(chain_on_disk: tuple[object, object, Path]) -> None:
    second, chain, _ = chain_on_disk
    delta = chain.deltas[0]  # type: ignore[attr-defined]
    wrong = dataclasses.replace(delta, stream=dataclasses.replace(delta.stream, written_by=5))
    restored = make_backend("heap")
    try:
        with pytest.raises(StateRestoreError, match=r"handle says checkpoint 5 wrote it, its header says 2"):
            restored.restore([(second, dataclasses.replace(chain, deltas=(wrong,)))])  # type: ignore[list-item,type-var]
    finally:
        restored.close()


def test_an_incremental_snapshot_needs_its_checkpoint_id(backend: KVKeyedStateBackend) -> None:
    with pytest.raises(ValueError, match="needs the checkpoint id"):
        backend.snapshot(None, INCREMENTAL)
