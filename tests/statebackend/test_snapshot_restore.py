"""Snapshots see the state at snapshot time; restore brings exactly that state back (both engines)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from keystate.statebackend import (
    IntSerializer,
    KVKeyedStateBackend,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    StateError,
    StateSnapshotError,
    StrSerializer,
    ValueState,
    ValueStateDescriptor,
)
from keystate.storage import CheckpointStorage, HandleScope, KeyedStateHandle, KeyGroupRange
from tests.statebackend.support import (
    BACKENDS,
    JOB_ID,
    BackendFactory,
    checkpoint_backends,
    key_group_of,
    keyed_metadata,
    kv_contents,
    storage_at,
    write_keyed,
)

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())
LOG = ListStateDescriptor[str](name="log", serializer=StrSerializer())
ATTRS = MapStateDescriptor[str, int](name="attrs", serializer=IntSerializer(), key_serializer=StrSerializer())


def _add(a: int, b: int) -> int:
    return a + b


SUM = ReducingStateDescriptor[int](name="sum", serializer=IntSerializer(), reduce_function=_add)


def states(
    backend: KVKeyedStateBackend,
) -> tuple[ValueState[int], ListState[str], MapState[str, int], ReducingState[int]]:
    return backend.get_state(COUNT), backend.get_state(LOG), backend.get_state(ATTRS), backend.get_state(SUM)


Model = dict[object, tuple[int | None, list[str], dict[str, int], int | None]]


def populate(backend: KVKeyedStateBackend, keys: range, salt: int = 0) -> None:
    count, log, attrs, total = states(backend)
    for k in keys:
        backend.set_current_key(k)
        count.update(k + salt)
        log.add_all([f"{k}-a", f"{k}-b"])
        attrs.put_all({"x": k, "y": -k})
        total.add(k)
        if k % 7 == 0:
            attrs.set_namespace(b"window")
            attrs.put("w", salt)
            attrs.set_namespace(b"")


def model_of(backend: KVKeyedStateBackend, keys: range) -> Model:
    count, log, attrs, total = states(backend)
    out: Model = {}
    for k in keys:
        backend.set_current_key(k)
        out[k] = (count.value(), log.get(), dict(attrs.items()), total.get())
    return out


def mutate(backend: KVKeyedStateBackend, keys: range) -> None:
    count, log, attrs, total = states(backend)
    for k in keys:
        backend.set_current_key(k)
        if k % 3 == 0:
            count.clear()
            log.clear()
            attrs.clear()
            total.clear()
        else:
            count.update(-1)
            log.add("later")
            attrs.remove("x")
            attrs.put("z", 0)
            total.add(1000)
    for k in range(keys.stop, keys.stop + 10):  # keys that did not exist at snapshot time
        backend.set_current_key(k)
        count.update(k)


def restore_one(
    new_backend: BackendFactory, storage: CheckpointStorage, backend: KVKeyedStateBackend, checkpoint_id: int = 1
) -> KVKeyedStateBackend:
    completed, handles = checkpoint_backends(storage, checkpoint_id, [backend])
    restored = new_backend()
    restored.restore([(completed, h) for h in handles if h is not None])
    return restored


def test_restore_same_parallelism_returns_everything(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    keys = range(200)
    backend = new_backend()
    populate(backend, keys)
    expected = model_of(backend, keys)
    restored = restore_one(new_backend, storage, backend)
    assert model_of(restored, keys) == expected
    assert kv_contents(restored) == kv_contents(backend)
    assert sorted(restored.keys("count")) == list(keys)
    attrs = restored.get_state(ATTRS)
    attrs.set_namespace(b"window")
    restored.set_current_key(14)
    assert dict(attrs.items()) == {"w": 0}


def test_snapshot_sees_the_state_at_snapshot_time(
    new_backend: BackendFactory, durable_storage: CheckpointStorage
) -> None:
    storage = durable_storage
    keys = range(120)
    backend = new_backend()
    populate(backend, keys)
    expected = model_of(backend, keys)
    raw = kv_contents(backend)
    snapshot = backend.snapshot()
    mutate(backend, keys)  # processing continues before the asynchronous part runs
    after = model_of(backend, keys)
    assert after != expected
    completed, (handle,) = write_keyed(storage, 1, [snapshot])
    assert handle is not None
    restored = new_backend()
    restored.restore([(completed, handle)])
    assert model_of(restored, keys) == expected
    assert kv_contents(restored) == raw
    assert sorted(restored.keys("count")) == list(keys)  # the keys added later are absent
    assert model_of(backend, keys) == after  # writing the snapshot did not disturb live state


def test_several_snapshots_in_flight(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    keys = range(60)
    backend = new_backend()
    populate(backend, keys)
    first_model = model_of(backend, keys)
    first = backend.snapshot()
    mutate(backend, keys)
    second_model = model_of(backend, keys)
    second = backend.snapshot()
    populate(backend, keys, salt=5)
    third = backend.snapshot()
    third_model = model_of(backend, keys)
    # written out of order, each shows its own moment
    c3, (h3,) = write_keyed(storage, 3, [third])
    c1, (h1,) = write_keyed(storage, 1, [first])
    c2, (h2,) = write_keyed(storage, 2, [second])
    for completed, handle, expected in ((c1, h1, first_model), (c2, h2, second_model), (c3, h3, third_model)):
        assert handle is not None
        restored = new_backend()
        restored.restore([(completed, handle)])
        assert model_of(restored, keys) == expected


def test_snapshot_written_by_another_thread_while_processing(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    keys = range(300)
    backend = new_backend()
    populate(backend, keys)
    expected = model_of(backend, keys)
    snapshot = backend.snapshot()
    writer = storage.begin_checkpoint(JOB_ID, 1)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(snapshot.write(writer, "op/0/keyed")))
    thread.start()
    for round_ in range(3):
        mutate(backend, keys)
        populate(backend, keys, salt=round_)
    thread.join(timeout=60)
    assert not thread.is_alive()
    (handle,) = result
    assert isinstance(handle, KeyedStateHandle)
    completed = writer.commit(keyed_metadata(1, "op", 128, [handle]))
    restored = new_backend()
    restored.restore([(completed, handle)])
    assert model_of(restored, keys) == expected


def test_snapshot_of_empty_state_is_none(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    backend = new_backend()
    backend.get_state(COUNT)  # registered, never written
    completed, handles = checkpoint_backends(storage, 1, [backend])
    assert handles == [None]
    backend.set_current_key("k")
    backend.get_state(COUNT).update(1)
    backend.get_state(COUNT).clear()  # written then removed: still nothing to snapshot
    _, handles = checkpoint_backends(storage, 2, [backend])
    assert handles == [None]
    objects = [info.key for info in storage.store.list_objects(storage.job_directory(JOB_ID))]
    assert len(objects) == 2
    assert all(key.endswith("_metadata") for key in objects)  # no state file was left behind
    assert completed.metadata.operators[0].subtasks == ()


def test_release_without_write(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    backend = new_backend()
    populate(backend, range(10))
    snapshot = backend.snapshot()
    snapshot.release()
    snapshot.release()  # idempotent
    writer = storage.begin_checkpoint(JOB_ID, 1)
    with pytest.raises(StateSnapshotError, match="already written or released"):
        snapshot.write(writer, "op/0/keyed")
    populate(backend, range(10, 40))  # the backend goes on (LMDB may flush and grow freely)
    written = backend.snapshot()
    handle = written.write(writer, "op/0/keyed")
    assert handle is not None
    with pytest.raises(StateSnapshotError):
        written.write(writer, "op/0/keyed-again")


def test_inline_handles_restore_too(new_backend: BackendFactory, tmp_path: Path) -> None:
    storage = storage_at(tmp_path / "inline", inline_threshold=1 << 20)
    backend = new_backend()
    populate(backend, range(5))
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    assert handle.stream.scope is HandleScope.INLINE
    reloaded = storage.load(completed.directory)  # through _metadata, as a job restores
    restored = new_backend()
    restored.restore([(reloaded, reloaded.metadata.operators[0].subtasks[0].keyed[0])])
    assert model_of(restored, range(5)) == model_of(backend, range(5))


@pytest.mark.parametrize(("source", "target"), [(s, t) for s in BACKENDS for t in BACKENDS if s != t])
def test_snapshots_restore_across_engines(
    any_backend: BackendFactory, storage: CheckpointStorage, source: str, target: str
) -> None:
    keys = range(150)
    backend = any_backend(source)
    populate(backend, keys)
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    restored = any_backend(target)
    restored.restore([(completed, handle)])
    assert model_of(restored, keys) == model_of(backend, keys)
    assert kv_contents(restored) == kv_contents(backend)


def test_restored_state_snapshots_and_restores_again(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    keys = range(80)
    backend = new_backend()
    populate(backend, keys)
    expected = model_of(backend, keys)
    once = restore_one(new_backend, storage, backend, 1)
    twice = restore_one(new_backend, storage, once, 2)
    assert model_of(twice, keys) == expected
    # a state registered after restore gets an id of its own
    extra = twice.get_state(ValueStateDescriptor[str](name="extra", serializer=StrSerializer()))
    twice.set_current_key(3)
    extra.update("e")
    thrice = restore_one(new_backend, storage, twice, 3)
    assert model_of(thrice, keys) == expected
    thrice.set_current_key(3)
    assert thrice.get_state(ValueStateDescriptor[str](name="extra", serializer=StrSerializer())).value() == "e"


def test_restore_must_come_before_state_use(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    backend = new_backend()
    populate(backend, range(5))
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    used = new_backend()
    used.get_state(COUNT)
    with pytest.raises(StateError, match="before any state is used"):
        used.restore([(completed, handle)])


def test_restore_skips_handles_outside_the_key_groups(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    left = new_backend(key_groups=KeyGroupRange(0, 63))
    keys = [k for k in range(400) if key_group_of(k) <= 63]
    count = left.get_state(COUNT)
    for k in keys:
        left.set_current_key(k)
        count.update(k)
    completed, (handle,) = checkpoint_backends(storage, 1, [left])
    assert handle is not None
    right = new_backend(key_groups=KeyGroupRange(64, 127))
    right.restore([(completed, handle)])
    assert list(right.keys("count")) == []
    assert right.registered_states() == []  # it did not even read the handle's meta
