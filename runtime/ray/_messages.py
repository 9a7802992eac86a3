"""What crosses between the driver and the Ray workers about state: acknowledgements and restores, as JSON.

State handles travel in their public, versioned JSON form (``keystate.storage.format.transfer``), never
as pickled storage objects: a worker writes its state files itself and ships only the handles, the
driver's coordinator adopts them and commits ``_metadata``. A restore is shipped the same way: the
checkpoint's location plus the subtask's handles; the worker opens the checkpoint from storage.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from keystate.runtime.checkpoint_protocol import SubtaskSnapshot
from keystate.runtime.task import TaskRestore
from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle, StreamHandle
from keystate.storage.format.transfer import handle_from_json, handle_to_json
from keystate.storage.uri import open_storage

__all__ = ["RestorePayload", "open_restore", "restore_payload", "snapshot_from_json", "snapshot_to_json"]

_VERSION = 1


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, StreamHandle | KeyedStateHandle | OperatorStateHandle):
        return {"handle": handle_to_json(value)}
    if isinstance(value, tuple | list):
        return [_encode(v, where) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    raise TypeError(f"{where}: {type(value).__name__} has no JSON form for the trip from a worker")


def _decode(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _decode(value, options[0], where) if len(options) == 1 else value
    if origin is tuple:
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, StreamHandle | KeyedStateHandle | OperatorStateHandle):
        return handle_from_json(value["handle"], hint, where=where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{k: _decode(v, hints[k], f"{where}.{k}") for k, v in value.items()})
    return value


def snapshot_to_json(snapshot: SubtaskSnapshot) -> str:
    """A task's acknowledgement as JSON text (handles in their public JSON form)."""
    body = {f.name: _encode(getattr(snapshot, f.name), f.name) for f in dataclasses.fields(snapshot)}
    return json.dumps({"format_version": _VERSION, "snapshot": body}, separators=(",", ":"))


def snapshot_from_json(text: str, *, where: str) -> SubtaskSnapshot:
    """The acknowledgement :func:`snapshot_to_json` made, validated handle by handle.

    Raises:
        MetadataError: a handle is malformed (from ``handle_from_json``).
        ValueError: not a snapshot of a version this driver reads.
    """
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format_version") != _VERSION:
        raise ValueError(f"{where}: not an acknowledgement of format version {_VERSION}")
    hints = typing.get_type_hints(SubtaskSnapshot)
    body = doc["snapshot"]
    known = {f.name for f in dataclasses.fields(SubtaskSnapshot)}
    return SubtaskSnapshot(**{k: _decode(v, hints[k], f"{where}: {k}") for k, v in body.items() if k in known})


@dataclasses.dataclass(frozen=True)
class RestorePayload:
    """What a worker restores from: the checkpoint's location and this subtask's handles, JSON-safe."""

    location: str
    """The checkpoint's directory as a location (path or ``s3://`` URI)."""
    directory: str | None
    """The directory's key in the job's own checkpoint storage, if the checkpoint is there."""
    keyed: list[dict[str, Any]]
    operator: list[dict[str, Any]]
    finished_on_restore: bool


def restore_payload(restore: TaskRestore, job_storage: CheckpointStorage) -> RestorePayload:
    checkpoint = restore.checkpoint
    own = checkpoint.storage.location == job_storage.location
    return RestorePayload(
        location=checkpoint.location,
        directory=checkpoint.directory if own else None,
        keyed=[handle_to_json(h) for h in restore.keyed],
        operator=[handle_to_json(h) for h in restore.operator],
        finished_on_restore=restore.finished_on_restore,
    )


def open_restore(
    payload: RestorePayload, job_storage: CheckpointStorage, *, endpoint_url: str | None, where: str
) -> TaskRestore:
    """Open the checkpoint of ``payload`` (in the worker) and rebuild the subtask's restore from it."""
    checkpoint: CompletedCheckpoint
    if payload.directory is not None:
        checkpoint = job_storage.load(payload.directory)
    else:
        checkpoint = open_storage(payload.location, endpoint_url=endpoint_url).resolve()
    return TaskRestore(
        checkpoint,
        [handle_from_json(h, KeyedStateHandle, where=where) for h in payload.keyed],
        [handle_from_json(h, OperatorStateHandle, where=where) for h in payload.operator],
        payload.finished_on_restore,
    )
