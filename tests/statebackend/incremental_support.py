"""Helpers of the incremental-snapshot tests: checkpoints with incremental keyed snapshots, and their restores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keystate.statebackend import (
    IntSerializer,
    KVKeyedStateBackend,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StrSerializer,
    ValueStateDescriptor,
)
from keystate.statebackend.state import KeyedSnapshot, SnapshotOptions
from keystate.storage import CheckpointStorage, CompletedCheckpoint, KeyedStateHandle
from tests.statebackend.support import JOB_ID, keyed_metadata, kv_contents, make_backend

INCREMENTAL = SnapshotOptions(incremental=True)
VALUE = ValueStateDescriptor[int](name="v", serializer=IntSerializer())
LIST = ListStateDescriptor[str](name="l", serializer=StrSerializer())
MAP = MapStateDescriptor[int, str](name="m", serializer=StrSerializer(), key_serializer=IntSerializer())
SUM = ReducingStateDescriptor[int](name="sum", serializer=IntSerializer(), reduce_function=lambda a, b: a + b)


def commit(
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


def checkpoint(
    storage: CheckpointStorage,
    backend: KVKeyedStateBackend,
    checkpoint_id: int,
    options: SnapshotOptions = INCREMENTAL,
    *,
    confirm: bool = True,
) -> tuple[CompletedCheckpoint, KeyedStateHandle | None, int | None]:
    """One incremental checkpoint of one backend: snapshot, write, commit and (``confirm``) notify complete.
    Returns the checkpoint, the handle and the snapshot's ``based_on``."""
    snapshot = backend.snapshot(checkpoint_id, options)
    based_on = snapshot.based_on
    completed, (handle,) = commit(storage, checkpoint_id, [snapshot], operator_uid=backend.operator_uid)
    if confirm:
        backend.notify_checkpoint_complete(checkpoint_id)
    return completed, handle, based_on


def restored_contents(
    kind: str, checkpoint: CompletedCheckpoint, handle: KeyedStateHandle | None, **kwargs: Any
) -> dict[bytes, bytes]:
    """The engine bytes a fresh backend of ``kind`` holds after restoring ``handle``."""
    backend = make_backend(kind, **kwargs)
    try:
        backend.restore([] if handle is None else [(checkpoint, handle)])
        return kv_contents(backend)
    finally:
        backend.close()
