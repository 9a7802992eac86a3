"""The LMDB engine: read-your-own-writes over its write-back buffer, map growth, layout version."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from keystate.statebackend import (
    BytesSerializer,
    HeapStateBackend,
    IntSerializer,
    KeyGroupRange,
    LmdbKeyedStateBackend,
    LmdbStateBackend,
    MapStateDescriptor,
    StateError,
    StateSnapshotError,
    StrSerializer,
    ValueStateDescriptor,
    state_backend,
)
from keystate.statebackend._kv import KVSnapshot
from keystate.statebackend._lmdb import LmdbKV
from keystate.storage import CheckpointStorage
from tests.statebackend.support import JOB_ID, make_backend, write_keyed


def key(kg: int, name: str) -> bytes:
    return struct.pack(">HH", kg, 1) + name.encode()


def view_contents(view: KVSnapshot, groups: range = range(4)) -> dict[bytes, bytes]:
    return {k: v for kg in groups for k, v in view.iter_key_group(kg)}


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[LmdbKV]:
    store = LmdbKV(tmp_path / "env", buffer_entries=3)
    yield store
    store.close()


def test_read_your_own_writes_across_flushes(kv: LmdbKV) -> None:
    rng = random.Random(11)
    model: dict[bytes, bytes] = {}
    names = [key(kg, f"k{i}") for kg in range(4) for i in range(12)]
    views: list[tuple[KVSnapshot, dict[bytes, bytes]]] = []
    for step in range(3000):
        k = rng.choice(names)
        op = rng.random()
        if op < 0.35:
            value = rng.randbytes(rng.randrange(0, 20))
            kv.put(k, value)
            model[k] = value
        elif op < 0.55:
            kv.delete(k)
            model.pop(k, None)
        elif op < 0.9:
            data = rng.randbytes(rng.randrange(1, 6))
            kv.append(k, data)
            model[k] = model.get(k, b"") + data
        elif op < 0.97:
            kg = rng.randrange(4)
            prefix = struct.pack(">H", kg)
            assert kv.scan(prefix) == sorted((n, v) for n, v in model.items() if n.startswith(prefix))
        else:
            views.append((kv.snapshot(), dict(model)))  # freezes the buffer: reads now cross layers
        assert kv.get(k) == model.get(k), f"step {step}"
        if len(views) > 3:
            view, expected = views.pop(0)
            assert view_contents(view) == expected
            view.release()
    for view, expected in views:
        assert view_contents(view) == expected
        view.release()
    assert kv.flush()
    for n in names:
        assert kv.get(n) == model.get(n)


def test_list_appends_span_frozen_layers_and_lmdb(kv: LmdbKV) -> None:
    k = key(0, "list")
    kv.append(k, b"a")
    assert kv.flush()  # "a" is in LMDB
    kv.append(k, b"b")
    first = kv.snapshot()  # "b" is a pending append in a frozen layer
    kv.append(k, b"c")
    second = kv.snapshot()  # "c" in a second frozen layer
    kv.append(k, b"d")  # "d" in the active buffer
    assert kv.get(k) == b"abcd"
    assert kv.scan(struct.pack(">H", 0)) == [(k, b"abcd")]
    assert view_contents(first) == {k: b"ab"}
    assert view_contents(second) == {k: b"abc"}
    assert kv.flush()
    assert kv.get(k) == b"abcd"
    assert view_contents(first) == {k: b"ab"}  # the views keep their moment after the flush
    first.release()
    second.release()
    kv.append(k, b"e")
    assert kv.get(k) == b"abcde"


def test_tombstones_hide_flushed_values(kv: LmdbKV) -> None:
    gone, kept, revived = key(1, "gone"), key(1, "kept"), key(1, "revived")
    for k in (gone, kept, revived):
        kv.put(k, b"old")
    assert kv.flush()
    kv.delete(gone)
    kv.delete(revived)
    kv.append(revived, b"new")  # an append on a tombstone starts from nothing
    assert kv.get(gone) is None
    assert kv.get(revived) == b"new"
    view = kv.snapshot()
    kv.put(gone, b"back")
    assert kv.scan(struct.pack(">H", 1)) == [(gone, b"back"), (kept, b"old"), (revived, b"new")]
    assert view_contents(view) == {kept: b"old", revived: b"new"}
    view.release()
    kv.delete(gone)
    assert kv.flush()
    assert kv.get(gone) is None
    assert kv.delete_prefix(struct.pack(">H", 1)) == 2
    assert kv.scan(struct.pack(">H", 1)) == []
    assert kv.get(kept) is None


def test_map_iteration_mixes_buffered_and_flushed_entries(tmp_path: Path) -> None:
    backend = LmdbKeyedStateBackend(directory=tmp_path / "env", buffer_entries=3, operator_uid="op",
                                    subtask_index=0, max_parallelism=128, key_groups=KeyGroupRange(0, 127))  # fmt: skip
    try:
        m = backend.get_state(
            MapStateDescriptor[int, str](name="m", serializer=StrSerializer(), key_serializer=IntSerializer())
        )
        backend.set_current_key("k")
        model: dict[int, str] = {}
        for i in range(0, 40, 2):
            m.put(i, f"v{i}")
            model[i] = f"v{i}"
        assert isinstance(backend.kv, LmdbKV)
        assert backend.kv.flush()
        view = backend.kv.snapshot()
        m.remove(10)  # tombstone over a flushed entry
        m.put(11, "new")  # buffered entry between flushed ones
        m.put(12, "replaced")
        m.put(-5, "neg")
        model.pop(10)
        model.update({11: "new", 12: "replaced", -5: "neg"})
        assert list(m.items()) == sorted(model.items())
        assert list(m.keys()) == sorted(model)
        assert m.contains(11)
        assert not m.contains(10)
        view.release()
        assert list(m.items()) == sorted(model.items())
    finally:
        backend.close()
    assert (tmp_path / "env").is_dir()  # a directory the caller gave is kept


def test_map_grows_from_64_kib(kv_dir: Path) -> None:
    kv = LmdbKV(kv_dir, map_size=64 << 10, buffer_entries=50)
    try:
        rng = random.Random(3)
        values = {key(i % 128, str(i)): rng.randbytes(1000) for i in range(3000)}  # ~3 MB
        for k, v in values.items():
            kv.put(k, v)
        assert kv.flush()
        assert kv.map_size >= 4 << 20
        for k, v in values.items():
            assert kv.get(k) == v
    finally:
        kv.close()
    reopened = LmdbKV(kv_dir)
    try:
        assert reopened.get(key(5, "5")) == values[key(5, "5")]
    finally:
        reopened.close()


@pytest.fixture
def kv_dir(tmp_path: Path) -> Path:
    return tmp_path / "env"


def test_map_full_while_a_snapshot_is_open(kv_dir: Path, storage: CheckpointStorage) -> None:
    """The map cannot grow while a snapshot holds a read transaction: writes stay buffered, readable,
    and the task thread never blocks (it may be the thread that writes the snapshot afterwards)."""
    backend = make_backend("lmdb", map_size=64 << 10, buffer_entries=20)
    try:
        blob = backend.get_state(ValueStateDescriptor[bytes](name="blob", serializer=BytesSerializer()))
        m = backend.get_state(
            MapStateDescriptor[int, str](name="m", serializer=StrSerializer(), key_serializer=IntSerializer())
        )
        rng = random.Random(5)
        before = {k: rng.randbytes(500) for k in range(40)}
        entries = {i: f"v{i}" for i in range(0, 100, 3)}
        backend.set_current_key("map-owner")
        m.put_all(entries)
        for k, v in before.items():
            backend.set_current_key(k)
            blob.update(v)
        snapshot = backend.snapshot()
        after = dict(before)
        for k in range(4000):  # ~2 MB while the snapshot is open
            v = rng.randbytes(500)
            backend.set_current_key(k)
            blob.update(v)
            after[k] = v
            if k % 100 == 0:  # map changes spread over many frozen layers
                backend.set_current_key("map-owner")
                m.remove(k // 100 * 3)
                entries.pop(k // 100 * 3, None)
                m.put(k // 100 * 3 + 1, f"new{k}")
                entries[k // 100 * 3 + 1] = f"new{k}"
        assert isinstance(backend.kv, LmdbKV)
        assert not backend.kv.flush()  # the map is full and cannot grow yet
        for k, v in after.items():
            backend.set_current_key(k)
            assert blob.value() == v
        backend.set_current_key("map-owner")
        assert list(m.items()) == sorted(entries.items())
        assert sorted(backend.keys("blob")) == sorted(after)
        completed, (handle,) = write_keyed(storage, 1, [snapshot])  # write() releases the snapshot
        assert handle is not None
        assert backend.kv.flush()  # now it grows
        assert backend.kv.map_size > 2 << 20
        for k, v in after.items():
            backend.set_current_key(k)
            assert blob.value() == v
        backend.set_current_key("map-owner")
        assert list(m.items()) == sorted(entries.items())
        restored = make_backend("heap")
        try:
            restored.restore([(completed, handle)])
            rb = restored.get_state(ValueStateDescriptor[bytes](name="blob", serializer=BytesSerializer()))
            assert sorted(map(repr, restored.keys("blob"))) == sorted(map(repr, before))
            for k, v in before.items():
                restored.set_current_key(k)
                assert rb.value() == v
        finally:
            restored.close()
    finally:
        backend.close()


def test_other_layout_version_is_refused(kv_dir: Path) -> None:
    LmdbKV(kv_dir).close()
    env = lmdb.open(str(kv_dir), max_dbs=2)
    try:
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            txn.put(b"layout", b"0")
    finally:
        env.close()
    for _ in range(2):  # the refused environment is closed again: a second attempt fails the same way
        with pytest.raises(StateError, match=r"state layout b'0'.*remove the directory"):
            LmdbKV(kv_dir)


def test_backend_directories(tmp_path: Path) -> None:
    owned = make_backend("lmdb")
    assert isinstance(owned, LmdbKeyedStateBackend)
    scratch = owned.directory
    assert scratch.is_dir()
    owned.close()
    assert not scratch.exists()
    given = make_backend("lmdb", directory=tmp_path / "mine")
    given.close()
    assert (tmp_path / "mine").is_dir()
    factory = state_backend("lmdb", directory=tmp_path / "work", buffer_entries=3)
    assert isinstance(factory, LmdbStateBackend)
    created = factory.create_keyed_backend(
        operator_uid="a/b c", subtask_index=2, max_parallelism=128, key_groups=KeyGroupRange(0, 127)
    )
    assert isinstance(created, LmdbKeyedStateBackend)
    assert created.directory.parent == tmp_path / "work"
    assert created.directory.name.startswith("keystate-a_b_c-2-")
    created.close()
    assert not created.directory.exists()


def test_state_backend_factory_names() -> None:
    assert isinstance(state_backend("heap"), HeapStateBackend)
    with pytest.raises(ValueError, match="no options"):
        state_backend("heap", map_size=1)
    with pytest.raises(ValueError, match="unknown state backend 'rocksdb'"):
        state_backend("rocksdb")


def test_snapshot_written_after_close_is_a_snapshot_error(storage: CheckpointStorage) -> None:
    backend = make_backend("lmdb")
    blob = backend.get_state(ValueStateDescriptor[bytes](name="blob", serializer=BytesSerializer()))
    for k in range(10):
        backend.set_current_key(k)
        blob.update(b"x")
    snapshot = backend.snapshot()
    backend.close()
    writer = storage.begin_checkpoint(JOB_ID, 1)
    with pytest.raises(StateSnapshotError, match="closed before the snapshot was written"):
        snapshot.write(writer, "op/0/keyed")
    snapshot.release()
    writer.abort()
