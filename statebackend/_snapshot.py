"""The keyed snapshot payload: backend-neutral, so LMDB state restores into the heap and vice versa.

Inside a state file (``keystate.storage.statefile``), the raw payload of a keyed snapshot is::

    >I meta length | meta (UTF-8 JSON)             -- the blocks before offsets[0]
    per key group g of the handle's range, starting at offsets[g - start] (a block boundary):
        entries, each: >H key length | key | >I value length | value

``key`` is the full composite key (it starts with ``>H g``, so every entry proves its key group) and
``value`` the stored value, exactly as the engines hold them (``keystate.statebackend._states``). The meta
JSON names the key serializer, the key-group hash, and every state: id, name, kind, serializers, TTL.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from keystate.statebackend._kv import CHUNK_ENTRIES, Chunk, KVSnapshot
from keystate.statebackend._states import MAX_STORED_KEY_BYTES, split_frames, ttl_filter
from keystate.statebackend.errors import StateError, StateRestoreError
from keystate.statebackend.state import StateKind
from keystate.statebackend.ttl import StateVisibility, TtlConfig, TtlUpdate
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import StateFileError
from keystate.storage.keygroups import KeyGroupRange
from keystate.storage.metadata import KeyedStateHandle
from keystate.storage.statefile import FILE_HEADER
from keystate.storage.validation import check_keys, loads_strict, opt_int, req_bool, req_int, req_list, req_str

__all__ = ["KeyedSnapshotReader", "SnapshotMeta", "StateMeta", "write_keyed_snapshot"]

SNAPSHOT_FORMAT_VERSION = 1
_META_LEN = struct.Struct(">I")  # >I length of the meta JSON that follows
_KEY_LEN = struct.Struct(">H")  # >H composite key length | key
_VALUE_LEN = struct.Struct(">I")  # >I value length | value
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

    def to_json_bytes(self) -> bytes:
        doc = {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "key_serializer": self.key_serializer,
            "key_group_hash": self.key_group_hash,
            "states": [s.to_dict() for s in self.states],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> SnapshotMeta:
        doc = loads_strict(data, where, StateRestoreError)
        if not isinstance(doc, dict):
            raise StateRestoreError(f"{where}: snapshot meta must be a JSON object")
        version = opt_int(doc, "format_version", where, StateRestoreError)
        if version != SNAPSHOT_FORMAT_VERSION:
            raise StateRestoreError(
                f"{where}: keyed snapshot format_version {version} is not supported (this keystate reads "
                f"{SNAPSHOT_FORMAT_VERSION}); upgrade keystate"
            )
        check_keys(
            doc, where, ("format_version", "key_serializer", "key_group_hash", "states"), error=StateRestoreError
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


def _encode(keys: list[bytes], values: list[bytes]) -> bytes:
    """Entries as in the payload: ``>H key length | key | >I value length | value`` each, in C loops."""
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
) -> KeyedStateHandle | None:
    """Stream one keyed snapshot into a state file; ``None`` (and nothing written) if it has no entries."""
    filters = {
        _KEY_LEN.pack(s.sid): s for s in meta.states if s.ttl is not None and s.ttl.cleanup_in_snapshot
    }  # keyed by the 2-byte state id as it appears in composite keys
    entries = 0
    with writer.open_stream(hint) as stream:
        stream.compress_in_background()
        meta_bytes = meta.to_json_bytes()
        stream.write(_META_LEN.pack(len(meta_bytes)) + meta_bytes)
        # Block numbers, not offsets: the offsets are known once compression (maybe on a helper
        # thread) has caught up, and waiting for it at every key group would undo the overlap.
        marks: list[int] = []
        for kg, keys, values in view.iter_chunks(key_groups):
            if not len(marks) - 1 <= kg - key_groups.start < len(key_groups):
                raise StateError(f"engine returned key group {kg} out of order or outside {key_groups}")
            while len(marks) <= kg - key_groups.start:
                marks.append(stream.mark_block())
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


class _Structs(dict[int | tuple[int, int], struct.Struct]):
    """``struct.Struct`` objects by field size(s), compiled on first use."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self._fmt = fmt

    def __missing__(self, sizes: int | tuple[int, int]) -> struct.Struct:
        compiled = struct.Struct(self._fmt % sizes)
        if len(self) < 1024:
            self[sizes] = compiled
        return compiled


_KEY_THEN_VALUE_LEN = _Structs(">%dsI")  # key | >I value length (after the >H key length), by key length
_FIXED_ENTRY = _Structs(">2x%ds4x%ds")  # >H key length | key | >I value length | value, lengths skipped
_HEAD = itemgetter(slice(0, 4))


