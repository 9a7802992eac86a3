"""Restored entries left packed (``_packed``): a ``PackedEntries`` run reads as the list it stands for, a
chain's changes on it (``PatchedEntries``) read as the merged entries, and LMDB's bulk load of either
(which never merges in Python) stores exactly those entries."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystate.statebackend._delta import merge_chain
from keystate.statebackend._kv import Chunk
from keystate.statebackend._lmdb import LmdbKV
from keystate.statebackend._packed import Change, PackedEntries, PatchedEntries, apply_changes
from keystate.statebackend._snapshot_reader import _parse_uniform

_ENTRY = struct.Struct(">2x8s4x3s")


def _key(kg: int, i: int) -> bytes:
    return struct.pack(">HHI", kg, 1, i)


def _packed(entries: list[tuple[bytes, bytes]]) -> PackedEntries:
    data = b"".join(struct.pack(">H", 8) + k + struct.pack(">I", 3) + v for k, v in entries)
    return PackedEntries(memoryview(data), _ENTRY, len(entries))


def test_packed_entries_read_as_their_list() -> None:
    entries = [(_key(0, i), b"v%02d" % i) for i in range(10)]
    packed = _packed(entries)
    assert len(packed) == 10
    assert list(packed) == entries
    assert packed == entries
    assert entries == packed
    assert packed[0] == entries[0]
    assert packed[-1] == entries[-1]
    assert packed[3:7] == entries[3:7]
    assert isinstance(packed[3:7], PackedEntries)  # a view, not a copy
    assert packed[::3] == entries[::3]
    assert packed[8:2] == []
    assert not packed[5:5]
    assert dict(packed) == dict(entries)
    with pytest.raises(IndexError):
        packed[10]
    with pytest.raises(IndexError):
        packed[-11]
    with pytest.raises(ValueError, match="do not fill"):
        PackedEntries(memoryview(b"\0" * 16), _ENTRY, 1)


def test_uniform_key_group_data_is_left_packed() -> None:
    entries = [(_key(5, i), b"v%02d" % (i % 100)) for i in range(300)]
    data = b"".join(struct.pack(">H", 8) + k + struct.pack(">I", 3) + v for k, v in entries)
    parsed: object = _parse_uniform(data, frozenset({struct.pack(">HH", 5, 1)}))
    assert isinstance(parsed, PackedEntries)
    assert parsed == entries


_CHANGE_KEYS = st.integers(0, 40)
_KG_AND_KEY = st.tuples(st.integers(0, 2), st.integers(0, 50))


@st.composite
def _chunks_and_changes(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], list[Change]]:
    base = sorted({_key(0, 2 * i): b"b%02d" % i for i in draw(st.sets(st.integers(0, 20), max_size=15))}.items())
    changes = {_key(0, i): draw(st.none() | st.binary(max_size=4)) for i in draw(st.sets(_CHANGE_KEYS, max_size=15))}
    return base, sorted(changes.items(), key=lambda c: c[0])


@settings(max_examples=150, deadline=None)
@given(case=_chunks_and_changes())
def test_patched_entries_read_as_the_merged_entries(case: tuple[list[tuple[bytes, bytes]], list[Change]]) -> None:
    base, changes = case
    dead = any(value is None for _, value in changes)
    model = dict(base)
    for key, value in changes:
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    patched = PatchedEntries(_packed(base), changes, dead)
    assert bool(patched) == bool(model)
    assert list(patched) == sorted(model.items()) == apply_changes(base, changes, dead)
    assert len(patched) == len(model)
    assert patched == sorted(model.items())
    assert dict(patched.puts()) == {k: v for k, v in changes if v is not None}
    assert patched.deletes() == [k for k, v in changes if v is None]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=st.dictionaries(_KG_AND_KEY, st.binary(min_size=3, max_size=3), max_size=60),
    deltas=st.lists(st.dictionaries(_KG_AND_KEY, st.none() | st.binary(max_size=5), max_size=25), max_size=4),
    size=st.integers(1, 9),
)
def test_lmdb_loads_a_packed_chain_as_merged(
    tmp_path_factory: pytest.TempPathFactory,
    base: dict[tuple[int, int], bytes],
    deltas: list[dict[tuple[int, int], bytes | None]],
    size: int,
) -> None:
    model = {_key(kg, i): v for (kg, i), v in base.items()}
    for delta in deltas:
        for (kg, i), v in delta.items():
            if v is None:
                model.pop(_key(kg, i), None)
            else:
                model[_key(kg, i)] = v
    entries = sorted((_key(kg, i), v) for (kg, i), v in base.items())
    base_chunks: list[tuple[int, Chunk]] = []
    for kg in range(3):
        mine = [e for e in entries if e[0][:2] == struct.pack(">H", kg)]
        base_chunks += [(kg, cast(Chunk, _packed(mine[i : i + size]))) for i in range(0, len(mine), size)]
    delta_chunks = [
        [
            (kg, sorted(((_key(g, i), v) for (g, i), v in delta.items() if g == kg), key=lambda c: c[0]))
            for kg in sorted({g for g, _ in delta})
        ]
        for delta in deltas
    ]
    merged = list(merge_chain(iter(base_chunks), [iter(d) for d in delta_chunks], size=size))
    assert [entry for _, chunk in merged for entry in chunk] == sorted(model.items())
    store = LmdbKV(Path(tmp_path_factory.mktemp("env")))
    try:
        fresh = list(merge_chain(iter(base_chunks), [iter(d) for d in delta_chunks], size=size))
        assert store.bulk_load_chunks(fresh) == len(model)
        assert store.scan(b"") == sorted(model.items())
    finally:
        store.close()
