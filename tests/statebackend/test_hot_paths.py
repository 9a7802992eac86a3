"""Shortcuts on the per-record path behave exactly like the general path."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from keystate.statebackend import (
    BytesSerializer,
    IntSerializer,
    KVKeyedStateBackend,
    MapStateDescriptor,
    StateError,
    TtlConfig,
    ValueStateDescriptor,
)
from keystate.statebackend._lmdb import LmdbKV
from tests.statebackend.support import BackendFactory

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())


def test_same_key_object_again_keeps_working(backend: KVKeyedStateBackend) -> None:
    count = backend.get_state(COUNT)
    key = "alice"
    backend.set_current_key(key)
    count.update(1)
    backend.set_current_key(key)  # the same object: nothing to recompute
    assert count.value() == 1
    count.set_namespace(b"w1")
    backend.set_current_key(key)
    assert count.value() is None  # the namespace change is not hidden by the shortcut
    backend.set_current_key("bob")
    count.update(2)
    backend.set_current_key(key)
    count.set_namespace(b"")
    assert count.value() == 1


def test_a_mutated_bytearray_key_is_serialized_again(new_backend: BackendFactory) -> None:
    backend = new_backend(key_serializer=BytesSerializer())
    count = backend.get_state(COUNT)
    key = bytearray(b"key-1")
    backend.set_current_key(key)
    count.update(1)
    key[-1:] = b"2"
    backend.set_current_key(key)  # the same object with other bytes: another key
    assert count.value() is None
    count.update(2)
    backend.set_current_key(b"key-1")
    assert count.value() == 1
    backend.set_current_key(b"key-2")
    assert count.value() == 2


def test_no_current_key_is_still_an_error(backend: KVKeyedStateBackend) -> None:
    count = backend.get_state(COUNT)
    with pytest.raises(StateError, match="no current key"):
        count.value()
    with pytest.raises(StateError, match="no current key"):
        count.update(1)


def test_bytes_keys_route_like_serialized_keys(new_backend: BackendFactory) -> None:
    backend = new_backend(key_serializer=BytesSerializer())
    count = backend.get_state(COUNT)
    for key in (b"a", bytearray(b"b"), memoryview(b"c")):
        backend.set_current_key(key)
        count.update(len(bytes(key)))
        assert backend.key_part == struct.pack(">H", 1) + bytes(key)
    assert sorted(backend.keys("count")) == [b"a", b"b", b"c"]


def test_snapshot_meta_follows_new_states_and_ttl_changes(backend: KVKeyedStateBackend) -> None:
    backend.get_state(COUNT)
    first = backend.snapshot()
    second = backend.snapshot()
    assert first._meta is second._meta  # type: ignore[attr-defined]
    backend.get_state(MapStateDescriptor[str, int](name="map", serializer=IntSerializer()))
    third = backend.snapshot()
    assert [s.name for s in third._meta.states] == ["count", "map"]  # type: ignore[attr-defined]
    backend.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer()))  # the same: no change
    assert backend.snapshot()._meta is third._meta  # type: ignore[attr-defined]
    for snapshot in (first, second, third):
        snapshot.release()


def test_snapshot_meta_records_a_new_ttl(backend: KVKeyedStateBackend) -> None:
    ttl_count = ValueStateDescriptor[int](name="count", serializer=IntSerializer(), ttl=TtlConfig(1000))
    backend.get_state(ttl_count)
    before = backend.snapshot()
    backend.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer(), ttl=TtlConfig(5000)))
    after = backend.snapshot()
    assert [s.ttl for s in before._meta.states] == [TtlConfig(1000)]  # type: ignore[attr-defined]
    assert [s.ttl for s in after._meta.states] == [TtlConfig(5000)]  # type: ignore[attr-defined]
    before.release()
    after.release()


@pytest.mark.parametrize("seed", range(4))
def test_layer_writes_match_a_model(tmp_path: Path, seed: int) -> None:
    # Layers mixing plain values, values grown by appends, tombstones and appends over LMDB values.
    rng = random.Random(seed)
    store = LmdbKV(tmp_path / "env", buffer_entries=rng.choice([5, 40, 1000]))
    model: dict[bytes, bytes] = {}
    keys = [struct.pack(">HH", kg, 1) + b"k%d" % i for kg in range(3) for i in range(30)]
    try:
        for _ in range(1500):
            k = rng.choice(keys)
            op = rng.random()
            if op < 0.4:
                v = rng.randbytes(rng.randrange(0, 6))
                store.put(k, v)
                model[k] = v
            elif op < 0.6:
                store.delete(k)
                model.pop(k, None)
            elif op < 0.95:
                d = rng.randbytes(2)
                store.append(k, d)
                model[k] = model.get(k, b"") + d
            else:
                assert store.flush()
        assert store.flush()
        assert dict(store.scan(b"")) == model
    finally:
        store.close()
