"""Operator (non-keyed) list state: split, union and broadcast lists, snapshot and restore."""

from __future__ import annotations

import pytest

from keystate.statebackend import (
    IntSerializer,
    JsonSerializer,
    ListStateDescriptor,
    OperatorStateBackend,
    StateError,
    StateMigrationError,
    StateRestoreError,
    StrSerializer,
)
from keystate.storage import CheckpointStorage, DistributionMode, OperatorStateHandle, PutMode
from tests.statebackend.support import write_operator

OFFSETS = ListStateDescriptor[int](name="offsets", serializer=IntSerializer())
WATERMARKS = ListStateDescriptor[int](name="watermarks", serializer=IntSerializer())
RULES = ListStateDescriptor[str](name="rules", serializer=StrSerializer())


def filled() -> OperatorStateBackend:
    backend = OperatorStateBackend("src", 0)
    backend.get_list_state(OFFSETS).add_all([10, 20, 30])
    backend.get_union_list_state(WATERMARKS).add(99)
    backend.get_broadcast_list_state(RULES).update(["allow", "deny"])
    return backend


def restored_from(
    storage: CheckpointStorage, backend: OperatorStateBackend, checkpoint_id: int = 1
) -> OperatorStateBackend:
    completed, (handle,) = write_operator(storage, checkpoint_id, [backend.snapshot()])
    assert handle is not None
    fresh = OperatorStateBackend("src", 0)
    fresh.restore([(completed, handle)])
    return fresh


def test_list_operations() -> None:
    backend = OperatorStateBackend("src", 0)
    offsets = backend.get_list_state(OFFSETS)
    assert offsets.get() == []
    offsets.add(1)
    offsets.add_all([2, 3])
    assert offsets.get() == [1, 2, 3]
    offsets.update([7])
    assert offsets.get() == [7]
    offsets.clear()
    assert offsets.get() == []
    assert backend.get_list_state(OFFSETS) is offsets
    assert not backend.uses_union_state()
    backend.get_union_list_state(WATERMARKS)
    assert backend.uses_union_state()
    with pytest.raises(StateError, match="no namespaces"):
        offsets.set_namespace(b"w")


def test_snapshot_and_restore_every_mode(storage: CheckpointStorage) -> None:
    backend = filled()
    backend.get_list_state(ListStateDescriptor[str](name="empty", serializer=StrSerializer()))
    restored = restored_from(storage, backend)
    assert restored.get_list_state(OFFSETS).get() == [10, 20, 30]
    assert restored.get_union_list_state(WATERMARKS).get() == [99]
    assert restored.get_broadcast_list_state(RULES).get() == ["allow", "deny"]
    assert restored.get_list_state(ListStateDescriptor[str](name="empty", serializer=StrSerializer())).get() == []


def test_snapshot_is_taken_at_once(storage: CheckpointStorage) -> None:
    backend = filled()
    snapshot = backend.snapshot()
    backend.get_list_state(OFFSETS).add(40)
    backend.get_broadcast_list_state(RULES).clear()
    completed, (handle,) = write_operator(storage, 1, [snapshot])
    assert handle is not None
    fresh = OperatorStateBackend("src", 0)
    fresh.restore([(completed, handle)])
    assert fresh.get_list_state(OFFSETS).get() == [10, 20, 30]
    assert fresh.get_broadcast_list_state(RULES).get() == ["allow", "deny"]


def test_handle_records_modes_offsets_and_serializers(storage: CheckpointStorage) -> None:
    _, (handle,) = write_operator(storage, 1, [filled().snapshot()])
    assert isinstance(handle, OperatorStateHandle)
    by_name = {e.name: e for e in handle.states}
    assert {n: (e.mode, len(e.offsets), e.serializer) for n, e in by_name.items()} == {
        "offsets": (DistributionMode.SPLIT, 3, "int64"),
        "watermarks": (DistributionMode.UNION, 1, "int64"),
        "rules": (DistributionMode.BROADCAST, 2, "str"),
    }


def test_empty_backend_writes_nothing(storage: CheckpointStorage) -> None:
    _, handles = write_operator(storage, 1, [OperatorStateBackend("src", 0).snapshot()])
    assert handles == [None]


def test_mode_or_serializer_mismatch_is_a_migration_error(storage: CheckpointStorage) -> None:
    backend = OperatorStateBackend("src", 0)
    backend.get_list_state(OFFSETS)
    with pytest.raises(StateMigrationError, match="'offsets' is split state"):
        backend.get_union_list_state(OFFSETS)
    with pytest.raises(StateMigrationError, match="'json'"):
        backend.get_list_state(ListStateDescriptor[int](name="offsets", serializer=JsonSerializer()))
    restored = restored_from(storage, filled())
    with pytest.raises(StateMigrationError, match="broadcast"):
        restored.get_list_state(ListStateDescriptor[str](name="rules", serializer=StrSerializer()))
    with pytest.raises(StateMigrationError, match="'int64'"):
        restored.get_list_state(ListStateDescriptor[int](name="offsets", serializer=JsonSerializer()))
    assert restored.get_list_state(OFFSETS).get() == [10, 20, 30]  # the right request still works


def test_restored_states_nobody_asked_for_survive_the_next_snapshot(storage: CheckpointStorage) -> None:
    once = restored_from(storage, filled(), 1)
    once.get_list_state(OFFSETS).add(40)  # only "offsets" is used by the new code
    twice = restored_from(storage, once, 2)
    assert twice.get_list_state(OFFSETS).get() == [10, 20, 30, 40]
    assert twice.get_union_list_state(WATERMARKS).get() == [99]
    assert twice.get_broadcast_list_state(RULES).get() == ["allow", "deny"]
    assert twice.uses_union_state()


def test_restore_merges_several_handles_of_a_name(storage: CheckpointStorage) -> None:
    a, b = OperatorStateBackend("src", 0), OperatorStateBackend("src", 1)
    a.get_list_state(OFFSETS).add_all([1, 2])
    b.get_list_state(OFFSETS).add_all([3])
    completed, handles = write_operator(storage, 1, [a.snapshot(), b.snapshot()])
    merged = OperatorStateBackend("src", 0)
    merged.restore([(completed, h) for h in handles if h is not None])
    assert merged.get_list_state(OFFSETS).get() == [1, 2, 3]


def test_handles_disagreeing_on_a_mode_are_a_restore_error(storage: CheckpointStorage) -> None:
    a, b = OperatorStateBackend("src", 0), OperatorStateBackend("src", 1)
    a.get_list_state(OFFSETS).add(1)
    b.get_union_list_state(OFFSETS).add(2)
    completed, handles = write_operator(storage, 1, [a.snapshot(), b.snapshot()])
    with pytest.raises(StateRestoreError, match="'offsets' is union/int64 here but split/int64"):
        OperatorStateBackend("src", 0).restore([(completed, h) for h in handles if h is not None])


def test_corrupted_operator_state_file_is_a_restore_error(storage: CheckpointStorage) -> None:
    completed, (handle,) = write_operator(storage, 1, [filled().snapshot()])
    assert handle is not None
    key = completed.state_key(handle.stream)
    assert key is not None
    data = bytearray(storage.store.get(key))
    data[len(data) // 2] ^= 0x10
    storage.store.put(key, bytes(data), PutMode.OVERWRITE)
    with pytest.raises(StateRestoreError, match="operator 'src'") as info:
        OperatorStateBackend("src", 0).restore([(completed, handle)])
    assert key.rsplit("/", 1)[-1] in str(info.value)
