"""Reading snapshots without a running job: decoded keyed and operator state entries (for the tools).

Nothing here deserializes with an unsafe serializer: callers decide, per the serializer names in the
snapshot, whether to decode bytes (``safe_serializer``) or show them raw. Composite keys are split
into key group, key, namespace and map user key as ``docs/format.md`` describes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from keystate.statebackend._snapshot import KeyedSnapshotReader, SnapshotMeta, StateMeta
from keystate.statebackend._states import split_frames
from keystate.statebackend.errors import StateRestoreError
from keystate.statebackend.state import StateKind
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.keygroups import KeyGroupRange
from keystate.storage.metadata import KeyedStateHandle, OperatorStateHandle

__all__ = ["KeyedEntry", "OperatorElement", "read_keyed_entries", "read_operator_elements", "snapshot_meta"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TS = struct.Struct(">q")


@dataclass(frozen=True, slots=True)
class KeyedEntry:
    """One stored keyed-state entry, split into its parts (bytes not yet deserialized)."""

    state: StateMeta
    key_group: int
    key: bytes
    namespace: bytes
    user_key: bytes | None
    """The serialized map key (map state only)."""
    values: tuple[bytes, ...]
    """The serialized value; for list state every element."""
    timestamps: tuple[int, ...]
    """Last-update times (ms) when the state has a TTL, one per value; empty otherwise."""


@dataclass(frozen=True, slots=True)
class OperatorElement:
    name: str
    mode: str
    serializer: str
    index: int
    value: bytes


def snapshot_meta(checkpoint: CompletedCheckpoint, handle: KeyedStateHandle, operator_uid: str) -> SnapshotMeta:
    """The meta section (key serializer, states) of one keyed handle."""
    return KeyedSnapshotReader(checkpoint, handle, operator_uid).meta()


def _split_key(raw: bytes, where: str) -> tuple[int, int, bytes, bytes, bytes]:
    """kg, sid, key, namespace, rest (the map user key) of a composite key."""
    try:
        kg, sid, klen = struct.unpack_from(">HHH", raw)
        key = raw[6 : 6 + klen]
        (nslen,) = _U16.unpack_from(raw, 6 + klen)
        ns = raw[8 + klen : 8 + klen + nslen]
        rest = raw[8 + klen + nslen :]
    except struct.error as exc:
        raise StateRestoreError(f"{where}: malformed composite key of {len(raw)} bytes") from exc
    if len(key) != klen or len(ns) != nslen:
        raise StateRestoreError(f"{where}: composite key of {len(raw)} bytes is truncated")
    return kg, sid, key, ns, rest


def read_keyed_entries(
    checkpoint: CompletedCheckpoint,
    handle: KeyedStateHandle,
    operator_uid: str,
    *,
    key_groups: KeyGroupRange | None = None,
    state_name: str | None = None,
) -> Iterator[KeyedEntry]:
    """Every entry of a keyed handle (optionally only some key groups or one state), in key order.

    Raises:
        StateRestoreError: the state file or an entry is damaged.
    """
    reader = KeyedSnapshotReader(checkpoint, handle, operator_uid)
    states = {s.sid: s for s in reader.meta().states}
    where = f"operator {operator_uid!r}: {handle.stream.describe}"
    for raw_key, value in reader.entries(key_groups or handle.key_groups):
        kg, sid, key, ns, rest = _split_key(raw_key, where)
        state = states[sid]
        if state_name is not None and state.name != state_name:
            continue
        ttl = state.ttl is not None
        if state.kind is StateKind.LIST:
            try:
                frames = split_frames(value, ttl)
            except Exception as exc:
                raise StateRestoreError(f"{where}: key group {kg}: list state {state.name!r}: {exc}") from exc
            values = tuple(p for _, p in frames)
            stamps = tuple(t for t, _ in frames) if ttl else ()
        elif ttl:
            if len(value) < _TS.size:
                raise StateRestoreError(f"{where}: key group {kg}: state {state.name!r} value lacks its TTL header")
            values, stamps = (value[_TS.size :],), (_TS.unpack_from(value)[0],)
        else:
            values, stamps = (value,), ()
        user_key = rest if state.kind is StateKind.MAP else None
        yield KeyedEntry(state, kg, key, ns, user_key, values, stamps)


def read_operator_elements(checkpoint: CompletedCheckpoint, handle: OperatorStateHandle) -> Iterator[OperatorElement]:
    """Every element of an operator-state handle, by state name and position.

    Raises:
        StateRestoreError: the state file is damaged or an offset does not point at an element.
    """
    reader = checkpoint.open_state(handle.stream)
    data = reader.read_all()
    for entry in handle.states:
        for i, offset in enumerate(entry.offsets):
            if offset + _U32.size > len(data):
                raise StateRestoreError(f"{reader.name}: state {entry.name!r} element offset {offset} is past the end")
            (n,) = _U32.unpack_from(data, offset)
            if offset + _U32.size + n > len(data):
                raise StateRestoreError(f"{reader.name}: state {entry.name!r} element at {offset} runs past the end")
            value = data[offset + _U32.size : offset + _U32.size + n]
            yield OperatorElement(entry.name, entry.mode.value, entry.serializer, i, value)
