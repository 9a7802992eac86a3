"""Keyed state restored at another parallelism: key-group ranges, partial reads, state-id translation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from keystate.statebackend import (
    BytesSerializer,
    IntSerializer,
    KeyGroupOutOfRangeError,
    KVKeyedStateBackend,
    ListStateDescriptor,
    StrSerializer,
    ValueStateDescriptor,
    assign_keyed_handles,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)
from keystate.storage import CheckpointStorage, CompletedCheckpoint, KeyedStateHandle, KeyGroupRange
from tests.statebackend.support import (
    BackendFactory,
    CountingStore,
    checkpoint_backends,
    key_group_of,
)

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())
SEEN = ListStateDescriptor[str](name="seen", serializer=StrSerializer())
KEYS: list[object] = [*range(-50, 500), *(f"user-{i}" for i in range(150)), *((i, "t") for i in range(50))]


def expected_count(key: object) -> int:
    return len(repr(key)) * 1000 + (key if isinstance(key, int) else 7)


def subtasks(
    new_backend: BackendFactory, max_parallelism: int, parallelism: int, uid: str = "op"
) -> list[KVKeyedStateBackend]:
    return [
        new_backend(
            key_groups=key_group_range_for_subtask(max_parallelism, parallelism, i),
            max_parallelism=max_parallelism,
            subtask_index=i,
            operator_uid=uid,
        )
        for i in range(parallelism)
    ]


def owner(backends: Sequence[KVKeyedStateBackend], key: object) -> KVKeyedStateBackend:
    max_parallelism = backends[0].max_parallelism
    index = operator_index_for_key_group(max_parallelism, len(backends), key_group_of(key, max_parallelism))
    return backends[index]


def restore_all(
    backends: Sequence[KVKeyedStateBackend], completed: CompletedCheckpoint, assigned: list[list[KeyedStateHandle]]
) -> None:
    for backend, handles in zip(backends, assigned, strict=True):
        backend.restore([(completed, h) for h in handles])


@pytest.mark.parametrize("max_parallelism", [128, 32768])
@pytest.mark.parametrize(("old_p", "new_p"), [(2, 2), (1, 2), (2, 3), (3, 1), (4, 2)])
def test_rescaled_keys_land_exactly_at_their_owner(
    new_backend: BackendFactory, storage: CheckpointStorage, max_parallelism: int, old_p: int, new_p: int
) -> None:
    old = subtasks(new_backend, max_parallelism, old_p)
    for key in KEYS:
        b = owner(old, key)
        b.set_current_key(key)
        b.get_state(COUNT).update(expected_count(key))
        b.get_state(SEEN).add_all([repr(key), "x"])
    completed, handles = checkpoint_backends(storage, 1, old)
    assigned = assign_keyed_handles([[h] if h else [] for h in handles], new_p, max_parallelism)
    assert len(assigned) == new_p
    new = subtasks(new_backend, max_parallelism, new_p)
    restore_all(new, completed, assigned)

    placed: dict[object, int] = {}
    total = 0
    for index, backend in enumerate(new):
        count = backend.get_state(COUNT)
        seen = backend.get_state(SEEN)
        for key in backend.keys("count"):
            assert key not in placed, f"{key!r} restored twice"
            placed[key] = index
            assert operator_index_for_key_group(max_parallelism, new_p, key_group_of(key, max_parallelism)) == index
            backend.set_current_key(key)
            assert count.value() == expected_count(key)
            assert seen.get() == [repr(key), "x"]
            total += count.value() or 0
        assert sorted(map(repr, backend.keys("seen"))) == sorted(repr(k) for k, i in placed.items() if i == index)
    assert set(placed) == set(KEYS)
    assert total == sum(expected_count(k) for k in KEYS)


def test_rescaled_backend_still_rejects_keys_of_other_subtasks(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    old = subtasks(new_backend, 128, 1)
    for key in range(100):
        old[0].set_current_key(key)
        old[0].get_state(COUNT).update(key)
    completed, handles = checkpoint_backends(storage, 1, old)
    new = subtasks(new_backend, 128, 2)
    restore_all(new, completed, assign_keyed_handles([[h] for h in handles if h], 2, 128))
    foreign = next(k for k in range(100) if owner(new, k) is new[1])
    with pytest.raises(KeyGroupOutOfRangeError):
        new[0].set_current_key(foreign)


def test_same_parallelism_keeps_handles_one_to_one(storage: CheckpointStorage, new_backend: BackendFactory) -> None:
    old = subtasks(new_backend, 128, 3)
    for key in range(200):
        b = owner(old, key)
        b.set_current_key(key)
        b.get_state(COUNT).update(key)
    _, handles = checkpoint_backends(storage, 1, old)
    previous = [[h] for h in handles if h is not None]
    assert len(previous) == 3
    assert assign_keyed_handles(previous, 3, 128) == previous
    assigned = assign_keyed_handles(previous, 2, 128)
    assert [len(a) for a in assigned] == [2, 2]  # old 1 (43..85) straddles both new ranges
    assert assigned[0][0] is previous[0][0]


def test_restore_reads_only_the_owned_key_groups(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    rng = random.Random(7)
    value = ValueStateDescriptor[bytes](name="blob", serializer=BytesSerializer())
    (full,) = subtasks(new_backend, 128, 1)
    blob = full.get_state(value)
    for key in range(3000):
        full.set_current_key(key)
        blob.update(rng.randbytes(200))  # incompressible: stored size tracks the data
    completed, (handle,) = checkpoint_backends(storage, 1, [full])
    assert handle is not None
    file_size = handle.stream.size
    counting = CountingStore(storage.store)
    reader_storage = CheckpointStorage(counting, storage.base, options=storage.options)
    checkpoint = reader_storage.load(completed.directory)

    def bytes_to_restore(groups: KeyGroupRange) -> int:
        counting.bytes_read = 0
        backend = new_backend(key_groups=groups)
        backend.restore([(checkpoint, handle)])
        assert sorted(backend.keys("blob")) == sorted(k for k in range(3000) if key_group_of(k) in groups)
        return counting.bytes_read

    whole = bytes_to_restore(KeyGroupRange(0, 127))
    assert whole >= 0.95 * file_size
    for groups in (KeyGroupRange(0, 63), KeyGroupRange(64, 127)):
        assert bytes_to_restore(groups) < 0.6 * file_size
    assert bytes_to_restore(KeyGroupRange(32, 47)) < 0.2 * file_size


def test_states_registered_in_different_orders_are_translated(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    a = ValueStateDescriptor[int](name="a", serializer=IntSerializer())
    b = ValueStateDescriptor[int](name="b", serializer=IntSerializer())
    only0 = ValueStateDescriptor[str](name="only-in-0", serializer=StrSerializer())
    only1 = ListStateDescriptor[str](name="only-in-1", serializer=StrSerializer())
    old = subtasks(new_backend, 128, 2)
    old[0].get_state(a)
    old[0].get_state(b)
    old[0].get_state(only0)  # ids in subtask 0: a=1, b=2, only-in-0=3
    old[1].get_state(only1)
    old[1].get_state(b)
    old[1].get_state(a)  # ids in subtask 1: only-in-1=1, b=2, a=3
    for key in range(300):
        backend = owner(old, key)
        backend.set_current_key(key)
        backend.get_state(a).update(key)
        backend.get_state(b).update(-key)
        if backend is old[0]:
            backend.get_state(only0).update(f"zero-{key}")
        else:
            backend.get_state(only1).add(f"one-{key}")
    completed, handles = checkpoint_backends(storage, 1, old)
    (merged,) = subtasks(new_backend, 128, 1)
    merged.restore([(completed, h) for h in reversed(handles) if h is not None])  # order must not matter

    def check(backend: KVKeyedStateBackend, keys: Sequence[int]) -> None:
        sa, sb = backend.get_state(a), backend.get_state(b)
        s0, s1 = backend.get_state(only0), backend.get_state(only1)
        for key in keys:
            backend.set_current_key(key)
            assert (sa.value(), sb.value()) == (key, -key)
            in_zero = owner(old, key) is old[0]
            assert s0.value() == (f"zero-{key}" if in_zero else None)
            assert s1.get() == ([] if in_zero else [f"one-{key}"])

    assert sorted(merged.keys("a")) == list(range(300))
    check(merged, range(300))
    names = [m.name for m in merged.registered_states()]
    assert sorted(names) == ["a", "b", "only-in-0", "only-in-1"]
    assert len({m.sid for m in merged.registered_states()}) == 4
    # and once more, after the merged backend wrote its own snapshot with its own ids
    completed2, handles2 = checkpoint_backends(storage, 2, [merged])
    again = subtasks(new_backend, 128, 2)
    restore_all(again, completed2, assign_keyed_handles([[h] for h in handles2 if h], 2, 128))
    for backend in again:
        check(backend, [k for k in range(300) if owner(again, k) is backend])


def test_same_state_id_for_different_names_is_translated(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    x = ValueStateDescriptor[int](name="x", serializer=IntSerializer())
    y = ValueStateDescriptor[int](name="y", serializer=IntSerializer())
    old = subtasks(new_backend, 128, 2)
    for key in range(100):
        backend = owner(old, key)
        backend.set_current_key(key)
        backend.get_state(x if backend is old[0] else y).update(key)  # both states have id 1
    completed, handles = checkpoint_backends(storage, 1, old)
    (merged,) = subtasks(new_backend, 128, 1)
    merged.restore([(completed, h) for h in handles if h is not None])
    xs = sorted(merged.keys("x"))
    ys = sorted(merged.keys("y"))
    assert xs == [k for k in range(100) if owner(old, k) is old[0]]
    assert ys == [k for k in range(100) if owner(old, k) is old[1]]
    sx, sy = merged.get_state(x), merged.get_state(y)
    for key in range(100):
        merged.set_current_key(key)
        assert (sx.value(), sy.value()) == ((key, None) if key in xs else (None, key))
