"""What crosses between the driver and the Ray workers about state: acknowledgements and restores, as JSON.

State handles travel in their public, versioned JSON form (``keystate.storage.format.transfer``), never
as pickled storage objects: a worker writes its state files itself and ships only the handles, the
driver's coordinator adopts them and commits ``_metadata``. A restore is shipped the same way: the
checkpoint's location plus the subtask's handles; the worker opens the checkpoint from storage.

Acknowledgement layout (format version 1), one JSON object of at most :data:`MAX_ACKNOWLEDGEMENT_CHARS`::

    {"format_version": 1,
     "snapshot": {"keyed": [{"handle": <keyed handle form>}, ...],
                  "operator": [{"handle": <operator handle form>}, ...],
                  "finished_operators": false, "finished_on_restore": false, "incremental": true,
                  "based_on": 7 | null, "sync_duration_ms": 3, "async_duration_ms": 9,
                  "alignment_duration_ms": 0}}

Every field is required and no other is accepted: this is an internal protocol between a driver and
workers it deployed itself from the same keystate, so an unknown field or a missing one means a worker of
another keystate version (or a corrupted message), never an extension to tolerate. A change to the layout
bumps ``format_version``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NoReturn

from keystate.runtime.checkpoint_protocol import SubtaskSnapshot
from keystate.runtime.task import TaskRestore
from keystate.storage.checkpoints import CheckpointStorage, CompletedCheckpoint
from keystate.storage.errors import MetadataError
from keystate.storage.format.metadata import MAX_ID, KeyedStateHandle, OperatorStateHandle
from keystate.storage.format.transfer import handle_from_json, handle_to_json
from keystate.storage.format.validation import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_CONTAINERS, decode_strict_json
from keystate.storage.uri import open_storage

__all__ = [
    "MAX_ACKNOWLEDGEMENT_CHARS",
    "AcknowledgementError",
    "RestorePayload",
    "open_restore",
    "restore_payload",
    "snapshot_from_json",
    "snapshot_to_json",
]

_VERSION = 1

MAX_ACKNOWLEDGEMENT_CHARS = MAX_DOCUMENT_BYTES
"""Longer acknowledgements are refused before parsing. An acknowledgement is one subtask's part of
``_metadata``, and a reader refuses a ``_metadata`` over 16 MiB (``MAX_DOCUMENT_BYTES``), so a longer one
could never be committed. The number of JSON objects and arrays is bounded as ``_metadata``'s is
(``MAX_DOCUMENT_CONTAINERS``)."""

_MEANING = (
    "the worker runs a keystate version other than the driver's (install the same version on every node) "
    "or the message was corrupted on its way"
)
_FLAGS = ("finished_operators", "finished_on_restore", "incremental")
_DURATIONS = ("sync_duration_ms", "async_duration_ms", "alignment_duration_ms")
_FIELDS = ("keyed", "operator", *_FLAGS, "based_on", *_DURATIONS)
"""Every field of :class:`SubtaskSnapshot`, in its order (a new field there needs a new format version)."""


class AcknowledgementError(MetadataError):
    """A worker's acknowledgement of a checkpoint is not one this driver reads: too large, not JSON, of
    another format version, a field missing, unknown, of the wrong type or out of range, or a state handle
    in it invalid. It means a worker of another keystate version or a corrupted message; the checkpoint is
    declined (its files are not adopted) and the job goes on.

    Attributes:
        subtask: the acknowledging subtask (``"uid[index]"``).
        checkpoint_id: the checkpoint acknowledged.
    """

    def __init__(self, subtask: str, checkpoint_id: int, problem: str) -> None:
        self.subtask = subtask
        self.checkpoint_id = checkpoint_id
        super().__init__(f"acknowledgement of checkpoint {checkpoint_id} by {subtask}: {problem}; {_MEANING}")


def snapshot_to_json(snapshot: SubtaskSnapshot) -> str:
    """A task's acknowledgement as JSON text (handles in their public JSON form), the layout above."""
    body: dict[str, Any] = {
        "keyed": [{"handle": handle_to_json(h)} for h in snapshot.keyed],
        "operator": [{"handle": handle_to_json(h)} for h in snapshot.operator],
    }
    body.update({name: getattr(snapshot, name) for name in (*_FLAGS, "based_on", *_DURATIONS)})
    return json.dumps({"format_version": _VERSION, "snapshot": body}, separators=(",", ":"), allow_nan=False)


def snapshot_from_json(text: object, *, subtask: str, checkpoint_id: int) -> SubtaskSnapshot:
    """The acknowledgement :func:`snapshot_to_json` made, validated field by field and handle by handle.

    Args:
        text: the JSON text the worker sent.
        subtask: the acknowledging subtask, for messages.
        checkpoint_id: the checkpoint it acknowledges (``based_on`` must be older).

    Raises:
        AcknowledgementError: anything but an acknowledgement of format version 1 with valid fields and
            handles; the message names the subtask, the checkpoint, the field, what was expected and found.
    """
    return _Parser(subtask, checkpoint_id).parse(text)


