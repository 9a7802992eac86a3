"""Who owns an LMDB directory: one backend at a time (in this process or another), a restore starts from an
empty environment whatever an earlier owner left there, and scratch directories of dead processes are
deleted while those of live ones are never touched."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.statebackend import (
    HeapKeyedStateBackend,
    IntSerializer,
    KeyGroupRange,
    LmdbKeyedStateBackend,
    LmdbStateBackend,
    ValueStateDescriptor,
    key_group_range_for_subtask,
)
from keystate.statebackend._lmdb import LmdbKV
from keystate.statebackend._lmdb_env import LOCK_FILE, remove_dead_scratch
from keystate.statebackend.errors import LmdbDirectoryInUseError
from keystate.storage import CheckpointStorage, CompletedCheckpoint, KeyedStateHandle
from tests.statebackend.support import FULL, checkpoint_backends, key_group_of, kv_contents

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("lmdb_child.py")
COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())


class Child:
    """``lmdb_child.py`` in a subprocess: holds an LMDB backend until told to close it, or killed."""

    def __init__(self, mode: str, where: Path, keys: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), mode, str(where), str(keys)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split(maxsplit=1)
        assert line[:1] == ["ready"], f"child failed: {line}"
        self.directory = Path(line[1].strip())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Tell a running child to close its backend and exit; then release the pipes."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            assert self.proc.wait(timeout=30) == 0
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.kill()
        child.close()


def lmdb_at(directory: Path, **kwargs: Any) -> LmdbKeyedStateBackend:
    options: dict[str, Any] = {
        "operator_uid": "op",
        "subtask_index": 0,
        "max_parallelism": 128,
        "key_groups": FULL,
        "buffer_entries": 100,
    }
    options.update(kwargs)
    return LmdbKeyedStateBackend(directory=directory, **options)


def checkpoint_of(storage: CheckpointStorage, keys: range) -> tuple[CompletedCheckpoint, KeyedStateHandle]:
    """A checkpoint whose ``count`` of key ``k`` is ``k * 10``."""
    source = HeapKeyedStateBackend(operator_uid="op", subtask_index=0, max_parallelism=128, key_groups=FULL)
    count = source.get_state(COUNT)
    for key in keys:
        source.set_current_key(key)
        count.update(key * 10)
    completed, (handle,) = checkpoint_backends(storage, 1, [source])
    assert handle is not None
    return completed, handle


def counts(backend: LmdbKeyedStateBackend) -> dict[int, int]:
    count = backend.get_state(COUNT)
    found: dict[int, int] = {}
    for key in backend.keys("count"):
        backend.set_current_key(key)
        value = count.value()
        assert value is not None
        found[key] = value
    return found


# --- a restore starts from an empty environment ---------------------------------------------------------


def test_restore_discards_what_a_killed_worker_left_in_its_directory(
    tmp_path: Path, storage: CheckpointStorage, children: list[Child]
) -> None:
    # The red team's case: a worker with a fixed LMDB directory is killed; its replacement restores the
    # last checkpoint (500 keys) and must not also resurrect the 1000 keys the dead worker had written.
    directory = tmp_path / "worker-0"
    children.append(worker := Child("fixed", directory, 1000))
    worker.kill()
    completed, handle = checkpoint_of(storage, range(500))
    replacement = lmdb_at(directory)
    try:
        replacement.restore([(completed, handle)])
        assert counts(replacement) == {key: key * 10 for key in range(500)}
    finally:
        replacement.close()


def test_restore_discards_what_a_closed_backend_left(tmp_path: Path, storage: CheckpointStorage) -> None:
    directory = tmp_path / "env"
    earlier = lmdb_at(directory)
    count = earlier.get_state(COUNT)
    for key in range(1000):
        earlier.set_current_key(key)
        count.update(key * 7 + 1)
    earlier.close()  # a directory the caller gave is kept, with its environment
    completed, handle = checkpoint_of(storage, range(500))
    later = lmdb_at(directory)
    try:
        later.restore([(completed, handle)])
        assert counts(later) == {key: key * 10 for key in range(500)}
        assert len(kv_contents(later)) == 500
    finally:
        later.close()


def test_a_rescaled_restore_of_several_handles_keeps_them_all(tmp_path: Path, storage: CheckpointStorage) -> None:
    # Only what was there before the restore is discarded, not the first handle's entries.
    halves = [
        HeapKeyedStateBackend(operator_uid="op", subtask_index=i, max_parallelism=128, key_groups=groups)
        for i, groups in enumerate((KeyGroupRange(0, 63), KeyGroupRange(64, 127)))
    ]
    for key in range(300):
        half = next(h for h in halves if key_group_of(key) in h.key_groups)
        half.set_current_key(key)
        half.get_state(COUNT).update(key * 10)
    completed, handles = checkpoint_backends(storage, 1, halves)
    directory = tmp_path / "env"
    earlier = lmdb_at(directory)
    for key in range(1000, 1100):
        earlier.set_current_key(key)
        earlier.get_state(COUNT).update(1)
    earlier.close()
    later = lmdb_at(directory)
    try:
        later.restore([(completed, h) for h in handles if h is not None])
        assert counts(later) == {key: key * 10 for key in range(300)}
    finally:
        later.close()


# --- one backend per directory ----------------------------------------------------------------------------


def test_a_second_backend_on_a_directory_in_this_process_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "env"
    first = lmdb_at(directory)
    try:
        with pytest.raises(LmdbDirectoryInUseError) as info:
            lmdb_at(directory)
        message = str(info.value)
        assert f"LMDB directory {directory} is in use by pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "each backend needs its own directory" in message
        assert (info.value.pid, info.value.host, info.value.path) == (os.getpid(), socket.gethostname(), str(directory))
    finally:
        first.close()
    second = lmdb_at(directory)  # released on close
    second.close()


def test_the_lock_file_names_the_operator_of_a_factory_backend(tmp_path: Path) -> None:
    factory = LmdbStateBackend(tmp_path)
    backend = factory.create_keyed_backend(
        operator_uid="totals", subtask_index=0, max_parallelism=128, key_groups=key_group_range_for_subtask(128, 2, 0)
    )
    assert isinstance(backend, LmdbKeyedStateBackend)
    try:
        record = json.loads((backend.directory / LOCK_FILE).read_text())
        assert record == {"pid": os.getpid(), "host": socket.gethostname(), "owner": "operator 'totals' subtask 0"}
        with pytest.raises(LmdbDirectoryInUseError, match=r"\(operator 'totals' subtask 0\); each backend needs"):
            LmdbKV(backend.directory)
    finally:
        backend.close()
    assert not backend.directory.exists()


def test_a_directory_held_by_another_process_is_refused(tmp_path: Path, children: list[Child]) -> None:
    directory = tmp_path / "shared"
    children.append(holder := Child("fixed", directory, 10))
    with pytest.raises(LmdbDirectoryInUseError) as info:
        lmdb_at(directory)
    assert f"is in use by pid {holder.proc.pid} on host {socket.gethostname()}" in str(info.value)
    assert info.value.pid == holder.proc.pid
    holder.close()  # a clean close releases the lock
    after = lmdb_at(directory)
    after.close()


def test_a_killed_holder_releases_the_directory(tmp_path: Path, children: list[Child]) -> None:
    directory = tmp_path / "env"
    children.append(holder := Child("fixed", directory, 10))
    holder.kill()
    after = lmdb_at(directory)
    after.close()


# --- scratch directories of dead processes --------------------------------------------------------------


def test_scratch_of_killed_processes_is_removed_and_live_scratch_kept(tmp_path: Path, children: list[Child]) -> None:
    parent = tmp_path / "scratch"
    children.append(dead := Child("scratch", parent, 50))
    children.append(alive := Child("scratch", parent, 50))
    dead.kill()
    assert dead.directory.parent == alive.directory.parent == parent
    live_files = {p.name: p.stat().st_size for p in alive.directory.iterdir()}
    unrelated = [parent / "keystate-notes", parent / "other-op-0-0123abcd"]
    for directory in unrelated:
        (directory / LOCK_FILE).parent.mkdir()
        (directory / LOCK_FILE).write_text("{}")  # a lock file, but not a scratch directory's name
    unlocked = parent / "keystate-op-0-89abcdef"
    unlocked.mkdir()  # a scratch name without a lock file: being created, or written by an older keystate
    backend = LmdbStateBackend(parent).create_keyed_backend(
        operator_uid="op", subtask_index=1, max_parallelism=128, key_groups=FULL
    )
    try:
        assert not dead.directory.exists()
        assert {p.name: p.stat().st_size for p in alive.directory.iterdir()} == live_files
        assert all(d.is_dir() for d in [*unrelated, unlocked])
        alive.close()  # the live child still owns a working environment
        assert not alive.directory.exists()
    finally:
        backend.close()


def test_remove_dead_scratch_never_takes_a_held_lock(tmp_path: Path) -> None:
    held = LmdbStateBackend(tmp_path).create_keyed_backend(
        operator_uid="op", subtask_index=0, max_parallelism=128, key_groups=FULL
    )
    assert isinstance(held, LmdbKeyedStateBackend)
    try:
        assert remove_dead_scratch(tmp_path) == []
        assert held.directory.is_dir()
        held.set_current_key(1)
        held.get_state(COUNT).update(5)  # still its own
    finally:
        held.close()
