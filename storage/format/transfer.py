"""JSON forms of state handles and subtask states, for shipping them between processes.

A runtime that snapshots on many workers and commits ``_metadata`` on one coordinator ships each
worker's handles to the coordinator (and, on restore, the coordinator's assignment back to the
workers). These functions turn the frozen metadata classes into JSON-safe dicts (only ``str``,
``int``, ``bool``, ``None``, ``list`` and ``dict``: send them as JSON text, through a queue, an
HTTP body, anything) and back. No pickle: a received form is untrusted input and is validated
field by field by the very parsers that read ``_metadata``, with the same bounds, the same
invariants and the same errors, whose messages name the field (``"worker 1.keyed[0].stream: field
'size' must be an integer, found '12'"``).

Layout: a form is the object ``_metadata`` holds at that place (``docs/format.md``) plus two keys::

    {"format_version": 2, "handle": "keyed", "key_groups": [0, 63], "offsets": [...], "stream": {...},
     "deltas": [...]}
    {"format_version": 2, "index": 0, "keyed": [...], "operator": [...]}    # or "finished": true

Version 2 (``_metadata`` version 2) adds ``written_by`` to shared stream handles and ``deltas`` to keyed
handles; forms of version 1 are still read (a version-1 form has neither, so no incremental handle).

``format_version`` is the ``_metadata`` format version whose layout the form follows; it is popped
and dispatched per version like ``_metadata``'s, so a coordinator reads the forms of workers that
run an older keystate, and one that is unknown or newer fails with
:class:`~keystate.storage.errors.UnsupportedMetadataVersionError`. ``handle`` says which of the
three handle classes the rest describes: ``"stream"`` (:class:`StreamHandle`), ``"keyed"``
(:class:`KeyedStateHandle`) or ``"operator"`` (:class:`OperatorStateHandle`).

What may cross a process boundary:

* these JSON forms;
* ``_metadata`` itself as bytes (:func:`~keystate.storage.format.dump_metadata` /
  :func:`~keystate.storage.format.parse_metadata`), and plain values: a storage location string, a job id,
  a checkpoint id, a checkpoint directory (``CompletedCheckpoint.directory``), and key-group ranges
  as ``[start, end]`` or as the ``(max_parallelism, parallelism, index)`` they are computed from
  (:func:`~keystate.storage.format.keygroups.key_group_range_for_subtask`).

What may not: checkpoint writers, state output streams, object stores, checkpoint storage,
completed checkpoints, state backends and their snapshots. They hold connections, threads, locks,
open files or LMDB environments; every process opens its own (``open_storage`` then
``begin_checkpoint`` or ``load``). Do not pickle the metadata classes either: a pickle is neither
versioned nor validated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar, overload

from keystate.storage.errors import MetadataError, UnsupportedMetadataVersionError
from keystate.storage.format._metadata_v1 import HANDLE_KINDS, parse_handle_v1, parse_subtask_v1
from keystate.storage.format._metadata_v2 import dump_handle_v2, dump_subtask_v2, parse_handle_v2, parse_subtask_v2
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle, StreamHandle, SubtaskState

__all__ = [
    "SUPPORTED_TRANSFER_VERSIONS",
    "StateHandle",
    "handle_from_json",
    "handle_to_json",
    "subtask_state_from_json",
    "subtask_state_to_json",
]

StateHandle: TypeAlias = StreamHandle | KeyedStateHandle | OperatorStateHandle
"""A reference from metadata to stored bytes: a state file, or one with keyed or operator state in it."""

H = TypeVar("H", StreamHandle, KeyedStateHandle, OperatorStateHandle)

_HANDLE_PARSERS: dict[int, Callable[[dict[str, Any], str, tuple[str, ...]], StateHandle]] = {
    1: parse_handle_v1,
    2: parse_handle_v2,
}
_SUBTASK_PARSERS: dict[int, Callable[[dict[str, Any], str], SubtaskState]] = {
    1: parse_subtask_v1,
    2: parse_subtask_v2,
}
SUPPORTED_TRANSFER_VERSIONS = tuple(sorted(_HANDLE_PARSERS))
"""The ``format_version`` values the ``*_from_json`` functions read; ``*_to_json`` write the newest."""
_NEWEST = 2  # what dump_handle_v2 and dump_subtask_v2 write: a version 3 replaces all three together


def _open_form(obj: object, what: str, where: str, supported: dict[int, Any]) -> tuple[dict[str, Any], Any]:
    """A copy of the form without ``format_version``, and that version's parser."""
    if not isinstance(obj, dict):
        raise MetadataError(f"{where}: a {what} in JSON form must be an object, found {type(obj).__name__}")
    doc = dict(obj)  # the caller's dict is left as it was
    if "format_version" not in doc:
        raise MetadataError(
            f"{where}: required field 'format_version' is missing; this is not a {what} in keystate's JSON form"
        )
    version = doc.pop("format_version")
    parser = supported.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if parser is None:
        raise UnsupportedMetadataVersionError(what, version, SUPPORTED_TRANSFER_VERSIONS, where)
    return doc, parser


