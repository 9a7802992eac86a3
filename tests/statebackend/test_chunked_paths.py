"""The chunked snapshot and restore paths give exactly what the entry-by-entry paths give."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystate.statebackend import (
    BytesSerializer,
    IntSerializer,
    KeyGroupRange,
    ListStateDescriptor,
    StateError,
    ValueStateDescriptor,
)
from keystate.statebackend._heap import HeapKV
from keystate.statebackend._kv import KVSnapshot, KVStore
from keystate.statebackend._lmdb import LmdbKV
from keystate.statebackend._snapshot_reader import _parse_uniform, _parse_variable
from keystate.storage import CheckpointStorage, LocalObjectStore, StreamOptions
from tests.statebackend.support import BackendFactory, checkpoint_backends, kv_contents, make_backend
from tests.statebackend.test_restore_errors import INT, craft, entry_key, restore_error, sample_entries, valid_meta

GROUPS = KeyGroupRange(0, 5)


def key(kg: int, name: str, sid: int = 1) -> bytes:
    return struct.pack(">HH", kg, sid) + name.encode()


def by_entry(view: KVSnapshot, groups: KeyGroupRange) -> list[tuple[int, bytes, bytes]]:
    return [(kg, k, v) for kg in groups for k, v in view.iter_key_group(kg)]


def by_chunk(view: KVSnapshot, groups: KeyGroupRange, size: int) -> list[tuple[int, bytes, bytes]]:
    out: list[tuple[int, bytes, bytes]] = []
    previous = groups.start
    for kg, keys, values in view.iter_chunks(groups, size):
        assert groups.start <= previous <= kg <= groups.end
        assert 0 < len(keys) == len(values) <= size
        assert all(k[:2] == struct.pack(">H", kg) for k in keys)
        out += [(kg, k, v) for k, v in zip(keys, values, strict=True)]
        previous = kg
    return out


@pytest.fixture(params=["lmdb", "heap"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    store: KVStore = LmdbKV(tmp_path / "env", buffer_entries=50) if request.param == "lmdb" else HeapKV()
    yield store
    store.close()


@pytest.mark.parametrize("seed", range(6))
def test_chunks_match_entries_with_any_buffer_layering(engine: KVStore, seed: int) -> None:
    rng = random.Random(seed)
    names = [key(kg, f"k{i:03d}") for kg in range(7) for i in range(rng.choice([5, 60, 200]))]
    views: list[KVSnapshot] = []
    for _ in range(rng.choice([50, 400, 2000])):
        k = rng.choice(names)
        op = rng.random()
        if op < 0.5:
            engine.put(k, rng.randbytes(rng.randrange(0, 9)))
        elif op < 0.65:
            engine.delete(k)
        elif op < 0.85:
            engine.append(k, rng.randbytes(3))
        elif op < 0.86:
            views.append(engine.snapshot())  # frozen layers, dense or sparse over what LMDB holds
        elif op < 0.87 and isinstance(engine, LmdbKV):
            engine.flush()
    views.append(engine.snapshot())
    for view in views:
        for groups in (GROUPS, KeyGroupRange(2, 3), KeyGroupRange(6, 9), KeyGroupRange(0, 0)):
            expected = by_entry(view, groups)
            for size in (1, 2, 5, 64, 4096):
                assert by_chunk(view, groups, size) == expected, (groups, size)
        view.release()


def test_chunks_of_a_range_with_nothing_stored(engine: KVStore) -> None:
    assert list(engine.snapshot().iter_chunks(GROUPS)) == []
    engine.put(key(9, "late"), b"v")
    view = engine.snapshot()
    assert list(view.iter_chunks(GROUPS)) == []
    assert [(kg, ks) for kg, ks, _ in view.iter_chunks(KeyGroupRange(0, 9))] == [(9, [key(9, "late")])]
    view.release()


def test_chunks_stop_at_the_end_of_the_range(tmp_path: Path) -> None:
    store = LmdbKV(tmp_path / "env")
    try:
        for kg, name in ((0x7FFF, "z"), (0x7FFE, "y"), (0x8000, "beyond")):
            store.put(key(kg, name), b"1")
        store.flush()
        store.put(key(0x7FFF, "a"), b"3")
        store.put(key(0x8000, "also-beyond"), b"3")
        view = store.snapshot()
        chunks = list(view.iter_chunks(KeyGroupRange(0x7FFF, 0x7FFF), 1))
        assert chunks == [(0x7FFF, [key(0x7FFF, "a")], [b"3"]), (0x7FFF, [key(0x7FFF, "z")], [b"1"])]
        view.release()
    finally:
        store.close()


def test_released_lmdb_view_cannot_be_chunked(tmp_path: Path) -> None:
    store = LmdbKV(tmp_path / "env")
    view = store.snapshot()
    view.release()
    with pytest.raises(StateError, match="released"):
        list(view.iter_chunks(GROUPS))
    store.close()


# --- snapshot files ----------------------------------------------------------------------------------


def storage_with(tmp_path: Path, threads: int) -> CheckpointStorage:
    options = StreamOptions(inline_threshold=0, block_size=512, compression_threads=threads)
    return CheckpointStorage(LocalObjectStore(tmp_path / f"t{threads}", fsync=False), options=options)


def test_snapshot_files_do_not_depend_on_compression_threads(new_backend: BackendFactory, tmp_path: Path) -> None:
    backend = new_backend(buffer_entries=1000)
    count = backend.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer()))
    items = backend.get_state(ListStateDescriptor[bytes](name="items", serializer=BytesSerializer()))
    for k in range(3000):
        backend.set_current_key(k)
        count.update(k * 7)
        if k % 3 == 0:
            items.add(str(k).encode() * (k % 11))
    files = []
    for threads in (0, 1, 2):
        storage = storage_with(tmp_path, threads)
        completed, (handle,) = checkpoint_backends(storage, 1, [backend])
        assert handle is not None
        key_ = completed.state_key(handle.stream)
        assert key_ is not None
        files.append((handle.offsets, handle.stream.checksum, storage.store.get(key_)))
        fresh = new_backend()
        fresh.restore([(completed, handle)])
        assert kv_contents(fresh) == kv_contents(backend)
    assert files[0] == files[1] == files[2]


# --- restore: the fast parsers check what the entry-by-entry parser checks --------------------------------


def encode(entries: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in entries)


def test_fast_parsers_agree_on_valid_data() -> None:
    heads = frozenset({struct.pack(">HH", 5, 1), struct.pack(">HH", 5, 2)})
    uniform = [(entry_key(5, 1 + i % 2, b"k%03d" % i), b"v%05d" % i) for i in range(50)]
    data = encode(uniform)
    assert _parse_uniform(data, heads) == uniform
    assert _parse_variable(data, heads) == uniform
    mixed = [(entry_key(5, 1, b"k" * (i % 4 + 1)), b"v" * (i % 5)) for i in range(50)]
    data = encode(mixed)
    assert _parse_uniform(data, heads) is None
    assert _parse_variable(data, heads) == mixed


@pytest.mark.parametrize(
    "damage",
    ["unknown-sid", "all-unknown-sid", "other-key-group", "short-key", "truncated", "extra-byte", "value-length",
     "key-length"],
)  # fmt: skip
@pytest.mark.parametrize("layout", ["uniform", "variable"])
def test_fast_parsers_refuse_damaged_data(damage: str, layout: str) -> None:
    heads = frozenset({struct.pack(">HH", 5, 1)})
    entries = [(entry_key(5, 1, b"k%03d" % i), b"v" * (7 if layout == "uniform" else i % 9)) for i in range(20)]
    bad = {
        "unknown-sid": (entry_key(5, 9, b"k999"), entries[0][1]),
        "other-key-group": (entry_key(6, 1, b"k999"), entries[0][1]),
        "short-key": (b"\x00\x05\x00", entries[0][1]),
    }.get(damage)
    if bad is not None:
        entries[13] = bad
    if damage == "all-unknown-sid":
        entries = [(k[:2] + b"\x00\x09" + k[4:], v) for k, v in entries]
    data = bytearray(encode(entries))
    if damage == "truncated":
        del data[-3:]
    elif damage == "extra-byte":
        data.append(0)
    elif damage == "value-length":
        data[2 + len(entries[0][0]) + 3] += 1  # the first entry's value length
    elif damage == "key-length":
        data[1] += 1
    assert _parse_uniform(bytes(data), heads) is None
    assert _parse_variable(bytes(data), heads) is None


@pytest.mark.parametrize("sid", [9, 1])
def test_wrong_entry_with_the_same_layout_is_still_caught(
    new_backend: BackendFactory, storage: CheckpointStorage, sid: int
) -> None:
    # Every entry of sample_entries has one key and value length, so the strided parser sees this one.
    entries = sample_entries(60)
    kg = max(entries, key=lambda g: len(entries[g]))
    raw = entries[kg][0][0][6:-2]
    wrong_group = kg + 1 if sid == 1 else kg
    entries[kg].append((entry_key(wrong_group, sid, raw[:-1] + b"\xff"), INT.serialize(1)))
    completed, handle = craft(storage, json.dumps(valid_meta()).encode(), entries)
    error = restore_error(new_backend, completed, handle)
    assert f"key group {kg}, " in str(error)
    if sid == 9:
        assert "unknown state id 9" in str(error)
    else:
        assert f"belongs to key group {kg + 1}" in str(error)


def test_restore_of_several_state_ids_with_one_layout(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    state = valid_meta()["states"][0]
    meta = valid_meta(states=[state, {**state, "id": 2, "name": "other"}])
    entries = sample_entries(40)
    for kg in entries:
        entries[kg] = sorted(entries[kg] + [(k[:2] + b"\x00\x02" + k[4:], v) for k, v in entries[kg]])
    completed, handle = craft(storage, json.dumps(meta).encode(), entries)
    backend = new_backend()
    backend.restore([(completed, handle)])
    assert sorted(backend.keys("count")) == sorted(backend.keys("other")) == list(range(40))


def test_bulk_load_of_unsorted_and_overlapping_chunks(tmp_path: Path) -> None:
    store = LmdbKV(tmp_path / "env")
    try:
        store.bulk_load_chunks([(1, [(key(1, "b"), b"1"), (key(1, "d"), b"2")])])
        model = {key(1, "b"): b"1", key(1, "d"): b"2"}
        chunks = [
            [(key(1, "a"), b"3"), (key(1, "c"), b"4")],  # below the last stored key: no MDB_APPEND
            [(key(2, "z"), b"5"), (key(2, "y"), b"6"), (key(2, "z"), b"7")],  # unsorted, a key twice
            [(key(3, "a"), b"8")],
        ]
        assert store.bulk_load_chunks((kg, chunk) for kg, chunk in zip((1, 2, 3), chunks, strict=True)) == 6
        for chunk in chunks:
            model.update(chunk)
        assert dict(store.scan(b"")) == model
    finally:
        store.close()


def test_heap_bulk_load_chunks_fills_key_group_maps() -> None:
    store = HeapKV()
    assert store.bulk_load_chunks([(3, [(key(3, "a"), b"1")]), (3, []), (4, [(key(4, "b"), b"2")])]) == 2
    assert store.scan(struct.pack(">H", 3)) == [(key(3, "a"), b"1")]
    assert store.get(key(4, "b")) == b"2"


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (b"\x00\x00\x00\x02ab\x00\x00", "truncated at byte 6 of 8"),
        (b"\x00\x00\x00\x02ab\x00\x00\x00\x05xyz", "element at byte 10 claims 5 bytes, 3 left"),
    ],
)
def test_damaged_list_values_are_state_errors(stored: bytes, message: str) -> None:
    backend = make_backend("heap", key_serializer=BytesSerializer())
    items = backend.get_state(ListStateDescriptor[bytes](name="items", serializer=BytesSerializer()))
    backend.set_current_key(b"k")
    items.add(b"ab")
    key_ = next(iter(kv_contents(backend)))
    backend.kv.put(key_, stored)
    with pytest.raises(StateError, match=message):
        items.get()
    backend.close()


class EntryByEntry(KVSnapshot):
    """An engine's view that only has the entry-by-entry method: the default chunking applies."""

    def __init__(self, inner: KVSnapshot) -> None:
        self._inner = inner

    def iter_key_group(self, key_group: int) -> Iterator[tuple[bytes, bytes]]:
        return self._inner.iter_key_group(key_group)

    def release(self) -> None:
        self._inner.release()


def test_default_chunking_and_chunk_loading() -> None:
    store = HeapKV()
    for kg in (1, 3):
        for i in range(7):
            store.put(key(kg, f"k{i}"), b"%d" % i)
    view = EntryByEntry(store.snapshot())
    assert by_chunk(view, GROUPS, 3) == by_entry(view, GROUPS)
    chunks = [(kg, list(zip(ks, vs, strict=True))) for kg, ks, vs in view.iter_chunks(GROUPS, 3)]
    target = HeapKV()
    assert target.bulk_load_chunks(chunks) == 14
    assert [target.scan(struct.pack(">H", kg)) for kg in (1, 3)] == [store.scan(struct.pack(">H", kg)) for kg in (1, 3)]
    view.release()
