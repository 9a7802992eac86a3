"""What a keyed backend checks and does when it restores: the max parallelism, whatever uid restores, an
environment emptied first also when nothing is loaded, a lock naming its operator, and local disk errors
that stay local disk errors."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.statebackend import (
    BytesSerializer,
    HeapKeyedStateBackend,
    IntSerializer,
    KeyGroupRange,
    LmdbKeyedStateBackend,
    StrSerializer,
    ValueStateDescriptor,
)
from keystate.statebackend._snapshot_reader import KeyedSnapshotReader
from keystate.statebackend.errors import LmdbDirectoryInUseError, LmdbDiskFullError, MaxParallelismMismatchError
from keystate.storage import CheckpointStorage
from tests.small_disk import small_tmpfs
from tests.statebackend.support import FULL, BackendFactory, checkpoint_backends, key_group_of, kv_contents
from tests.statebackend.test_keyed_meta_versions import golden

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())


@pytest.mark.parametrize("version", [1, 2])
def test_restore_under_another_uid_into_another_max_parallelism_is_refused(
    version: int, new_backend: BackendFactory, tmp_path: Path
) -> None:
    # The red team's case: through the backend API under another uid, the uid check does not apply, and
    # half the keys would be lost silently (key groups are numbered modulo the max parallelism).
    completed, handle = golden(version, tmp_path)
    backend = new_backend(
        operator_uid="renamed", max_parallelism=8, key_groups=KeyGroupRange(0, 7), key_serializer=StrSerializer()
    )
    with pytest.raises(MaxParallelismMismatchError, match="max_parallelism 4 but this backend has 8"):
        backend.restore([(completed, handle)])
    assert backend.registered_states() == []  # refused before anything was loaded
    assert kv_contents(backend) == {}


def test_snapshots_record_the_backends_max_parallelism(new_backend: BackendFactory, storage: CheckpointStorage) -> None:
    backend = new_backend(max_parallelism=256, key_groups=KeyGroupRange(0, 255))
    backend.set_current_key(1)
    backend.get_state(COUNT).update(1)
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    reader = KeyedSnapshotReader(completed, handle, "op")
    assert reader.meta().max_parallelism == 256
    with pytest.raises(MaxParallelismMismatchError):
        reader.check_max_parallelism(128)


def test_a_restore_without_entries_for_this_subtask_still_starts_empty(
    tmp_path: Path, storage: CheckpointStorage
) -> None:
    source = HeapKeyedStateBackend(
        operator_uid="op", subtask_index=0, max_parallelism=128, key_groups=KeyGroupRange(0, 63)
    )
    key = next(k for k in range(1000) if key_group_of(k) < 64)
    source.set_current_key(key)
    source.get_state(COUNT).update(1)
    completed, (handle,) = checkpoint_backends(storage, 1, [source])
    assert handle is not None
    directory = tmp_path / "env"
    earlier = LmdbKeyedStateBackend(
        directory=directory,
        buffer_entries=10,  # flushed into LMDB as it goes (close() does not flush the buffer)
        operator_uid="op",
        subtask_index=1,
        max_parallelism=128,
        key_groups=KeyGroupRange(64, 127),
    )
    for k in range(1000):
        if key_group_of(k) >= 64:
            earlier.set_current_key(k)
            earlier.get_state(COUNT).update(7)
    earlier.close()
    later = LmdbKeyedStateBackend(
        directory=directory, operator_uid="op", subtask_index=1, max_parallelism=128, key_groups=KeyGroupRange(64, 127)
    )
    try:
        later.restore([(completed, handle)])  # subtask 0's handle: nothing of it is loaded here
        assert kv_contents(later) == {}
    finally:
        later.close()


def test_the_lock_of_a_backend_names_its_operator(tmp_path: Path) -> None:
    common: dict[str, Any] = {"operator_uid": "totals", "subtask_index": 3, "max_parallelism": 128, "key_groups": FULL}
    first = LmdbKeyedStateBackend(directory=tmp_path / "env", **common)
    try:
        with pytest.raises(LmdbDirectoryInUseError, match=r"\(operator 'totals' subtask 3\); each backend needs"):
            LmdbKeyedStateBackend(directory=tmp_path / "env", **common)
    finally:
        first.close()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "3m") as mount:
        yield mount


def test_a_full_disk_during_restore_is_a_disk_full_error(disk: Path, storage: CheckpointStorage) -> None:
    source = HeapKeyedStateBackend(
        operator_uid="op", subtask_index=0, max_parallelism=128, key_groups=FULL, key_serializer=IntSerializer()
    )
    blob = source.get_state(ValueStateDescriptor[bytes](name="blob", serializer=BytesSerializer()))
    for k in range(100):
        source.set_current_key(k)
        blob.update(random.Random(k).randbytes(100_000))  # 10 MB, incompressible, for a 3 MiB disk
    completed, (handle,) = checkpoint_backends(storage, 1, [source])
    assert handle is not None
    target = LmdbKeyedStateBackend(
        directory=disk / "env",
        map_size=64 << 20,
        operator_uid="op",
        subtask_index=0,
        max_parallelism=128,
        key_groups=FULL,
        key_serializer=IntSerializer(),
    )
    try:
        with pytest.raises(LmdbDiskFullError, match="free disk space"):
            target.restore([(completed, handle)])
    finally:
        target.close()
