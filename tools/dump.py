"""``keystate dump``: decoded keyed and operator state as JSON-ready records, without a running job.

Values are decoded only with serializers that are safe on untrusted bytes (``safe_serializer``);
anything else (e.g. ``pickle``) is shown as base64 with the serializer's name, unless the caller
passes ``unsafe=True`` (the CLI's explicit ``--unsafe-unpickle``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

from keystate.statebackend.inspection import read_keyed_entries, read_operator_elements, snapshot_meta
from keystate.statebackend.serializers import PickleSerializer, Serializer, safe_serializer
from keystate.statebackend.state import StateKind
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.tools.errors import UsageError

__all__ = ["decode_value", "dump_state"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return {"repr": repr(value)}


def _serializer(name: str, unsafe: bool) -> Serializer[Any] | None:
    found = safe_serializer(name)
    if found is None and unsafe and name == PickleSerializer.name:
        return PickleSerializer()
    return found


def decode_value(data: bytes, serializer: str, *, unsafe: bool = False) -> Any:
    """A JSON-ready view of stored bytes: decoded if the serializer is safe (or ``unsafe``), else
    ``{"serializer": name, "base64": ...}``."""
    ser = _serializer(serializer, unsafe)
    if ser is None:
        return {"serializer": serializer, "base64": base64.b64encode(data).decode("ascii")}
    try:
        decoded = ser.deserialize(data)
    except KeystateError as exc:
        return {"serializer": serializer, "base64": base64.b64encode(data).decode("ascii"), "error": str(exc)}
    try:
        # Hostile bytes can decode to what JSON text cannot hold: Infinity, a lone surrogate, an int of
        # more digits than Python prints, nesting deeper than the encoder goes. Such a value is shown
        # raw, like an undecodable one.
        value = _jsonable(decoded)
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        error = f"decoded value is not representable as JSON ({exc})"
        return {"serializer": serializer, "base64": base64.b64encode(data).decode("ascii"), "error": error}
    return value


def dump_state(
    checkpoint: CompletedCheckpoint,
    operator_uid: str,
    *,
    state: str | None = None,
    key_group: int | None = None,
    unsafe: bool = False,
) -> Iterator[dict[str, Any]]:
    """One record per keyed entry and per operator-state element of an operator.

    Raises:
        UsageError: no such operator, or a key group outside its max parallelism.
        StateRestoreError, StateFileError: the state is damaged.
        CheckpointDiscardedError: the checkpoint was discarded (by retention) while it was read.
    """
    try:
        yield from _dump_state(checkpoint, operator_uid, state=state, key_group=key_group, unsafe=unsafe)
    except KeystateError as exc:
        if not isinstance(exc, UsageError):
            checkpoint.raise_if_discarded(exc)
        raise


def _dump_state(
    checkpoint: CompletedCheckpoint,
    operator_uid: str,
    *,
    state: str | None,
    key_group: int | None,
    unsafe: bool,
) -> Iterator[dict[str, Any]]:
    op = checkpoint.metadata.operator(operator_uid)
    if op is None:
        known = ", ".join(repr(o.uid) for o in checkpoint.metadata.operators)
        raise UsageError(f"checkpoint {checkpoint.checkpoint_id} has no operator {operator_uid!r} (it has {known})")
    if key_group is not None and not 0 <= key_group < op.max_parallelism:
        raise UsageError(
            f"key group {key_group} is outside operator {operator_uid!r}'s key groups 0..{op.max_parallelism - 1}"
        )
    if state is not None:
        # A mistyped name would print nothing and exit 0, like a state without entries: refuse it.
        names = {e.name for st in op.subtasks for h in st.operator for e in h.states}
        names |= {s.name for st in op.subtasks for h in st.keyed for s in snapshot_meta(checkpoint, h, op.uid).states}
        if names and state not in names:
            raise UsageError(
                f"operator {operator_uid!r} has no state {state!r} in checkpoint {checkpoint.checkpoint_id} "
                f"(it has {', '.join(sorted(map(repr, names)))})"
            )
    wanted = None if key_group is None else KeyGroupRange(key_group, key_group)
    for st in op.subtasks:
        for handle in st.keyed:
            if wanted is not None and not handle.key_groups.intersection(wanted):
                continue
            key_serializer: str | None = None
            for entry in read_keyed_entries(checkpoint, handle, op.uid, key_groups=wanted, state_name=state):
                if key_serializer is None:
                    key_serializer = snapshot_meta(checkpoint, handle, op.uid).key_serializer
                meta = entry.state
                record: dict[str, Any] = {
                    "operator": op.uid,
                    "subtask": st.index,
                    "state": meta.name,
                    "kind": meta.kind.value,
                    "key_group": entry.key_group,
                    "key": decode_value(entry.key, key_serializer, unsafe=unsafe),
                }
                if entry.namespace:
                    record["namespace"] = {"base64": base64.b64encode(entry.namespace).decode("ascii")}
                if entry.user_key is not None:
                    record["user_key"] = decode_value(entry.user_key, meta.user_key_serializer or "", unsafe=unsafe)
                values = [decode_value(v, meta.serializer, unsafe=unsafe) for v in entry.values]
                record["value"] = values if meta.kind is StateKind.LIST else values[0]
                if entry.timestamps:
                    record["ttl_timestamps"] = list(entry.timestamps)
                yield record
        if key_group is not None:
            continue
        for op_handle in st.operator:
            for element in read_operator_elements(checkpoint, op_handle):
                if state is not None and element.name != state:
                    continue
                yield {
                    "operator": op.uid,
                    "subtask": st.index,
                    "state": element.name,
                    "mode": element.mode,
                    "index": element.index,
                    "value": decode_value(element.value, element.serializer, unsafe=unsafe),
                }
