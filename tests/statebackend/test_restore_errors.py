"""Damaged or mismatched snapshots fail restore with a typed error that says where; never silently."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from keystate.statebackend import (
    IntSerializer,
    KVKeyedStateBackend,
    StateMigrationError,
    StateRestoreError,
    ValueStateDescriptor,
)
from keystate.storage import (
    CheckpointStorage,
    ChecksumMismatchError,
    CompletedCheckpoint,
    KeyedStateHandle,
    KeyGroupRange,
    MemoryObjectStore,
    NotFoundError,
    PutMode,
    StateFileError,
    StreamOptions,
)
from keystate.storage.format.statefile import (
    BLOCK_HEADER,
    TRAILER,
)
from tests.statebackend.support import (
    FULL,
    JOB_ID,
    BackendFactory,
    checkpoint_backends,
    key_group_of,
    keyed_metadata,
    kv_contents,
    make_backend,
)

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())
INT = IntSerializer()
_COUNTERS = TRAILER.size - 4  # the trailer after its end marker: block count and raw length


def valid_meta(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format_version": 1,
        "key_serializer": "key-v1",
        "key_group_hash": "xxh3-64-v1",
        "states": [
            {"id": 1, "name": "count", "kind": "value", "serializer": "int64", "user_key_serializer": None, "ttl": None}
        ],
    }
    meta.update(changes)
    return meta


def entry_key(key_group: int, sid: int, key: bytes, namespace: bytes = b"") -> bytes:
    return struct.pack(">HHH", key_group, sid, len(key)) + key + struct.pack(">H", len(namespace)) + namespace


def craft(
    storage: CheckpointStorage,
    meta: bytes,
    entries: Mapping[int, Sequence[tuple[bytes, bytes]]],
    key_groups: KeyGroupRange = FULL,
    checkpoint_id: int = 1,
) -> tuple[CompletedCheckpoint, KeyedStateHandle]:
    """A keyed state file written by hand in the snapshot payload format (see statebackend._snapshot)."""
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    with writer.open_stream("op/0/keyed") as stream:
        stream.write(struct.pack(">I", len(meta)) + meta)
        offsets = []
        for kg in key_groups:
            offsets.append(stream.start_block())
            for k, v in entries.get(kg, ()):
                stream.write(struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v)
        stream_handle = stream.close()
    handle = KeyedStateHandle(key_groups, tuple(offsets), stream_handle)
    return writer.commit(keyed_metadata(checkpoint_id, "op", 128, [handle])), handle


def sample_entries(count: int = 20) -> dict[int, list[tuple[bytes, bytes]]]:
    entries: dict[int, list[tuple[bytes, bytes]]] = {}
    for key in range(count):
        raw = b"\x03" + INT.serialize(key)[0:8]  # KeySerializer's int encoding: tag 3 + sortable int64
        kg = key_group_of(key)
        entries.setdefault(kg, []).append((entry_key(kg, 1, raw), INT.serialize(key * 10)))
    for kg in entries:
        entries[kg].sort()
    return entries


def filled(new_backend: BackendFactory, keys: range = range(400)) -> KVKeyedStateBackend:
    backend = new_backend()
    count = backend.get_state(COUNT)
    for key in keys:
        backend.set_current_key(key)
        count.update(key)
    return backend


def snapshot_of(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> tuple[CompletedCheckpoint, KeyedStateHandle]:
    completed, (handle,) = checkpoint_backends(storage, 1, [filled(new_backend)])
    assert handle is not None
    return completed, handle


def rewrite(storage: CheckpointStorage, completed: CompletedCheckpoint, handle: KeyedStateHandle, data: bytes) -> None:
    key = completed.state_key(handle.stream)
    assert key is not None
    storage.store.put(key, data, PutMode.OVERWRITE)


def file_bytes(storage: CheckpointStorage, completed: CompletedCheckpoint, handle: KeyedStateHandle) -> bytes:
    key = completed.state_key(handle.stream)
    assert key is not None
    return storage.store.get(key)


def restore_error(
    new_backend: BackendFactory, completed: CompletedCheckpoint, handle: KeyedStateHandle, **kwargs: Any
) -> StateRestoreError:
    with pytest.raises(StateRestoreError) as info:
        new_backend(**kwargs).restore([(completed, handle)])
    message = str(info.value)
    assert "operator 'op'" in message
    assert handle.stream.path is not None
    assert handle.stream.path.rsplit("/", 1)[-1] in message  # names the state file
    return info.value


def test_crafted_file_restores(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = craft(storage, json.dumps(valid_meta()).encode(), sample_entries())
    backend = new_backend()
    backend.restore([(completed, handle)])
    count = backend.get_state(COUNT)
    assert sorted(backend.keys("count")) == list(range(20))
    for key in range(20):
        backend.set_current_key(key)
        assert count.value() == key * 10


def test_corrupted_block_is_a_restore_error(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    data = bytearray(file_bytes(storage, completed, handle))
    kg = key_group_of(5)
    at = handle.offsets[kg] + BLOCK_HEADER.size + 3  # inside the stored bytes of key group kg's block
    data[at] ^= 0x40
    rewrite(storage, completed, handle, bytes(data))
    error = restore_error(new_backend, completed, handle)
    assert isinstance(error.__cause__, ChecksumMismatchError)
    assert "key groups" in str(error)
    assert f"offset {handle.offsets[kg]}" in str(error)


def test_no_single_byte_corruption_restores_different_state() -> None:
    storage = CheckpointStorage(MemoryObjectStore(), options=StreamOptions(inline_threshold=0))
    source = make_backend("heap")
    count = source.get_state(COUNT)
    for key in range(12):
        source.set_current_key(key)
        count.update(key)
    completed, (handle,) = checkpoint_backends(storage, 1, [source])
    assert handle is not None
    original = file_bytes(storage, completed, handle)
    expected = kv_contents(source)
    source.close()
    failures = 0
    for position in range(len(original)):
        for flip in (0x01, 0x80):
            damaged = bytearray(original)
            damaged[position] ^= flip
            rewrite(storage, completed, handle, bytes(damaged))
            target = make_backend("heap")
            try:
                target.restore([(completed, handle)])
                restored = kv_contents(target)
            except (StateRestoreError, StateMigrationError):
                failures += 1
                continue
            finally:
                target.close()
            # only bytes nobody relies on (the trailer's counters) may change without an error
            assert position >= len(original) - _COUNTERS, f"byte {position} ^ {flip:#x} restored silently"
            assert restored == expected
    assert failures >= 2 * (len(original) - _COUNTERS)


@pytest.mark.parametrize("cut", ["last-byte", "trailer", "mid-block", "after-header", "inside-header"])
def test_truncated_file_is_a_restore_error(new_backend: BackendFactory, storage: CheckpointStorage, cut: str) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    data = file_bytes(storage, completed, handle)
    size = {
        "last-byte": len(data) - 1,
        "trailer": len(data) - TRAILER.size,
        "mid-block": handle.offsets[64] + 10,
        "after-header": 8,
        "inside-header": 3,
    }[cut]
    rewrite(storage, completed, handle, data[:size])
    error = restore_error(new_backend, completed, handle)
    assert isinstance(error.__cause__, StateFileError)


def test_missing_file_is_a_storage_error_naming_it(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    key = completed.state_key(handle.stream)
    assert key is not None
    storage.store.delete(key)
    with pytest.raises(NotFoundError, match=key.rsplit("/", 1)[-1]):
        new_backend().restore([(completed, handle)])


def test_shifted_offsets_put_entries_in_the_wrong_key_group(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    kg = next(g for g in range(1, 127) if handle.offsets[g] != handle.offsets[g + 1])  # a key group with data
    offsets = list(handle.offsets)
    offsets[kg] = offsets[kg + 1]  # its block now counts as the previous key group's
    shifted = KeyedStateHandle(handle.key_groups, tuple(offsets), handle.stream)
    error = restore_error(new_backend, completed, shifted)
    assert f"key group {kg - 1}" in str(error)
    assert f"belongs to key group {kg}" in str(error)


def test_handle_with_shifted_range_is_rejected(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    # the same offsets claimed for key groups 1..127 + the rest: every block is one key group off
    shifted = KeyedStateHandle(KeyGroupRange(0, 126), handle.offsets[1:], handle.stream)
    restore_error(new_backend, completed, shifted)
    moved = KeyedStateHandle(KeyGroupRange(1, 127), handle.offsets[1:], handle.stream)
    restore_error(new_backend, completed, moved)


def test_first_offset_must_follow_the_meta(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    offsets = (handle.offsets[5], *handle.offsets[1:])
    offsets = tuple(max(o, offsets[0]) for o in offsets)
    error = restore_error(new_backend, completed, KeyedStateHandle(handle.key_groups, offsets, handle.stream))
    assert "offsets do not match" in str(error)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        (b"{not json", "JSON"),
        (json.dumps(valid_meta(extra=1)).encode(), "extra"),
        (json.dumps(valid_meta(format_version=3)).encode(), "format_version 3"),
        (json.dumps({k: v for k, v in valid_meta().items() if k != "states"}).encode(), "states"),
        (json.dumps(valid_meta(states=[{**valid_meta()["states"][0], "color": "red"}])).encode(), "color"),
        (json.dumps(valid_meta(states=[{**valid_meta()["states"][0], "kind": "tree"}])).encode(), "kind"),
        (json.dumps(valid_meta(states=[valid_meta()["states"][0]] * 2)).encode(), "unique"),
        (json.dumps(valid_meta(states=[{**valid_meta()["states"][0], "id": 0}])).encode(), "id"),
        (json.dumps([1, 2]).encode(), "object"),
    ],
    ids=[
        "not-json",
        "unknown-field",
        "newer-version",
        "missing-states",
        "unknown-state-field",
        "bad-kind",
        "dup",
        "id-0",
        "array",
    ],
)
def test_invalid_meta_is_a_restore_error(
    new_backend: BackendFactory, storage: CheckpointStorage, meta: bytes, expected: str
) -> None:
    completed, handle = craft(storage, meta, sample_entries())
    error = restore_error(new_backend, completed, handle)
    assert expected in str(error)


def test_entry_of_unknown_state_id(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    entries = sample_entries()
    kg = min(entries)
    entries[kg].append((entry_key(kg, 9, b"\x06zzz"), INT.serialize(1)))
    completed, handle = craft(storage, json.dumps(valid_meta()).encode(), entries)
    error = restore_error(new_backend, completed, handle)
    assert f"key group {kg}" in str(error)
    assert "unknown state id 9" in str(error)


def test_entry_in_the_wrong_key_group(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    entries = sample_entries()
    kg = min(entries)
    entries[kg].append((entry_key(kg + 1, 1, b"\x06zzz"), INT.serialize(1)))
    completed, handle = craft(storage, json.dumps(valid_meta()).encode(), entries)
    error = restore_error(new_backend, completed, handle)
    assert f"key group {kg}, " in str(error)
    assert f"belongs to key group {kg + 1}" in str(error)


@pytest.mark.parametrize("damage", ["value-too-long", "key-too-long", "header-cut"])
def test_malformed_entry(new_backend: BackendFactory, storage: CheckpointStorage, damage: str) -> None:
    entries = sample_entries()
    kg = max(entries)
    good = entries[kg][0]
    raw = struct.pack(">H", len(good[0])) + good[0] + struct.pack(">I", len(good[1])) + good[1]
    bad = {
        "value-too-long": raw[:-8],
        "key-too-long": struct.pack(">H", 5000) + raw[2:],
        "header-cut": raw + b"\x00",
    }[damage]
    meta = json.dumps(valid_meta()).encode()
    writer = storage.begin_checkpoint(JOB_ID, 1)
    with writer.open_stream("op/0/keyed") as stream:
        stream.write(struct.pack(">I", len(meta)) + meta)
        offsets = []
        for g in range(128):
            offsets.append(stream.start_block())
            if g == kg:
                stream.write(bad)
        sh = stream.close()
    handle = KeyedStateHandle(KeyGroupRange(0, 127), tuple(offsets), sh)
    completed = writer.commit(keyed_metadata(1, "op", 128, [handle]))
    error = restore_error(new_backend, completed, handle)
    assert f"key group {kg}" in str(error)


@pytest.mark.parametrize("case", ["key-of-5-bytes", "key-of-7-bytes", "key-of-512-bytes"])
def test_composite_key_outside_the_stored_lengths(
    new_backend: BackendFactory, storage: CheckpointStorage, case: str
) -> None:
    """Regression (found by tests/fuzz): restore took a 4..7-byte composite key (``keys()`` then failed with
    ``struct.error``) and a key over LMDB's 511 bytes (``lmdb.BadValsizeError``)."""
    entries = sample_entries()
    kg = min(entries)
    key = {
        "key-of-5-bytes": struct.pack(">HH", kg, 1) + b"\x00",
        "key-of-7-bytes": struct.pack(">HHH", kg, 1, 0) + b"\x00",
        "key-of-512-bytes": entry_key(kg, 1, b"\x06" + b"k" * 503),
    }[case]
    assert len(key) == int(case.split("-")[2])
    entries[kg].append((key, INT.serialize(1)))
    entries[kg].sort()
    completed, handle = craft(storage, json.dumps(valid_meta()).encode(), entries)
    error = restore_error(new_backend, completed, handle)
    assert f"key group {kg}" in str(error)
    assert f"entry key of {len(key)} bytes; composite keys have 8..511 bytes" in str(error)


