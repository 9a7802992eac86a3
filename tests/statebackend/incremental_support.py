"""Helpers of the incremental-snapshot tests: checkpoints with incremental keyed snapshots, and their restores."""

from __future__ import annotations

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
from keystate.statebackend.state import SnapshotOptions
from keystate.storage import CheckpointStorage, CompletedCheckpoint, KeyedStateHandle
from tests.statebackend.support import kv_contents, make_backend, write_keyed

INCREMENTAL = SnapshotOptions(incremental=True)
VALUE = ValueStateDescriptor[int](name="v", serializer=IntSerializer())
LIST = ListStateDescriptor[str](name="l", serializer=StrSerializer())
MAP = MapStateDescriptor[int, str](name="m", serializer=StrSerializer(), key_serializer=IntSerializer())
commit = write_keyed
"""Write snapshots (one per subtask) into a checkpoint and commit it (``support.write_keyed``)."""
SUM = ReducingStateDescriptor[int](name="sum", serializer=IntSerializer(), reduce_function=lambda a, b: a + b)


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
