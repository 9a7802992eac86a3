"""The keyed snapshot payload: backend-neutral, so LMDB state restores into the heap and vice versa.

Inside a state file (``keystate.storage.format.statefile``), the raw payload of a keyed snapshot is::

    >I meta length | meta (UTF-8 JSON)             -- the blocks before offsets[0]
    per key group g of the handle's range, starting at offsets[g - start] (a block boundary):
        entries, each: >H key length | key | >I value length | value

``key`` is the full composite key (it starts with ``>H g``, so every entry proves its key group) and
``value`` the stored value, exactly as the engines hold them (``keystate.statebackend._entry_format``).
The meta JSON names the key serializer, the key-group hash, the max parallelism (format 2; key groups are
numbered modulo it) and every state: id, name, kind, serializers, TTL (docs/format.md, section 3.9).
:mod:`keystate.statebackend._snapshot_reader` reads it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from keystate.statebackend._entry_format import ttl_filter
from keystate.statebackend._kv import KVSnapshot
from keystate.statebackend.errors import StateError, StateRestoreError, StateSnapshotError
from keystate.statebackend.state import StateKind
from keystate.statebackend.ttl import StateVisibility, TtlConfig, TtlUpdate
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, KeyGroupRange
from keystate.storage.format.metadata import HandleScope, KeyedStateHandle
from keystate.storage.format.validation import check_keys, loads_strict, opt_int, req_bool, req_int, req_list, req_str

__all__ = ["SnapshotMeta", "StateMeta", "write_keyed_snapshot"]

SNAPSHOT_FORMAT_VERSION = 2
"""The meta version written when the max parallelism is known (version 1 is written without it)."""
_META_KEYS = {
    1: ("format_version", "key_serializer", "key_group_hash", "states"),
    2: ("format_version", "key_serializer", "key_group_hash", "max_parallelism", "states"),
}
"""The fields of each meta version, in the order they are written (all required)."""
_META_LEN = struct.Struct(">I")  # >I length of the meta JSON that follows
_KEY_LEN = struct.Struct(">H")  # >H composite key length | key
_VALUE_LEN = struct.Struct(">I")  # >I value length | value
MAX_SNAPSHOT_META = 1 << 20
"""The most bytes of a keyed snapshot's meta JSON (a few thousand states): a writer refuses to write
more and a reader to read more, so parsing it stays small (docs/format.md, keyed snapshots)."""
_PARSE_SLAB = 1 << 20
"""Key-group data is parsed about this many bytes at a time (the default block size)."""
_MIN_KEY = 8
"""The shortest composite key: key group, state id, key length and namespace length (>H each)."""
_TTL_HEADER = 8
"""Bytes of the expiry timestamp before each value of a state with TTL."""


@dataclass(frozen=True, slots=True)
class StateMeta:
    """One registered state as recorded in a snapshot."""

    sid: int
    name: str
    kind: StateKind
    serializer: str
    user_key_serializer: str | None = None
    ttl: TtlConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.sid,
            "name": self.name,
            "kind": self.kind.value,
            "serializer": self.serializer,
            "user_key_serializer": self.user_key_serializer,
            "ttl": None if self.ttl is None else self.ttl.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: object, where: str) -> StateMeta:
        if not isinstance(raw, dict):
            raise StateRestoreError(f"{where}: a state entry must be an object")
        check_keys(
            raw, where, ("id", "name", "kind", "serializer", "user_key_serializer", "ttl"), error=StateRestoreError
        )
        sid = req_int(raw, "id", where, StateRestoreError, min_value=1, max_value=0xFFFF)
        name = req_str(raw, "name", where, StateRestoreError, max_len=1024, min_len=1)
        kind = StateKind(req_str(raw, "kind", where, StateRestoreError, choices=[k.value for k in StateKind]))
        serializer = req_str(raw, "serializer", where, StateRestoreError, max_len=256)
        uks = raw["user_key_serializer"]
        if uks is not None and not isinstance(uks, str):
            raise StateRestoreError(f"{where}: field 'user_key_serializer' must be a string or null")
        if (kind is StateKind.MAP) != (uks is not None):
            raise StateRestoreError(f"{where}: 'user_key_serializer' is set exactly for map states")
        ttl = None
        if raw["ttl"] is not None:
            t = raw["ttl"]
            w = f"{where}.ttl"
            if not isinstance(t, dict):
                raise StateRestoreError(f"{w}: must be an object or null")
            check_keys(t, w, ("ttl_ms", "update", "visibility", "cleanup_in_snapshot"), error=StateRestoreError)
            ttl = TtlConfig(
                req_int(t, "ttl_ms", w, StateRestoreError, min_value=1),
                TtlUpdate(req_str(t, "update", w, StateRestoreError, choices=[u.value for u in TtlUpdate])),
                StateVisibility(
                    req_str(t, "visibility", w, StateRestoreError, choices=[v.value for v in StateVisibility])
                ),
                req_bool(t, "cleanup_in_snapshot", w, StateRestoreError),
            )
        return cls(sid, name, kind, serializer, uks, ttl)


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """The meta section of a keyed snapshot."""

    key_serializer: str
    key_group_hash: str
    states: tuple[StateMeta, ...]
    max_parallelism: int | None = None
    """The writer's max parallelism (1..32768), which numbers its key groups; ``None``: not recorded (a
    format-1 meta, written by keystate 0.2 or by a backend that did not pass it)."""

    def to_json_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format_version": 1 if self.max_parallelism is None else SNAPSHOT_FORMAT_VERSION,
            "key_serializer": self.key_serializer,
            "key_group_hash": self.key_group_hash,
        }
        if self.max_parallelism is not None:
            doc["max_parallelism"] = self.max_parallelism
        doc["states"] = [s.to_dict() for s in self.states]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> SnapshotMeta:
        doc = loads_strict(data, where, StateRestoreError)
        if not isinstance(doc, dict):
            raise StateRestoreError(f"{where}: snapshot meta must be a JSON object")
        version = opt_int(doc, "format_version", where, StateRestoreError)
        if version not in _META_KEYS:
            raise StateRestoreError(
                f"{where}: keyed snapshot format_version {version} is not supported (this keystate reads "
                f"{' and '.join(map(str, _META_KEYS))}); upgrade keystate"
            )
        check_keys(doc, where, _META_KEYS[version], error=StateRestoreError)
        max_parallelism = None
        if version >= 2:
            max_parallelism = req_int(
                doc, "max_parallelism", where, StateRestoreError, min_value=1, max_value=UPPER_BOUND_MAX_PARALLELISM
            )
        states = tuple(
            StateMeta.from_dict(s, f"{where}: states[{i}]")
            for i, s in enumerate(req_list(doc, "states", where, StateRestoreError))
        )
        if len({s.sid for s in states}) != len(states) or len({s.name for s in states}) != len(states):
            raise StateRestoreError(f"{where}: state ids and names must be unique")
        return cls(
            req_str(doc, "key_serializer", where, StateRestoreError, max_len=256),
            req_str(doc, "key_group_hash", where, StateRestoreError, max_len=64),
            states,
            max_parallelism,
        )


class _Prefixes(dict[int, bytes]):
    """Length prefixes by length, packed on first use (the common lengths are few)."""

    def __init__(self, fmt: struct.Struct) -> None:
        super().__init__()
        self._pack = fmt.pack

    def __missing__(self, n: int) -> bytes:
        packed: bytes = self._pack(n)
        if n < 1 << 16:  # keep the table small whatever the values
            self[n] = packed
        return packed


_KEY_PREFIXES = _Prefixes(_KEY_LEN)
_VALUE_PREFIXES = _Prefixes(_VALUE_LEN)


_UNIFORM_BATCH = 128
"""Entries one compiled struct packs at a time when every key and every value of a chunk have one length."""
_UNIFORM_MIN = 2 * _UNIFORM_BATCH
"""Chunks shorter than this take the general path (checking the lengths would cost more than it saves)."""


class _UniformPackers(dict[tuple[int, int], struct.Struct]):
    """By (key length, value length): a struct that writes :data:`_UNIFORM_BATCH` entries with their length
    fields left zero (``2x`` / ``4x`` pads), filled in afterwards one byte column at a time."""

    def __missing__(self, lengths: tuple[int, int]) -> struct.Struct:
        key_len, value_len = lengths
        packer = struct.Struct(">" + f"2x{key_len}s4x{value_len}s" * _UNIFORM_BATCH)
        if len(self) < 64:
            self[lengths] = packer
        return packer


_UNIFORM_PACKERS = _UniformPackers()


def _encode(keys: list[bytes], values: list[bytes]) -> bytes | bytearray:
    """Entries as in the payload: ``>H key length | key | >I value length | value`` each, in C loops."""
    n = len(keys)
    if n >= _UNIFORM_MIN:
        kl, vl = len(keys[0]), len(values[0])
        # Exact lengths matter: struct's ``s`` pads a shorter bytes object and truncates a longer one.
        if list(map(len, keys)).count(kl) == n and list(map(len, values)).count(vl) == n:
            try:
                return _encode_uniform(keys, values, kl, vl)
            except struct.error:  # not bytes (an engine's memoryview, say): the join takes any buffer
                pass
    return _encode_general(keys, values)


def _encode_uniform(keys: list[bytes], values: list[bytes], kl: int, vl: int) -> bytearray:
    """:func:`_encode` of entries whose keys all have ``kl`` bytes and values ``vl``: a compiled struct
    packs :data:`_UNIFORM_BATCH` entries per call with zero length fields, then the length bytes are set
    with one strided slice assignment per non-zero byte (no Python step, and no object, per entry)."""
    n = len(keys)
    step = 6 + kl + vl
    out = bytearray(n * step)
    args: list[bytes] = [b""] * (2 * n)
    args[0::2] = keys
    args[1::2] = values
    packer = _UNIFORM_PACKERS[kl, vl]
    pack = packer.pack_into
    batch = 2 * _UNIFORM_BATCH
    full = n - n % _UNIFORM_BATCH
    for i in range(0, 2 * full, batch):
        pack(out, i // 2 * step, *args[i : i + batch])
    if full < n:  # the last entries, packed as a full batch padded with empty (zero-filled) ones
        tail = bytearray(packer.size)
        pack(tail, 0, *args[2 * full :], *([b""] * (batch - 2 * (n - full))))
        out[full * step :] = memoryview(tail)[: (n - full) * step]
    for at, byte in enumerate(_KEY_LEN.pack(kl)):
        if byte:
            out[at::step] = bytes((byte,)) * n
    for at, byte in enumerate(_VALUE_LEN.pack(vl), 2 + kl):
        if byte:
            out[at::step] = bytes((byte,)) * n
    return out


def _encode_general(keys: list[bytes], values: list[bytes]) -> bytes:
    """:func:`_encode` of entries of any lengths: four parts per entry and one join."""
    parts: list[bytes] = [b""] * (4 * len(keys))
    parts[0::4] = map(_KEY_PREFIXES.__getitem__, map(len, keys))
    parts[1::4] = keys
    parts[2::4] = map(_VALUE_PREFIXES.__getitem__, map(len, values))
    parts[3::4] = values
    return b"".join(parts)


def _encode_filtered(
    keys: list[bytes], values: list[bytes], filters: dict[bytes, StateMeta], now: int
) -> tuple[bytes, int]:
    """Like :func:`_encode`, leaving out what TTL cleanup drops; also returns how many entries are kept."""
    kl, vl = _KEY_PREFIXES, _VALUE_PREFIXES
    parts: list[bytes] = []
    extend = parts.extend
    kept = 0
    for key, value in zip(keys, values, strict=True):
        state = filters.get(key[2:4])
        if state is not None:
            assert state.ttl is not None
            live = ttl_filter(state.kind, state.ttl, now, value)
            if live is None:
                continue
            value = live
        extend((kl[len(key)], key, vl[len(value)], value))
        kept += 1
    return b"".join(parts), kept


def write_keyed_snapshot(
    writer: CheckpointWriter,
    hint: str,
    view: KVSnapshot,
    key_groups: KeyGroupRange,
    meta: SnapshotMeta,
    now: int,
    *,
    scope: HandleScope = HandleScope.EXCLUSIVE,
) -> KeyedStateHandle | None:
    """Stream one keyed snapshot into a state file; ``None`` (and nothing written) if it has no entries.

    ``scope``: where the file goes (``HandleScope.SHARED``: the job's ``shared/`` directory, for the base of
    an incremental chain that later checkpoints reference)."""
    filters = {
        _KEY_LEN.pack(s.sid): s for s in meta.states if s.ttl is not None and s.ttl.cleanup_in_snapshot
    }  # keyed by the 2-byte state id as it appears in composite keys
    entries = 0
    meta_bytes = meta.to_json_bytes()
    if len(meta_bytes) > MAX_SNAPSHOT_META:
        raise StateSnapshotError(
            f"{hint}: the snapshot meta of {len(meta.states)} states is {len(meta_bytes)} bytes, over the "
            f"{MAX_SNAPSHOT_META}-byte limit a restore reads; register fewer states or use shorter names"
        )
    with writer.open_stream(hint, scope) as stream:
        stream.compress_in_background()
        stream.write(_META_LEN.pack(len(meta_bytes)) + meta_bytes)
        # Block numbers, not offsets: the offsets are known once compression (maybe on a helper
        # thread) has caught up, and waiting for it at every key group would undo the overlap.
        marks: list[int] = []
        for kg, keys, values in view.iter_chunks(key_groups):
            if not len(marks) - 1 <= kg - key_groups.start < len(key_groups):
                raise StateError(f"engine returned key group {kg} out of order or outside {key_groups}")
            while len(marks) <= kg - key_groups.start:
                marks.append(stream.mark_block())
            data: bytes | bytearray
            if filters:
                data, kept = _encode_filtered(keys, values, filters, now)
                entries += kept
            else:
                data = _encode(keys, values)
                entries += len(keys)
            if data:
                stream.write(data)
        while len(marks) < len(key_groups):
            marks.append(stream.mark_block())
        if entries == 0:
            stream.abort()
            return None
        handle = stream.close()
        # A list first: tuple(generator) in a worker thread fails with SystemError if another thread holds the
        # half-built tuple through gc.get_objects() meanwhile (CPython gh-39117; the soak's census did).
        offsets = tuple([stream.block_offset(mark) for mark in marks])
    return KeyedStateHandle(key_groups, offsets, handle)