@pytest.mark.parametrize("kind", ["value", "list"])
def test_value_of_a_ttl_state_without_its_timestamp(
    new_backend: BackendFactory, storage: CheckpointStorage, kind: str
) -> None:
    """Regression (found by tests/fuzz): a TTL state's value shorter than its 8-byte timestamp restored,
    and reading it failed with ``struct.error``."""
    ttl = {"ttl_ms": 1000, "update": "on_create_and_write", "visibility": "never_return_expired",
           "cleanup_in_snapshot": False}  # fmt: skip
    meta = valid_meta(states=[{**valid_meta()["states"][0], "kind": kind, "ttl": ttl}])
    entries = sample_entries()
    kg = min(entries)
    good = struct.pack(">q", 10**12) + INT.serialize(1)
    value = {"value": b"\x00\x01\x02", "list": struct.pack(">qI", 10**12, 99) + b"short"}[kind]
    entries = {g: [(k, good if kind == "value" else struct.pack(">qI", 10**12, 8) + INT.serialize(1)) for k, _ in e]
               for g, e in entries.items()}  # fmt: skip
    entries[kg][0] = (entries[kg][0][0], value)
    completed, handle = craft(storage, json.dumps(meta).encode(), entries)
    error = restore_error(new_backend, completed, handle)
    assert f"key group {kg}" in str(error)
    assert "state 'count'" in str(error)