def _parse_uniform(data: bytes, heads: frozenset[bytes]) -> Chunk | None:
    """The entries if they all have the key length and value length of the first (a fixed-size state).

    Every length field and key head is checked with strided slices and the entries are decoded by one
    ``struct.iter_unpack``: no Python step per entry. ``None`` if the data is not like that.
    """
    if len(data) < 6:
        return None
    (kl,) = _KEY_LEN.unpack_from(data)
    if not _MIN_KEY <= kl <= MAX_STORED_KEY_BYTES or len(data) < 6 + kl:
        return None
    (vl,) = _VALUE_LEN.unpack_from(data, 2 + kl)
    step = 6 + kl + vl
    n, rest = divmod(len(data), step)
    if rest:
        return None
    for offset in (0, 1, 2 + kl, 3 + kl, 4 + kl, 5 + kl):  # the two length fields of every entry
        if data[offset::step].count(data[offset]) != n:
            return None
    if all(data[offset::step].count(data[offset]) == n for offset in (2, 3, 4, 5)):
        if data[2:6] not in heads:
            return None
    else:
        found = set(zip(data[2::step], data[3::step], data[4::step], data[5::step], strict=True))
        if not {bytes(head) for head in found} <= heads:
            return None
    return list(_FIXED_ENTRY[kl, vl].iter_unpack(data))


def _parse_variable(data: bytes, heads: frozenset[bytes]) -> Chunk | None:
    """The entries, one struct call per entry, checked at the end; ``None`` if anything is wrong."""
    out: Chunk = []
    append = out.append
    key_len, key_then_value_len = _KEY_LEN.unpack_from, _KEY_THEN_VALUE_LEN
    pos, end = 0, len(data)
    try:
        while pos < end:
            (kl,) = key_len(data, pos)
            key, vl = key_then_value_len[kl].unpack_from(data, pos + 2)
            pos += kl + 6
            append((key, data[pos : pos + vl]))
            pos += vl
    except struct.error:  # a length field runs past the end
        return None
    if pos != end:
        return None
    if out:
        lengths = list(map(len, map(itemgetter(0), out)))
        if min(lengths) < _MIN_KEY or max(lengths) > MAX_STORED_KEY_BYTES:
            return None
    if not set(map(_HEAD, map(itemgetter(0), out))) <= heads:
        return None
    return out