def _shown(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


class _Parser:
    def __init__(self, subtask: str, checkpoint_id: int) -> None:
        self.subtask = subtask
        self.checkpoint_id = checkpoint_id

    def fail(self, problem: str, cause: BaseException | None = None) -> NoReturn:
        raise AcknowledgementError(self.subtask, self.checkpoint_id, problem) from cause

    def wrong(self, field: str, expected: str, found: object) -> NoReturn:
        self.fail(f"field {field!r} must be {expected}, found {_shown(found)}")

    def parse(self, text: object) -> SubtaskSnapshot:
        doc = self.load(text)
        if not isinstance(doc, dict):
            self.wrong("(document)", "a JSON object", doc)
        self.keys(doc, "(document)", ("format_version", "snapshot"))
        version = doc["format_version"]
        if version != _VERSION or isinstance(version, bool):
            self.wrong("format_version", f"{_VERSION} (the acknowledgement format this driver reads)", version)
        body = doc["snapshot"]
        if not isinstance(body, dict):
            self.wrong("snapshot", "an object", body)
        self.keys(body, "snapshot", _FIELDS)
        flags = {name: self.flag(body, name) for name in _FLAGS}
        durations = {name: self.count(body, name, body[name]) for name in _DURATIONS}
        based_on = body["based_on"]
        if based_on is not None:
            based_on = self.count(body, "based_on", based_on, "an integer id or null")
            if based_on >= self.checkpoint_id:
                self.wrong("based_on", f"an older checkpoint than {self.checkpoint_id}", based_on)
            if not flags["incremental"]:
                self.wrong("based_on", "null in a snapshot that is not incremental", based_on)
        keyed = self.handles(body, "keyed", KeyedStateHandle)
        operator = self.handles(body, "operator", OperatorStateHandle)
        if flags["finished_on_restore"] and (keyed or operator):
            self.wrong("finished_on_restore", "false in a snapshot with state (a task finished on restore has none)",
                       True)  # fmt: skip
        return SubtaskSnapshot(
            keyed=keyed,
            operator=operator,
            finished_operators=flags["finished_operators"],
            finished_on_restore=flags["finished_on_restore"],
            incremental=flags["incremental"],
            based_on=based_on,
            sync_duration_ms=durations["sync_duration_ms"],
            async_duration_ms=durations["async_duration_ms"],
            alignment_duration_ms=durations["alignment_duration_ms"],
        )

    def load(self, text: object) -> Any:
        if not isinstance(text, str):
            self.fail(f"expected JSON text, found {type(text).__name__}")
        if not text.strip():
            self.fail("the message is empty")
        if len(text) > MAX_ACKNOWLEDGEMENT_CHARS:
            self.fail(f"the message is {len(text)} characters, over the limit of {MAX_ACKNOWLEDGEMENT_CHARS}")
        containers = text.count("{") + text.count("[")
        if containers > MAX_DOCUMENT_CONTAINERS:
            self.fail(f"the message has {containers} JSON objects and arrays, over the limit of "
                      f"{MAX_DOCUMENT_CONTAINERS}")  # fmt: skip
        try:
            return decode_strict_json(text)
        except json.JSONDecodeError as exc:
            self.fail(f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}): truncated or garbled", exc)
        except (ValueError, RecursionError) as exc:  # NaN, a duplicate key, a 5,000-digit number, deep nesting
            self.fail(f"not valid JSON ({type(exc).__name__}: {exc})", exc)

    def keys(self, obj: dict[str, Any], where: str, fields: tuple[str, ...]) -> None:
        missing = [f for f in fields if f not in obj]
        if missing:
            self.fail(f"{where}: required field {missing[0]!r} is missing")
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            self.fail(f"{where}: unknown field {unknown[0]!r} (expected only: {', '.join(fields)})")

    def flag(self, body: dict[str, Any], name: str) -> bool:
        value = body[name]
        if not isinstance(value, bool):
            self.wrong(name, "true or false", value)
        return value

    def count(self, body: dict[str, Any], name: str, value: object, expected: str = "an integer") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong(name, expected, value)
        if not 0 <= value <= MAX_ID:
            self.wrong(name, f"an integer in 0..{MAX_ID}", value)
        return value

    def handles(self, body: dict[str, Any], name: str, cls: type[Any]) -> tuple[Any, ...]:
        items = body[name]
        if not isinstance(items, list):
            self.wrong(name, "an array", items)
        handles = []
        for i, item in enumerate(items):
            where = f"{name}[{i}]"
            if not isinstance(item, dict) or set(item) != {"handle"}:
                self.wrong(where, 'an object {"handle": <state handle in JSON form>}', item)
            try:
                handles.append(handle_from_json(item["handle"], cls, where=where))
            except MetadataError as exc:  # the handle's own validation (transfer.py), message naming the field
                self.fail(f"invalid state handle: {exc}", exc)
        return tuple(handles)


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
