"""Keyed snapshot meta versions: format 2 records the max parallelism, format 1 (written by keystate 0.2)
still restores, and a snapshot never restores into another max parallelism, whatever uid restores it.

The golden checkpoints under ``golden/`` pin both versions (docs/format.md section 3.9): ``keyed_meta_v1``
was written by the backend before format 2, ``keyed_meta_v2`` by the writer with the max parallelism
passed. Each holds operator ``totals`` (max parallelism 4, ``str`` keys) with a value state ``count``
and a list state ``seen``. Golden files are only ever added, never rewritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from keystate.statebackend import (
    IntSerializer,
    KeyGroupRange,
    ListStateDescriptor,
    StateMigrationError,
    StateRestoreError,
    StrSerializer,
    ValueStateDescriptor,
)
from keystate.statebackend._snapshot import SnapshotMeta
from keystate.statebackend._snapshot_reader import KeyedSnapshotReader
from keystate.statebackend.errors import MaxParallelismMismatchError
from keystate.storage import CheckpointStorage, CompletedCheckpoint, KeyedStateHandle, LocalObjectStore
from tests.statebackend.support import BackendFactory
from tests.statebackend.test_restore_errors import craft, sample_entries, valid_meta

GOLDEN = Path(__file__).parent / "golden"
JOB = "6b657973746174652d676f6c64656e31"
COUNTS = {"alice": 3, "bob": 5, "carol": 7, "dave": 11, "erin": 13}
STATES = (
    '[{"id":1,"name":"count","kind":"value","serializer":"int64","user_key_serializer":null,"ttl":null},'
    '{"id":2,"name":"seen","kind":"list","serializer":"str","user_key_serializer":null,"ttl":null}]'
)
META = {
    1: f'{{"format_version":1,"key_serializer":"str","key_group_hash":"xxh3-64-v1","states":{STATES}}}'.encode(),
    2: (
        '{"format_version":2,"key_serializer":"str","key_group_hash":"xxh3-64-v1","max_parallelism":4,'
        f'"states":{STATES}}}'
    ).encode(),
}
COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())
SEEN = ListStateDescriptor[str](name="seen", serializer=StrSerializer())


def golden(version: int, tmp_path: Path) -> tuple[CompletedCheckpoint, KeyedStateHandle]:
    root = tmp_path / f"golden-v{version}"
    shutil.copytree(GOLDEN / f"keyed_meta_v{version}", root)
    completed = CheckpointStorage(LocalObjectStore(root, fsync=False)).load(f"{JOB}/chk-1")
    (operator,) = completed.metadata.operators
    (handle,) = operator.subtasks[0].keyed
    return completed, handle


@pytest.mark.parametrize("version", [1, 2])
def test_golden_snapshots_of_both_meta_versions_restore(
    version: int, new_backend: BackendFactory, tmp_path: Path
) -> None:
    completed, handle = golden(version, tmp_path)
    backend = new_backend(
        operator_uid="totals", max_parallelism=4, key_groups=KeyGroupRange(0, 3), key_serializer=StrSerializer()
    )
    backend.restore([(completed, handle)])
    count, seen = backend.get_state(COUNT), backend.get_state(SEEN)
    assert sorted(backend.keys("count")) == sorted(COUNTS)
    for name, n in COUNTS.items():
        backend.set_current_key(name)
        assert count.value() == n
        assert seen.get() == [name[:1], name[-1:]]


@pytest.mark.parametrize("version", [1, 2])
def test_golden_meta_is_byte_for_byte_what_the_writer_writes(version: int, tmp_path: Path) -> None:
    completed, handle = golden(version, tmp_path)
    meta = KeyedSnapshotReader(completed, handle, "totals").meta()
    assert meta.max_parallelism == (None if version == 1 else 4)
    assert meta.to_json_bytes() == META[version]
    assert META[version] in completed.open_state(handle.stream).read_all()
    assert SnapshotMeta(meta.key_serializer, meta.key_group_hash, meta.states, meta.max_parallelism) == meta


@pytest.mark.parametrize("version", [1, 2])
def test_another_max_parallelism_is_refused_under_any_uid(version: int, tmp_path: Path) -> None:
    # Format 2 records it in the meta; for format 1 it comes from the operator that lists the handle in the
    # checkpoint's metadata, not from the uid restoring it (the red team restored under another uid).
    completed, handle = golden(version, tmp_path)
    reader = KeyedSnapshotReader(completed, handle, "renamed")
    assert reader.recorded_max_parallelism() == 4
    reader.check_max_parallelism(4)
    with pytest.raises(MaxParallelismMismatchError) as info:
        reader.check_max_parallelism(8)
    message = str(info.value)
    assert "operator 'renamed'" in message
    assert "was written with max_parallelism 4 but this backend has 8" in message
    assert "keep max_parallelism 4" in message
    assert isinstance(info.value, StateMigrationError)  # the bytes are fine: not a format error
    assert not isinstance(info.value, StateRestoreError)


def test_a_handle_beyond_the_recorded_max_parallelism_is_refused(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    meta = valid_meta(format_version=2, max_parallelism=64)
    completed, handle = craft(storage, json.dumps(meta).encode(), sample_entries(), KeyGroupRange(0, 127))
    with pytest.raises(
        StateRestoreError, match=r"key groups 0\.\.127, but .* max_parallelism 64 \(key groups 0\.\.63\)"
    ):
        new_backend().restore([(completed, handle)])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format_version": 2}, "required field 'max_parallelism' is missing"),
        ({"format_version": 2, "max_parallelism": 0}, "max_parallelism"),
        ({"format_version": 2, "max_parallelism": 32769}, "max_parallelism"),
        ({"format_version": 2, "max_parallelism": "128"}, "max_parallelism"),
        ({"max_parallelism": 128}, "unknown field 'max_parallelism'"),  # format 1 has no such field
    ],
    ids=["missing", "zero", "too-large", "string", "in-format-1"],
)
def test_invalid_max_parallelism_in_the_meta_is_a_restore_error(
    new_backend: BackendFactory, storage: CheckpointStorage, changes: dict[str, Any], expected: str
) -> None:
    completed, handle = craft(storage, json.dumps(valid_meta(**changes)).encode(), sample_entries())
    with pytest.raises(StateRestoreError, match=expected):
        new_backend().restore([(completed, handle)])
