"""Property tests: random operation sequences against a dict model, and snapshot/restore round trips."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystate.statebackend import (
    IntSerializer,
    KVKeyedStateBackend,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    StrSerializer,
    ValueState,
    ValueStateDescriptor,
    assign_keyed_handles,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)
from keystate.statebackend.state import KeyedSnapshot
from keystate.storage import CheckpointStorage, MemoryObjectStore, StreamOptions
from tests.statebackend.support import BACKENDS, key_group_of, make_backend, write_keyed

VALUE = ValueStateDescriptor[int](name="v", serializer=IntSerializer())
LIST = ListStateDescriptor[str](name="l", serializer=StrSerializer())
MAP = MapStateDescriptor[int, str](name="m", serializer=StrSerializer(), key_serializer=IntSerializer())

KEYS: list[Any] = [0, 1, -5, "a", "b", ("t", 1)]
NAMESPACES = [b"", b"w1", b"w"]
small_text = st.text(alphabet="xyz", max_size=3)

operations = st.one_of(
    st.tuples(st.just("key"), st.sampled_from(KEYS)),
    st.tuples(st.just("ns"), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("v_update"), st.none() | st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("v_clear")),
    st.tuples(st.just("l_add"), small_text),
    st.tuples(st.just("l_add_all"), st.lists(small_text, max_size=3)),
    st.tuples(st.just("l_update"), st.lists(small_text, max_size=3)),
    st.tuples(st.just("l_clear")),
    st.tuples(st.just("m_put"), st.integers(-3, 3), small_text),
    st.tuples(st.just("m_put_all"), st.dictionaries(st.integers(-3, 3), small_text, max_size=3)),
    st.tuples(st.just("m_remove"), st.integers(-3, 3)),
    st.tuples(st.just("m_clear")),
    st.tuples(st.just("snapshot")),
)

Slot = tuple[Any, bytes]


@dataclass
class Model:
    values: dict[Slot, int] = field(default_factory=dict)
    lists: dict[Slot, list[str]] = field(default_factory=dict)
    maps: dict[Slot, dict[int, str]] = field(default_factory=dict)


class Harness:
    def __init__(self, backend: KVKeyedStateBackend) -> None:
        self.backend = backend
        self.v: ValueState[int] = backend.get_state(VALUE)
        self.l: ListState[str] = backend.get_state(LIST)
        self.m: MapState[int, str] = backend.get_state(MAP)

    def set_namespace(self, namespace: bytes) -> None:
        self.v.set_namespace(namespace)
        self.l.set_namespace(namespace)
        self.m.set_namespace(namespace)

    def check(self, model: Model) -> None:
        """Every slot of the model reads back, and keys() lists exactly the keys with values."""
        for namespace in NAMESPACES:
            self.set_namespace(namespace)
            for key in KEYS:
                self.backend.set_current_key(key)
                slot = (key, namespace)
                assert self.v.value() == model.values.get(slot)
                assert self.l.get() == model.lists.get(slot, [])
                assert list(self.m.items()) == sorted(model.maps.get(slot, {}).items())
                assert self.m.is_empty() == (not model.maps.get(slot))
            for name, table in (("v", model.values), ("l", model.lists), ("m", model.maps)):
                listed = sorted(map(repr, self.backend.keys(name, namespace)))
                assert listed == sorted(
                    repr(k) for (k, ns), v in table.items() if ns == namespace and v != [] and v != {}
                )


def apply(h: Harness, model: Model, op: tuple[Any, ...], slot: Slot) -> Slot:
    key, namespace = slot
    name = op[0]
    if name == "key":
        h.backend.set_current_key(op[1])
        return (op[1], namespace)
    if name == "ns":
        h.set_namespace(op[1])
        return (key, op[1])
    if name == "v_update":
        h.v.update(op[1])
        if op[1] is None:
            model.values.pop(slot, None)
        else:
            model.values[slot] = op[1]
    elif name == "v_clear":
        h.v.clear()
        model.values.pop(slot, None)
    elif name == "l_add":
        h.l.add(op[1])
        model.lists.setdefault(slot, []).append(op[1])
    elif name == "l_add_all":
        h.l.add_all(op[1])
        model.lists.setdefault(slot, []).extend(op[1])
    elif name == "l_update":
        h.l.update(op[1])
        model.lists[slot] = list(op[1])
    elif name == "l_clear":
        h.l.clear()
        model.lists.pop(slot, None)
    elif name == "m_put":
        h.m.put(op[1], op[2])
        model.maps.setdefault(slot, {})[op[1]] = op[2]
    elif name == "m_put_all":
        h.m.put_all(op[1])
        model.maps.setdefault(slot, {}).update(op[1])
    elif name == "m_remove":
        h.m.remove(op[1])
        model.maps.get(slot, {}).pop(op[1], None)
    elif name == "m_clear":
        h.m.clear()
        model.maps.pop(slot, None)
    if name.startswith("v_"):
        assert h.v.value() == model.values.get(slot)
    elif name.startswith("l_"):
        assert h.l.get() == model.lists.get(slot, [])
    elif name.startswith("m_"):
        assert dict(h.m.items()) == model.maps.get(slot, {})
    return slot


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(BACKENDS), restore_kind=st.sampled_from(BACKENDS), ops=st.lists(operations, max_size=120))
def test_random_operations_match_a_dict_model(kind: str, restore_kind: str, ops: list[tuple[Any, ...]]) -> None:
    storage = CheckpointStorage(MemoryObjectStore(), options=StreamOptions(inline_threshold=0))
    backend = make_backend(kind, buffer_entries=3)
    snapshots: list[tuple[KeyedSnapshot, Model]] = []
    try:
        h = Harness(backend)
        model = Model()
        backend.set_current_key(KEYS[0])
        slot: Slot = (KEYS[0], b"")
        for op in ops:
            if op[0] == "snapshot":
                snapshots.append((backend.snapshot(), copy.deepcopy(model)))
            else:
                slot = apply(h, model, op, slot)
        h.check(model)
        snapshots.append((backend.snapshot(), copy.deepcopy(model)))
        for checkpoint_id, (snapshot, expected) in enumerate(snapshots, start=1):
            completed, (handle,) = write_keyed(storage, checkpoint_id, [snapshot])
            restored = make_backend(restore_kind, buffer_entries=3)
            try:
                restored.restore([] if handle is None else [(completed, handle)])
                Harness(restored).check(expected)
            finally:
                restored.close()
    finally:
        for snapshot, _ in snapshots:
            snapshot.release()
        backend.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.dictionaries(
        st.integers(-1000, 1000) | st.text(max_size=5),
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.lists(small_text, max_size=3)),
        max_size=40,
    ),
    max_parallelism=st.sampled_from([1, 2, 7, 128, 32768]),
    old_p=st.integers(1, 3),
    new_p=st.integers(1, 3),
    kinds=st.tuples(st.sampled_from(BACKENDS), st.sampled_from(BACKENDS)),
)
def test_snapshot_restore_round_trip_at_any_parallelism(
    data: dict[Any, tuple[int, list[str]]], max_parallelism: int, old_p: int, new_p: int, kinds: tuple[str, str]
) -> None:
    old_p, new_p = min(old_p, max_parallelism), min(new_p, max_parallelism)
    storage = CheckpointStorage(MemoryObjectStore(), options=StreamOptions(inline_threshold=0))

    def subtasks(kind: str, parallelism: int) -> list[KVKeyedStateBackend]:
        return [
            make_backend(
                kind,
                key_groups=key_group_range_for_subtask(max_parallelism, parallelism, i),
                max_parallelism=max_parallelism,
                subtask_index=i,
            )
            for i in range(parallelism)
        ]

    def owner(key: Any, parallelism: int) -> int:
        return operator_index_for_key_group(max_parallelism, parallelism, key_group_of(key, max_parallelism))

    old = subtasks(kinds[0], old_p)
    new = subtasks(kinds[1], new_p)
    try:
        for key, (value, items) in data.items():
            backend = old[owner(key, old_p)]
            backend.set_current_key(key)
            backend.get_state(VALUE).update(value)
            backend.get_state(LIST).update(items)
        completed, handles = write_keyed(storage, 1, [b.snapshot() for b in old], max_parallelism=max_parallelism)
        assigned = assign_keyed_handles([[h] if h else [] for h in handles], new_p, max_parallelism)
        restored: dict[Any, tuple[int | None, list[str]]] = {}
        for index, (backend, mine) in enumerate(zip(new, assigned, strict=True)):
            backend.restore([(completed, h) for h in mine])
            v, items_state = backend.get_state(VALUE), backend.get_state(LIST)
            for key in backend.keys("v"):
                assert key not in restored
                assert owner(key, new_p) == index
                backend.set_current_key(key)
                restored[key] = (v.value(), items_state.get())
        assert restored == data
    finally:
        for backend in old + new:
            backend.close()
