"""Helpers shared by the state-backend suite: backends of both kinds, a manual clock, checkpoints."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from keystate.statebackend import (
    HeapKeyedStateBackend,
    KeySerializer,
    KVKeyedStateBackend,
    LmdbKeyedStateBackend,
    OperatorSnapshot,
    Serializer,
    assign_key_group,
)
from keystate.statebackend.state import KeyedSnapshot
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CheckpointWriter,
    CompletedCheckpoint,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    ObjectInfo,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
    OperatorState,
    OperatorStateHandle,
    PutMode,
    StreamOptions,
    SubtaskState,
    open_storage,
)

BACKENDS = ["lmdb", "heap"]
JOB_ID = "c0ffee" + "0" * 26
FULL = KeyGroupRange(0, 127)


class ManualClock:
    """A TTL clock the test moves by hand (milliseconds)."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def make_backend(
    kind: str,
    *,
    key_groups: KeyGroupRange = FULL,
    max_parallelism: int = 128,
    subtask_index: int = 0,
    operator_uid: str = "op",
    clock: ManualClock | None = None,
    key_serializer: Serializer[Any] | None = None,
    buffer_entries: int = 3,
    map_size: int = 1 << 20,
    directory: Path | None = None,
) -> KVKeyedStateBackend:
    """A keyed backend; LMDB ones get a tiny write buffer so every test crosses flushes constantly."""
    common: dict[str, Any] = {
        "operator_uid": operator_uid,
        "subtask_index": subtask_index,
        "max_parallelism": max_parallelism,
        "key_groups": key_groups,
        "key_serializer": key_serializer,
    }
    if clock is not None:
        common["clock"] = clock
    if kind == "lmdb":
        return LmdbKeyedStateBackend(directory=directory, map_size=map_size, buffer_entries=buffer_entries, **common)
    if kind == "heap":
        return HeapKeyedStateBackend(**common)
    raise ValueError(kind)


class BackendFactory(Protocol):
    def __call__(
        self,
        kind: str | None = None,
        *,
        key_groups: KeyGroupRange = FULL,
        max_parallelism: int = 128,
        subtask_index: int = 0,
        operator_uid: str = "op",
        clock: ManualClock | None = None,
        key_serializer: Serializer[Any] | None = None,
        buffer_entries: int = 3,
        map_size: int = 1 << 20,
    ) -> KVKeyedStateBackend: ...


def key_group_of(key: Any, max_parallelism: int = 128) -> int:
    return assign_key_group(KeySerializer().serialize(key), max_parallelism)


def storage_at(path: Path, *, inline_threshold: int = 0, durable: bool = False) -> CheckpointStorage:
    """Local checkpoint storage; by default every stream becomes a real file (no inlining).

    ``durable=True`` is exactly what ``open_storage`` gives a job; otherwise files are not fsynced,
    which keeps the suite fast and changes nothing a reader sees.
    """
    options = StreamOptions(inline_threshold=inline_threshold)
    if durable:
        return open_storage(str(path), options=options)
    return CheckpointStorage(LocalObjectStore(path, fsync=False), options=options)


def keyed_metadata(
    checkpoint_id: int,
    operator_uid: str,
    max_parallelism: int,
    handles: Sequence[KeyedStateHandle | None],
) -> CheckpointMetadata:
    subtasks = tuple(SubtaskState(i, keyed=(h,)) for i, h in enumerate(handles) if h is not None)
    op = OperatorState(operator_uid, max(len(handles), 1), max_parallelism, subtasks=subtasks)
    return CheckpointMetadata(checkpoint_id, JOB_ID, CheckpointKind.CHECKPOINT, 1_700_000_000_000, (op,))


def write_keyed(
    storage: CheckpointStorage,
    checkpoint_id: int,
    snapshots: Sequence[KeyedSnapshot],
    *,
    operator_uid: str = "op",
    max_parallelism: int = 128,
) -> tuple[CompletedCheckpoint, list[KeyedStateHandle | None]]:
    """Write the snapshots (one per subtask) into checkpoint ``checkpoint_id`` and commit it."""
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    handles = [s.write(writer, f"{operator_uid}/{i}/keyed") for i, s in enumerate(snapshots)]
    completed = writer.commit(keyed_metadata(checkpoint_id, operator_uid, max_parallelism, handles))
    return completed, handles


def checkpoint_backends(
    storage: CheckpointStorage, checkpoint_id: int, backends: Sequence[KVKeyedStateBackend]
) -> tuple[CompletedCheckpoint, list[KeyedStateHandle | None]]:
    """Snapshot every backend (one per subtask of one operator) and commit the checkpoint."""
    return write_keyed(
        storage,
        checkpoint_id,
        [b.snapshot() for b in backends],
        operator_uid=backends[0].operator_uid,
        max_parallelism=backends[0].max_parallelism,
    )


def write_operator(
    storage: CheckpointStorage, checkpoint_id: int, snapshots: Sequence[OperatorSnapshot], operator_uid: str = "src"
) -> tuple[CompletedCheckpoint, list[OperatorStateHandle | None]]:
    writer: CheckpointWriter = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    handles = [s.write(writer, f"{operator_uid}/{i}/operator") for i, s in enumerate(snapshots)]
    subtasks = tuple(SubtaskState(i, operator=(h,)) for i, h in enumerate(handles) if h is not None)
    op = OperatorState(operator_uid, len(snapshots), 128, subtasks=subtasks)
    meta = CheckpointMetadata(checkpoint_id, JOB_ID, CheckpointKind.CHECKPOINT, 1_700_000_000_000, (op,))
    return writer.commit(meta), handles


def kv_contents(backend: KVKeyedStateBackend) -> dict[bytes, bytes]:
    """Every stored entry of a backend (the engine's bytes), read through a snapshot view."""
    view = backend.kv.snapshot()
    try:
        return {k: v for kg in backend.key_groups for k, v in view.iter_key_group(kg)}
    finally:
        view.release()


# --- an object store that counts what is read ---------------------------------------------------------


class _CountingReader:
    def __init__(self, inner: ObjectReader, owner: CountingStore) -> None:
        self._inner = inner
        self._owner = owner

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        self._owner.bytes_read += len(data)
        return data

    def close(self) -> None:
        self._inner.close()


class CountingStore(ObjectStore):
    """Delegates to another store and counts the bytes returned by get / get_range / readers."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.bytes_read = 0

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self.bytes_read += len(data)
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = self.inner.get_range(key, start, length)
        self.bytes_read += len(data)
        return data

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        return _CountingReader(self.inner.open_reader(key, start), self)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        self.inner.put(key, data, mode)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        return self.inner.open_writer(key, mode)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list_objects(prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        return self.inner.list_dirs(prefix)


def lmdb_key(i: int) -> bytes:
    """A composite key of key group ``i % 128``, state 1, a 4-byte user key ``i`` and no namespace."""
    return struct.pack(">HH", i % 128, 1) + b"\x00\x04" + struct.pack(">i", i) + b"\x00\x00"
