"""Reading snapshots without a running job: decoded keyed and operator state entries (for the tools).

Nothing here deserializes with an unsafe serializer: callers decide, per the serializer names in the
snapshot, whether to decode bytes (``safe_serializer``) or show them raw. Composite keys are split
into key group, key, namespace and map user key as ``docs/format.md`` describes.

The framing is decoded by the restore's own decoders (``KeyedSnapshotReader`` and ``_delta.ChainReader``,
``operator_state.stream_elements``), so what reads here restores, and :func:`check_keyed_handle` /
:func:`check_operator_handle` (``keystate verify``) refuse whatever a restore would refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from keystate.statebackend._delta import ChainReader
from keystate.statebackend._entry_format import split_frames
from keystate.statebackend._snapshot import SnapshotMeta, StateMeta
from keystate.statebackend.errors import StateMigrationError, StateRestoreError
from keystate.statebackend.keygroups import KEY_GROUP_HASH
from keystate.statebackend.operator_state import stream_elements
from keystate.statebackend.state import StateKind
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle

__all__ = [
    "KeyedEntry",
    "OperatorElement",
    "check_keyed_handle",
    "check_operator_handle",
    "read_keyed_entries",
    "read_operator_elements",
    "snapshot_meta",
]

_U16 = struct.Struct(">H")
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
    """The meta section (key serializer, states) of one keyed handle; of an incremental handle, every state of
    its base and deltas."""
    return ChainReader(checkpoint, handle, operator_uid).meta()


def _split_key(raw: bytes, where: str) -> tuple[int, int, bytes, bytes, bytes]:
    """kg, sid, key, namespace, rest (the map user key) of a composite key."""
    try:
        kg, sid, klen = struct.unpack_from(">HHH", raw)
    except struct.error as exc:
        raise StateRestoreError(f"{where}: malformed composite key of {len(raw)} bytes") from exc
    key = raw[6 : 6 + klen]
    if len(raw) < 8 + klen:
        raise StateRestoreError(
            f"{where}: composite key of {len(raw)} bytes is truncated: its key length field says {klen} bytes, "
            "leaving no room for the namespace length"
        )
    (nslen,) = _U16.unpack_from(raw, 6 + klen)
    ns = raw[8 + klen : 8 + klen + nslen]
    if len(ns) != nslen:
        raise StateRestoreError(
            f"{where}: composite key of {len(raw)} bytes is truncated: its namespace length field says {nslen} "
            f"bytes, {len(ns)} follow"
        )
    return kg, sid, key, ns, raw[8 + klen + nslen :]


def read_keyed_entries(
    checkpoint: CompletedCheckpoint,
    handle: KeyedStateHandle,
    operator_uid: str,
    *,
    key_groups: KeyGroupRange | None = None,
    state_name: str | None = None,
) -> Iterator[KeyedEntry]:
    """Every entry of a keyed handle (optionally only some key groups or one state), in key order; of an
    incremental handle, the merged state: its base with its deltas applied, as a restore loads it.

    Raises:
        StateRestoreError: a state file or an entry is damaged.
    """
    reader = ChainReader(checkpoint, handle, operator_uid)
    yield from _entries(reader, handle, operator_uid, key_groups or handle.key_groups, state_name)


def _entries(
    reader: ChainReader,
    handle: KeyedStateHandle,
    operator_uid: str,
    key_groups: KeyGroupRange,
    state_name: str | None,
) -> Iterator[KeyedEntry]:
    states = {s.sid: s for s in reader.meta().states}
    for raw_key, value in (entry for _, chunk in reader.chunks(key_groups) for entry in chunk):
        kg = _U16.unpack_from(raw_key)[0]  # the reader checked it: the key group whose data this is
        where = (
            f"operator {operator_uid!r}: {handle.stream.describe}: key group {kg} (its data starts at file "
            f"offset {handle.offsets[kg - handle.key_groups.start]})"
        )
        kg, sid, key, ns, rest = _split_key(raw_key, where)
        state = states[sid]
        if rest and state.kind is not StateKind.MAP:
            raise StateRestoreError(
                f"{where}: an entry of {state.kind.value} state {state.name!r} has {len(rest)} bytes after its "
                "namespace; only map state keys go on (with the user key)"
            )
        if state_name is not None and state.name != state_name:
            continue
        ttl = state.ttl is not None
        if state.kind is StateKind.LIST:
            try:
                frames = split_frames(value, ttl)
            except Exception as exc:
                raise StateRestoreError(f"{where}: list state {state.name!r}: {exc}") from exc
            values = tuple(p for _, p in frames)
            stamps = tuple(t for t, _ in frames) if ttl else ()
        elif ttl:
            if len(value) < _TS.size:
                raise StateRestoreError(f"{where}: state {state.name!r} value lacks its TTL header")
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
    counts = [0] * len(handle.states)
    for index, value in stream_elements(reader, handle, f"state file {reader.name}"):
        entry = handle.states[index]
        yield OperatorElement(entry.name, entry.mode.value, entry.serializer, counts[index], value)
        counts[index] += 1


def check_keyed_handle(checkpoint: CompletedCheckpoint, handle: KeyedStateHandle, operator_uid: str) -> int:
    """Decode one keyed handle completely, as a restore of all its key groups would, deserializing nothing.

    An incremental handle is read whole: its base and every delta (headers, changes, tombstones),
    merged. The meta section and every key group's entries go through the restore's own decoders
    (offsets, entry framing, key groups, state ids, TTL headers); then every composite key and
    every stored value is split as the states read them (key and namespace lengths, list frames). Only
    what a snapshot carries is checked, not what depends on the job restoring it (its max parallelism, its
    key serializer).

    Returns:
        How many entries the handle holds (merged: after its deltas).

    Raises:
        StateRestoreError: the handle's bytes are damaged; the message names the state file, the key
            group (with the file offset where its data starts) and what is wrong.
        StateMigrationError: the snapshot uses a key-group hash this keystate cannot read.
        StateFileError: a block of the state file is damaged.
    """
    reader = ChainReader(checkpoint, handle, operator_uid)
    meta = reader.meta()
    if meta.key_group_hash != KEY_GROUP_HASH:
        raise StateMigrationError(
            f"operator {operator_uid!r}: {handle.stream.describe} was written with key-group hash "
            f"{meta.key_group_hash!r}; this keystate uses {KEY_GROUP_HASH!r}"
        )
    count = 0
    for _ in _entries(reader, handle, operator_uid, handle.key_groups, None):
        count += 1
    return count


def check_operator_handle(checkpoint: CompletedCheckpoint, handle: OperatorStateHandle, operator_uid: str) -> int:
    """Read one operator-state handle fully (sizes and checksums) and decode every element's framing
    with the restore's decoder, deserializing nothing.

    Returns:
        How many elements the handle holds.

    Raises:
        StateFileError: the state file is damaged (size, checksum, truncation).
        StateRestoreError: an element offset lies past the end of the stream, or an element runs past it.
    """
    reader = checkpoint.open_state(handle.stream)
    where = f"operator {operator_uid!r}: state file {reader.name}"
    return sum(1 for _ in stream_elements(reader, handle, where))