def handle_to_json(handle: StateHandle) -> dict[str, Any]:
    """The JSON form of a state handle, in the newest format version.

    Args:
        handle: a :class:`StreamHandle`, :class:`KeyedStateHandle` or :class:`OperatorStateHandle`.

    Returns:
        A dict of only ``str``, ``int``, ``bool``, ``None``, ``list`` and ``dict`` (``json.dumps`` it
        as it is); :func:`handle_from_json` turns it back into an equal handle.

    Raises:
        TypeError: ``handle`` is not one of the three handle classes.
        MetadataError: a shared stream in it has no ``written_by`` (version 2 requires it).
    """
    return {"format_version": _NEWEST, **dump_handle_v2(handle)}


@overload
def handle_from_json(obj: object, *, where: str = ...) -> StateHandle: ...
@overload
def handle_from_json(obj: object, expected: type[H], *, where: str = ...) -> H: ...
def handle_from_json(
    obj: object,
    expected: type[Any] | None = None,
    *,
    where: str = "state handle",
) -> StateHandle:
    """Parse and validate the JSON form of a state handle (from :func:`handle_to_json`).

    Args:
        obj: the decoded JSON form (a dict); it is not modified.
        expected: the handle class the caller needs (e.g. ``KeyedStateHandle``); a form of another
            kind is then an error naming the field ``handle``. ``None`` accepts all three.
        where: names the form in error messages (e.g. ``"worker 3, checkpoint 12"``).

    Returns:
        A handle equal to the one serialized, checked by the same invariants as one read from
        ``_metadata``.

    Raises:
        MetadataError: the form is not an object, or a field is missing, unknown, of the wrong type,
            out of range or inconsistent; the message names the field.
        UnsupportedMetadataVersionError: ``format_version`` is unknown or newer than this keystate reads.
        UnsafePathError: the handle's path is absolute or leaves the checkpoint directory.
    """
    doc, parser = _open_form(obj, "state handle", where, _HANDLE_PARSERS)
    kinds = tuple(kind for kind, cls in HANDLE_KINDS.items() if expected is None or cls is expected)
    if not kinds:
        raise TypeError(f"expected must be StreamHandle, KeyedStateHandle or OperatorStateHandle, not {expected!r}")
    handle: StateHandle = parser(doc, where, kinds)
    return handle


def subtask_state_to_json(state: SubtaskState) -> dict[str, Any]:
    """The JSON form of one subtask's state (its handles, or its FLIP-147 finished marker).

    Returns:
        A dict of only ``str``, ``int``, ``bool``, ``None``, ``list`` and ``dict``;
        :func:`subtask_state_from_json` turns it back into an equal :class:`SubtaskState`.
    """
    return {"format_version": _NEWEST, **dump_subtask_v2(state)}


def subtask_state_from_json(obj: object, *, where: str = "subtask state") -> SubtaskState:
    """Parse and validate the JSON form of a subtask state (from :func:`subtask_state_to_json`).

    Args:
        obj: the decoded JSON form (a dict); it is not modified.
        where: names the form in error messages (e.g. ``"worker 3, checkpoint 12"``).

    Raises:
        MetadataError: the form is not an object, or a field is missing, unknown, of the wrong type,
            out of range or inconsistent (a finished marker with state, a keyed handle whose offsets
            do not match its key groups, ...); the message names the field.
        UnsupportedMetadataVersionError: ``format_version`` is unknown or newer than this keystate reads.
        UnsafePathError: a handle's path is absolute or leaves the checkpoint directory.
    """
    doc, parser = _open_form(obj, "subtask state", where, _SUBTASK_PARSERS)
    state: SubtaskState = parser(doc, where)
    return state