class KeyedSnapshotReader:
    """Reads one keyed handle: its meta, and the entries of the key groups a backend owns."""

    def __init__(self, checkpoint: CompletedCheckpoint, handle: KeyedStateHandle, operator_uid: str) -> None:
        self._handle = handle
        self._reader = checkpoint.open_state(handle.stream)
        self._where = f"operator {operator_uid!r}: state file {self._reader.name}"
        self._meta: SnapshotMeta | None = None

    def meta(self) -> SnapshotMeta:
        if self._meta is None:
            try:
                raw = b"".join(self._reader.iter_range(FILE_HEADER.size, self._handle.offsets[0]))
            except StateFileError as exc:
                raise StateRestoreError(f"{self._where}: cannot read the snapshot meta: {exc}") from exc
            if len(raw) < _META_LEN.size:
                raise StateRestoreError(f"{self._where}: snapshot meta is truncated ({len(raw)} bytes)")
            (n,) = _META_LEN.unpack_from(raw)
            if n != len(raw) - _META_LEN.size:
                raise StateRestoreError(
                    f"{self._where}: snapshot meta declares {n} bytes but {len(raw) - _META_LEN.size} precede "
                    "the first key group; the handle's offsets do not match the file"
                )
            self._meta = SnapshotMeta.from_json_bytes(raw[_META_LEN.size :], f"{self._where} (meta)")
        return self._meta

    def entries(self, wanted: KeyGroupRange) -> Iterator[tuple[bytes, bytes]]:
        """``(composite key, value)`` of every key group in ``wanted`` ∩ the handle's range, in order.

        Raises:
            StateRestoreError: a block is damaged, or an entry is malformed or in the wrong key group.
        """
        for _, chunk in self.chunks(wanted):
            yield from chunk

    def chunks(self, wanted: KeyGroupRange, size: int = CHUNK_ENTRIES) -> Iterator[tuple[int, Chunk]]:
        """The entries of :meth:`entries` as ``(key group, up to size entries)`` lists, in order.

        Raises:
            StateRestoreError: as :meth:`entries`; before any entry of the damaged key group is returned.
        """
        handle = self._handle
        part = handle.key_groups.intersection(wanted)
        if not part:
            return
        sids = [_KEY_LEN.pack(s.sid) for s in self.meta().states]
        ttl_states = {_KEY_LEN.pack(s.sid): s for s in self.meta().states if s.ttl is not None}
        first = part.start - handle.key_groups.start
        starts = list(handle.offsets[first : first + len(part)])
        end = handle.offset_range(part.end)[1]
        kg, index = part.start, 0
        pending: list[bytes] = []
        try:
            for offset, raw in self._reader.iter_range_with_offsets(starts[0], end):
                while index + 1 < len(starts) and offset >= starts[index + 1]:
                    yield from self._parse(b"".join(pending), kg, sids, ttl_states, size)
                    pending = []
                    index += 1
                    kg += 1
                pending.append(raw)
        except StateFileError as exc:
            raise StateRestoreError(f"{self._where}: key groups {part}: {exc}") from exc
        yield from self._parse(b"".join(pending), kg, sids, ttl_states, size)

    def _parse(
        self, data: bytes, kg: int, sids: list[bytes], ttl_states: dict[bytes, StateMeta], size: int
    ) -> Iterator[tuple[int, Chunk]]:
        """Every entry of one key group's data, checked, in chunks (all parsed before the first is returned).

        Two fast parsers run first; on anything unexpected, :meth:`_parse_checked` parses again to raise
        the error at the entry where it is.
        """
        prefix = _KEY_LEN.pack(kg)
        heads = frozenset(prefix + sid for sid in sids)  # key group and state id: the first 4 key bytes
        out = _parse_uniform(data, heads)
        if out is None:
            out = _parse_variable(data, heads)
        if out is None:
            out = self._parse_checked(data, kg, heads, prefix)
        if ttl_states:
            self._check_ttl_values(out, kg, ttl_states)
        for start in range(0, len(out), size):
            yield kg, out if start == 0 and len(out) <= size else out[start : start + size]

    def _parse_checked(self, data: bytes, kg: int, heads: frozenset[bytes], prefix: bytes) -> Chunk:
        key_len, value_len = _KEY_LEN.unpack_from, _VALUE_LEN.unpack_from
        out: Chunk = []
        append = out.append
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < _KEY_LEN.size:
                raise self._bad(kg, pos, "entry header truncated")
            (kl,) = key_len(data, pos)
            pos += _KEY_LEN.size
            if kl < _MIN_KEY or kl > MAX_STORED_KEY_BYTES:
                raise self._bad(
                    kg, pos, f"entry key of {kl} bytes; composite keys have {_MIN_KEY}..{MAX_STORED_KEY_BYTES} bytes"
                )
            if end - pos < kl + _VALUE_LEN.size:
                raise self._bad(kg, pos, f"entry key of {kl} bytes does not fit")
            key = data[pos : pos + kl]
            pos += kl
            if key[:4] not in heads:
                raise self._bad_head(kg, pos, key, prefix)
            (vl,) = value_len(data, pos)
            pos += _VALUE_LEN.size
            if end - pos < vl:
                raise self._bad(kg, pos, f"entry value of {vl} bytes runs past the key group's data")
            append((key, data[pos : pos + vl]))
            pos += vl
        return out

    def _check_ttl_values(self, out: Chunk, kg: int, ttl_states: dict[bytes, StateMeta]) -> None:
        """Values of states with TTL carry their timestamps: 8 bytes first, or in every list frame."""
        for key, value in out:
            state = ttl_states.get(key[2:4])
            if state is None:
                continue
            if state.kind is StateKind.LIST:
                try:
                    split_frames(value, True)
                except StateError as exc:
                    raise self._bad(kg, 0, f"list state {state.name!r} with TTL: {exc}") from None
            elif len(value) < _TTL_HEADER:
                raise self._bad(
                    kg,
                    0,
                    f"value of state {state.name!r} has {len(value)} bytes, fewer than the {_TTL_HEADER}-byte "
                    "timestamp every value of a state with TTL starts with",
                )

    def _bad_head(self, kg: int, pos: int, key: bytes, prefix: bytes) -> StateRestoreError:
        if key[:2] != prefix:
            found = _KEY_LEN.unpack_from(key)[0]
            return self._bad(kg, pos, f"entry belongs to key group {found}; the handle's offsets do not match")
        return self._bad(kg, pos, f"entry of unknown state id {_KEY_LEN.unpack_from(key, 2)[0]}")

    def _bad(self, kg: int, pos: int, what: str) -> StateRestoreError:
        return StateRestoreError(f"{self._where}: key group {kg}, byte {pos} of its data: {what}")