def test_a_ttl_state_with_its_timestamps_restores(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    ttl = {"ttl_ms": 1000, "update": "on_create_and_write", "visibility": "never_return_expired",
           "cleanup_in_snapshot": False}  # fmt: skip
    meta = valid_meta(states=[{**valid_meta()["states"][0], "ttl": ttl}])
    entries = {g: [(k, struct.pack(">q", 10**12) + v) for k, v in e] for g, e in sample_entries().items()}
    completed, handle = craft(storage, json.dumps(meta).encode(), entries)
    backend = new_backend()
    backend.restore([(completed, handle)])
    assert sorted(backend.keys("count")) == list(range(20))


def test_different_key_serializer_is_a_migration_error(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = snapshot_of(new_backend, storage)
    with pytest.raises(StateMigrationError) as info:
        new_backend(key_serializer=IntSerializer()).restore([(completed, handle)])
    message = str(info.value)
    assert "operator 'op'" in message
    assert "key serializer 'key-v1'" in message
    assert "'int64'" in message
    assert handle.stream.path is not None
    assert handle.stream.path.rsplit("/", 1)[-1] in message


def test_different_key_group_hash_is_a_migration_error(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    completed, handle = craft(storage, json.dumps(valid_meta(key_group_hash="murmur-flink")).encode(), sample_entries())
    with pytest.raises(StateMigrationError, match="murmur-flink") as info:
        new_backend().restore([(completed, handle)])
    assert "operator 'op'" in str(info.value)


def test_handles_disagreeing_on_a_state_are_a_migration_error(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    as_list = [{**valid_meta()["states"][0], "kind": "list"}]
    c1, h1 = craft(storage, json.dumps(valid_meta()).encode(), sample_entries(), KeyGroupRange(0, 63), 1)
    entries = {kg: e for kg, e in sample_entries().items() if kg >= 64}
    c2, h2 = craft(storage, json.dumps(valid_meta(states=as_list)).encode(), entries, KeyGroupRange(64, 127), 2)
    with pytest.raises(StateMigrationError, match="in another handle"):
        new_backend().restore([(c1, h1), (c2, h2)])


def test_other_max_parallelism_is_a_migration_error(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    # Key group numbers mean other keys under another max_parallelism: loading would lose keys silently.
    completed, handle = snapshot_of(new_backend, storage)
    with pytest.raises(StateMigrationError, match="max_parallelism 128 but this backend has 256") as info:
        new_backend(max_parallelism=256, key_groups=KeyGroupRange(0, 127)).restore([(completed, handle)])
    assert "operator 'op'" in str(info.value)
