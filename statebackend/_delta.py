"""Delta files of incremental keyed snapshots: writing them, reading them, and merging a chain.

A delta file is a state file (``docs/format.md``) whose raw payload is::

    >I header length | header (UTF-8 JSON)          -- the blocks before offsets[0]
    per key group g of the handle's range, starting at offsets[g - start] (a block boundary):
        entries in strictly increasing key order, each one of
            >H key length | key | >I value length | value      -- the key's whole stored value now
            >H key length | key | >I 0xFFFFFFFF                 -- a tombstone: the key has no value now

The header is ``{"delta_format_version": 1, "checkpoint_id": n, "based_on": c, "snapshot": meta}``: the
checkpoint that wrote the delta, the completed checkpoint whose chain it extends (its entries are the
keys changed since then) and the keyed snapshot meta of the full format (key serializer, hash, max
parallelism, states). Keys and values are exactly those of a full snapshot (``_snapshot``); a value
carries its TTL timestamps as stored, and values that TTL cleanup drops are written as tombstones.

A chain (an incremental ``KeyedStateHandle``) restores as its base, then each delta in order: a value
replaces the key's entry, a tombstone removes it. :func:`merge_chain` does that per key group while the
base streams by, holding one key group's changes at a time.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import operator
import struct
from collections.abc import Iterator, Sequence
from itertools import islice
from operator import itemgetter
from typing import Any, cast

from keystate.statebackend._entry_format import MAX_STORED_KEY_BYTES, split_frames, ttl_filter
from keystate.statebackend._kv import CHUNK_ENTRIES, Chunk, KVSnapshot
from keystate.statebackend._packed import Change, PackedEntries, PatchedEntries, apply_changes
from keystate.statebackend._snapshot import MAX_SNAPSHOT_META, SnapshotMeta, StateMeta
from keystate.statebackend._snapshot_reader import KeyedSnapshotReader
from keystate.statebackend.errors import MaxParallelismMismatchError, StateError, StateRestoreError, StateSnapshotError
from keystate.statebackend.state import StateKind
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import StateFileError
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import HandleScope, KeyedStateHandle
from keystate.storage.format.statefile import FILE_HEADER
from keystate.storage.format.validation import check_keys, loads_strict, req_int

__all__ = [
    "DELTA_FORMAT_VERSION",
    "ChainReader",
    "Change",
    "DeltaHeader",
    "DeltaReader",
    "merge_chain",
    "merge_metas",
    "write_delta",
]

DELTA_FORMAT_VERSION = 1
_HEADER_KEYS = ("delta_format_version", "checkpoint_id", "based_on", "snapshot")
_HEADER_LEN = struct.Struct(">I")  # >I header length | header JSON
_KEY_LEN = struct.Struct(">H")  # >H composite key length | key
_VALUE_LEN = struct.Struct(">I")  # >I value length | value, or TOMBSTONE and no value
TOMBSTONE = 0xFFFFFFFF
"""The value length that marks a deleted key (no value bytes follow)."""
_TOMBSTONE_BYTES = _VALUE_LEN.pack(TOMBSTONE)
_MIN_KEY = 8
_TTL_HEADER = 8


@dataclasses.dataclass(frozen=True, slots=True)
class DeltaHeader:
    """The header of a delta file."""

    checkpoint_id: int
    based_on: int
    meta: SnapshotMeta

    def to_json_bytes(self) -> bytes:
        snapshot = json.loads(self.meta.to_json_bytes())
        doc = {
            "delta_format_version": DELTA_FORMAT_VERSION,
            "checkpoint_id": self.checkpoint_id,
            "based_on": self.based_on,
            "snapshot": snapshot,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> DeltaHeader:
        doc = loads_strict(data, where, StateRestoreError)
        if not isinstance(doc, dict):
            raise StateRestoreError(f"{where}: a delta header must be a JSON object")
        version = doc.get("delta_format_version")
        if version != DELTA_FORMAT_VERSION:
            raise StateRestoreError(
                f"{where}: delta_format_version {version!r} is not supported (this keystate reads "
                f"{DELTA_FORMAT_VERSION}); is this a delta file? upgrade keystate if it is newer"
            )
        check_keys(doc, where, _HEADER_KEYS, error=StateRestoreError)
        checkpoint_id = req_int(doc, "checkpoint_id", where, StateRestoreError, min_value=0)
        based_on = req_int(doc, "based_on", where, StateRestoreError, min_value=0)
        if based_on >= checkpoint_id:
            raise StateRestoreError(
                f"{where}: delta of checkpoint {checkpoint_id} claims to extend checkpoint {based_on}; a delta "
                "extends an earlier checkpoint"
            )
        if not isinstance(doc["snapshot"], dict):
            raise StateRestoreError(f"{where}: field 'snapshot' must be the keyed snapshot meta object")
        meta = SnapshotMeta.from_json_bytes(json.dumps(doc["snapshot"]).encode(), f"{where}.snapshot")
        if meta.max_parallelism is None:
            raise StateRestoreError(f"{where}.snapshot: a delta's snapshot meta records its max_parallelism")
        return cls(checkpoint_id, based_on, meta)


# --- writing ---------------------------------------------------------------------------------------


def _encode_changes(keys: list[bytes], values: list[bytes | None]) -> bytes:
    parts: list[bytes] = []
    extend = parts.extend
    key_len, value_len = _KEY_LEN.pack, _VALUE_LEN.pack
    for key, value in zip(keys, values, strict=True):
        if value is None:
            extend((key_len(len(key)), key, _TOMBSTONE_BYTES))
        else:
            extend((key_len(len(key)), key, value_len(len(value)), value))
    return b"".join(parts)


def write_delta(
    writer: CheckpointWriter,
    hint: str,
    view: KVSnapshot,
    keys: list[bytes],
    chain: KeyedStateHandle,
    header: DeltaHeader,
    now: int,
) -> KeyedStateHandle:
    """Write the delta of ``keys`` (sorted, changed since ``chain``'s checkpoint) as read from ``view``; returns
    ``chain`` extended by it (a shared file written by ``header.checkpoint_id``)."""
    key_groups = chain.key_groups
    meta = header.meta
    filters = {_KEY_LEN.pack(s.sid): s for s in meta.states if s.ttl is not None and s.ttl.cleanup_in_snapshot}
    header_bytes = header.to_json_bytes()
    if len(header_bytes) > MAX_SNAPSHOT_META:
        raise StateSnapshotError(
            f"{hint}: the delta header of {len(meta.states)} states is {len(header_bytes)} bytes, over the "
            f"{MAX_SNAPSHOT_META}-byte limit a restore reads; register fewer states or use shorter names"
        )
    with writer.open_stream(hint, HandleScope.SHARED) as stream:
        stream.compress_in_background()
        stream.write(_HEADER_LEN.pack(len(header_bytes)) + header_bytes)
        marks: list[int] = []
        for start in range(0, len(keys), CHUNK_ENTRIES):
            chunk = keys[start : start + CHUNK_ENTRIES]
            values = view.lookup(chunk)
            if filters:
                for i, (key, value) in enumerate(zip(chunk, values, strict=True)):
                    state = filters.get(key[2:4])
                    if state is not None and value is not None:
                        assert state.ttl is not None
                        values[i] = ttl_filter(state.kind, state.ttl, now, value)
            pos = 0
            while pos < len(chunk):
                kg = (chunk[pos][0] << 8) | chunk[pos][1]
                if kg not in key_groups or kg - key_groups.start < len(marks) - 1:
                    raise StateError(f"changed key of key group {kg} out of order or outside {key_groups}")
                end = bisect.bisect_left(chunk, _KEY_LEN.pack(kg + 1), pos) if kg < 0xFFFF else len(chunk)
                while len(marks) <= kg - key_groups.start:
                    marks.append(stream.mark_block())
                stream.write(_encode_changes(chunk[pos:end], values[pos:end]))
                pos = end
        while len(marks) < len(key_groups):
            marks.append(stream.mark_block())
        handle = stream.close()
        offsets = tuple([stream.block_offset(mark) for mark in marks])
    if handle.scope is HandleScope.SHARED and handle.written_by is None:
        handle = dataclasses.replace(handle, written_by=header.checkpoint_id)
    delta = KeyedStateHandle(key_groups, offsets, handle)
    return dataclasses.replace(chain, deltas=(*chain.deltas, delta))


# --- reading ---------------------------------------------------------------------------------------


_FIXED: dict[tuple[int, int], struct.Struct] = {}


def _parse_uniform(data: bytes, prefix: bytes, states: dict[bytes, StateMeta]) -> list[Change] | None:
    """The changes of one key group's data if every entry is a value (no tombstone) with the key length
    and value length of the first, of key group ``prefix`` and a known state, in strictly increasing key
    order (a delta of a fixed-size state, the common case); ``None`` otherwise.

    The length fields and key heads are checked with strided slices and the entries decoded by one
    ``struct.iter_unpack``: no Python step per entry.
    """
    end = len(data)
    if end < _KEY_LEN.size + _MIN_KEY + _VALUE_LEN.size:
        return None
    (kl,) = _KEY_LEN.unpack_from(data)
    if not _MIN_KEY <= kl <= MAX_STORED_KEY_BYTES or end < _KEY_LEN.size + kl + _VALUE_LEN.size:
        return None  # the checked parser names what is wrong (here: the first entry is truncated)
    (vl,) = _VALUE_LEN.unpack_from(data, 2 + kl)
    step = 6 + kl + vl
    if vl == TOMBSTONE or end % step:
        return None
    n = end // step
    for offset in (0, 1, 2 + kl, 3 + kl, 4 + kl, 5 + kl, 2, 3):  # both length fields, the key group
        if data[offset::step].count(data[offset]) != n:
            return None
    if data[2:4] != prefix:
        return None
    if data[4::step].count(data[4]) == n and data[5::step].count(data[5]) == n:
        if data[4:6] not in states:
            return None
    elif not {bytes(sid) for sid in zip(data[4::step], data[5::step], strict=True)} <= states.keys():
        return None
    entry = _FIXED.get((kl, vl))
    if entry is None:
        entry = _FIXED[kl, vl] = struct.Struct(f">2x{kl}s4x{vl}s")
    out: list[Change] = list(entry.iter_unpack(data))
    keys = list(map(itemgetter(0), out))
    if not all(map(operator.lt, keys, islice(keys, 1, None))):
        return None
    return out


class DeltaReader:
    """Reads one delta file of an incremental handle: its header and the changes of some key groups."""

    def __init__(self, checkpoint: CompletedCheckpoint, delta: KeyedStateHandle, operator_uid: str) -> None:
        self._delta = delta
        self._reader = checkpoint.open_state(delta.stream)
        self.where = f"operator {operator_uid!r}: delta file {self._reader.name}"
        self._header: DeltaHeader | None = None

    def header(self) -> DeltaHeader:
        """The delta's header.

        Raises:
            StateRestoreError: it is damaged, of an unknown version, or does not fit the handle.
        """
        if self._header is None:
            # Offsets are stored (compressed) positions: a header of at most MAX_SNAPSHOT_META raw bytes
            # takes at most about as many stored ones (zstd never grows data by more than a few bytes per
            # block). Checked before reading, so a hostile offset cannot make the restore read that much.
            stored = self._delta.offsets[0] - FILE_HEADER.size
            if stored > 2 * MAX_SNAPSHOT_META:
                raise StateRestoreError(
                    f"{self.where}: the first key group starts {self._delta.offsets[0]} bytes into the file, "
                    f"more than a delta header takes (at most {MAX_SNAPSHOT_META} bytes); the handle's offsets "
                    "do not match the file, or the file is not a keystate delta"
                )
            try:
                raw = b"".join(self._reader.iter_range(FILE_HEADER.size, self._delta.offsets[0]))
            except StateFileError as exc:
                raise StateRestoreError(f"{self.where}: cannot read the delta header: {exc}") from exc
            if len(raw) < _HEADER_LEN.size:
                raise StateRestoreError(
                    f"{self.where}: delta header is truncated: expected at least {_HEADER_LEN.size} bytes before "
                    f"the first key group, found {len(raw)}"
                )
            (declared,) = _HEADER_LEN.unpack_from(raw)
            if declared > MAX_SNAPSHOT_META:
                raise StateRestoreError(
                    f"{self.where}: delta header of {declared} bytes is over the {MAX_SNAPSHOT_META}-byte limit a "
                    "restore reads; the file is damaged or not a keystate delta"
                )
            if declared != len(raw) - _HEADER_LEN.size:
                raise StateRestoreError(
                    f"{self.where}: delta header declares {declared} bytes but {len(raw) - _HEADER_LEN.size} precede "
                    "the first key group; the handle's offsets do not match the file"
                )
            header = DeltaHeader.from_json_bytes(raw[_HEADER_LEN.size :], f"{self.where} (header)")
            written_by = self._delta.stream.written_by
            if written_by is not None and written_by != header.checkpoint_id:
                raise StateRestoreError(
                    f"{self.where}: the handle says checkpoint {written_by} wrote it, its header says "
                    f"{header.checkpoint_id}; the handle does not belong to this file"
                )
            groups = self._delta.key_groups
            assert header.meta.max_parallelism is not None
            if groups.end >= header.meta.max_parallelism:
                raise StateRestoreError(
                    f"{self.where}: its handle names key groups {groups}, but the delta was written with "
                    f"max_parallelism {header.meta.max_parallelism}"
                )
            self._header = header
        return self._header

    def chunks(self, wanted: KeyGroupRange) -> Iterator[tuple[int, list[Change]]]:
        """``(key group, changes)`` of the key groups in ``wanted`` ∩ the handle's, in key order (key groups
        without changes are left out).

        Raises:
            StateRestoreError: a block is damaged, or an entry is malformed, out of order or in the wrong
                key group; the message names the file, the key group and the byte.
        """
        delta = self._delta
        part = delta.key_groups.intersection(wanted)
        if not part:
            return
        states = {_KEY_LEN.pack(s.sid): s for s in self.header().meta.states}
        first = part.start - delta.key_groups.start
        starts = list(delta.offsets[first : first + len(part)])
        end = delta.offset_range(part.end)[1]
        index = 0
        pending: list[bytes] = []
        try:
            for offset, raw in self._reader.iter_range_with_offsets(starts[0], end):
                while index + 1 < len(starts) and offset >= starts[index + 1]:
                    if pending:
                        yield part.start + index, self._parse(part.start + index, b"".join(pending), states)
                    pending = []
                    index += 1
                if raw:
                    pending.append(raw)
        except StateFileError as exc:
            raise StateRestoreError(f"{self.where}: key groups {part}: {exc}") from exc
        if pending:
            yield part.start + index, self._parse(part.start + index, b"".join(pending), states)

    def _parse(self, kg: int, data: bytes, states: dict[bytes, StateMeta]) -> list[Change]:
        """The key group's changes: by :func:`_parse_uniform` when it can, else entry by entry (which
        also raises at the first bad entry)."""
        found = _parse_uniform(data, _KEY_LEN.pack(kg), states)
        if found is not None:
            if any(s.ttl is not None for s in states.values()):
                for key, value in found:
                    state = states[key[2:4]]
                    if state.ttl is not None and value is not None:
                        self._check_ttl(kg, 0, state, value)
            return found
        return self._parse_checked(kg, data, states)

    def _parse_checked(self, kg: int, data: bytes, states: dict[bytes, StateMeta]) -> list[Change]:
        out: list[Change] = []
        append = out.append
        prefix = _KEY_LEN.pack(kg)
        pos, end = 0, len(data)
        previous = b""
        while pos < end:
            at = pos
            if end - pos < _KEY_LEN.size:
                raise self._bad(kg, at, f"entry header truncated: expected {_KEY_LEN.size} bytes, found {end - pos}")
            (kl,) = _KEY_LEN.unpack_from(data, pos)
            pos += _KEY_LEN.size
            if not _MIN_KEY <= kl <= MAX_STORED_KEY_BYTES:
                raise self._bad(kg, at, f"key of {kl} bytes; expected {_MIN_KEY}..{MAX_STORED_KEY_BYTES}")
            if end - pos < kl + _VALUE_LEN.size:
                raise self._bad(
                    kg, at, f"entry truncated: expected {kl + _VALUE_LEN.size} more bytes, found {end - pos}"
                )
            key = data[pos : pos + kl]
            pos += kl
            if key[:2] != prefix:
                raise self._bad(kg, at, f"entry of key group {_KEY_LEN.unpack_from(key)[0]}, expected {kg}")
            state = states.get(key[2:4])
            if state is None:
                raise self._bad(kg, at, f"entry of unknown state id {_KEY_LEN.unpack_from(key, 2)[0]}")
            if key <= previous:
                raise self._bad(kg, at, "keys out of order: expected strictly increasing keys")
            previous = key
            (vl,) = _VALUE_LEN.unpack_from(data, pos)
            pos += _VALUE_LEN.size
            if vl == TOMBSTONE:
                append((key, None))
                continue
            if end - pos < vl:
                raise self._bad(kg, at, f"value of {vl} bytes, found {end - pos} before the key group's end")
            value = data[pos : pos + vl]
            pos += vl
            if state.ttl is not None:
                self._check_ttl(kg, at, state, value)
            append((key, value))
        return out

    def _check_ttl(self, kg: int, at: int, state: StateMeta, value: bytes) -> None:
        if state.kind is StateKind.LIST:
            try:
                split_frames(value, True)
            except StateError as exc:
                raise self._bad(kg, at, f"list state {state.name!r} with TTL: {exc}") from None
        elif len(value) < _TTL_HEADER:
            raise self._bad(
                kg,
                at,
                f"value of state {state.name!r} has {len(value)} bytes; expected at least the {_TTL_HEADER}-byte "
                "TTL timestamp",
            )

    def _bad(self, kg: int, pos: int, what: str) -> StateRestoreError:
        start = self._delta.offsets[kg - self._delta.key_groups.start]
        return StateRestoreError(
            f"{self.where}: key group {kg}, byte {pos} of its data (which starts at file offset {start}): {what}"
        )


def _apply(chunk: Chunk, changes: list[Change], dead: bool) -> Chunk:
    """``chunk`` (sorted entries) with ``changes`` (sorted, ``dead``: some are tombstones) applied; a packed
    chunk stays packed, with its changes beside it (an engine may put both without merging them)."""
    if isinstance(chunk, PackedEntries):
        return PatchedEntries(chunk, changes, dead)
    return apply_changes(chunk, changes, dead)


def _changes_of(lists: list[list[Change]]) -> tuple[list[Change], bool]:
    """One key group's changes from the deltas (oldest first) merged, newest wins, sorted; and whether
    any is a tombstone."""
    if len(lists) == 1:
        changes = lists[0]
    else:
        merged: dict[bytes, bytes | None] = {}
        for part in lists:
            merged.update(part)
        changes = sorted(merged.items())  # by key: keys are unique, so no two values are compared
    return changes, None in map(itemgetter(1), changes)


def merge_chain(
    base: Iterator[tuple[int, Chunk]],
    deltas: Sequence[Iterator[tuple[int, list[Change]]]],
    size: int = CHUNK_ENTRIES,
) -> Iterator[tuple[int, Chunk]]:
    """The base's ``(key group, entries)`` chunks with the deltas' changes applied in order, key group by
    key group, as sorted chunks of at most about ``size`` entries (key groups in ascending order).

    One pass: for each key group the deltas' changes of it are merged (newest wins), then applied to the
    base's chunks of it as they stream by; what is held is one key group's changes and one base chunk.
    """
    heads: list[Any] = [next(d, None) for d in deltas]
    pending = next(base, None)
    while True:
        candidates = [h[0] for h in heads if h is not None]
        if pending is not None:
            candidates.append(pending[0])
        if not candidates:
            return
        kg = min(candidates)
        lists: list[list[Change]] = []
        for i, head in enumerate(heads):  # every head is at kg or after it: kg is the smallest of them
            if head is not None and head[0] == kg:
                lists.append(head[1])
                heads[i] = next(deltas[i], None)
        changes, dead = _changes_of(lists) if lists else ([], False)
        done = 0
        while pending is not None and pending[0] == kg:
            chunk = pending[1]
            pending = next(base, None)
            if done < len(changes):
                last = pending is None or pending[0] != kg
                # (key + 0x00,) sorts right after every (key, value): the changes up to the chunk's last key.
                upto = (
                    len(changes)
                    if last
                    else bisect.bisect_left(changes, (chunk[-1][0] + b"\0",), done)
                    if chunk
                    else done
                )
                if upto > done:
                    chunk = _apply(chunk, changes[done:upto], dead)
                    done = upto
            if chunk:
                yield kg, chunk
        if done < len(changes):
            rest = changes[done:]
            if dead:
                rest = [(key, value) for key, value in rest if value is not None]
            for start in range(0, len(rest), size):
                yield kg, cast(Chunk, rest[start : start + size])


def merge_metas(metas: Sequence[tuple[SnapshotMeta, str]]) -> SnapshotMeta:
    """The meta of a whole chain (base first): every state of any of its files, by id.

    A chain is written by one backend, so a state id names the same state in every file; a later file
    may add states and change a state's TTL.

    Raises:
        StateRestoreError: the files disagree (key serializer, hash, max parallelism, what an id names).
    """
    first, _ = metas[0]
    by_sid: dict[int, StateMeta] = {}
    for meta, where in metas:
        if (meta.key_serializer, meta.key_group_hash) != (first.key_serializer, first.key_group_hash) or (
            meta.max_parallelism is not None
            and first.max_parallelism is not None
            and meta.max_parallelism != first.max_parallelism
        ):
            raise StateRestoreError(
                f"{where}: written with key serializer {meta.key_serializer!r}, hash {meta.key_group_hash!r}, max "
                f"parallelism {meta.max_parallelism}, but the chain's base with {first.key_serializer!r}, "
                f"{first.key_group_hash!r}, {first.max_parallelism}; the files do not belong to one chain"
            )
        names = {s.name: s.sid for s in by_sid.values()}
        for state in meta.states:
            known = by_sid.get(state.sid)
            if names.get(state.name, state.sid) != state.sid or (
                known is not None
                and (known.name, known.kind, known.serializer, known.user_key_serializer)
                != (state.name, state.kind, state.serializer, state.user_key_serializer)
            ):
                raise StateRestoreError(
                    f"{where}: state id {state.sid} is {state.name!r} ({state.kind}/{state.serializer}) there, but "
                    f"earlier files of the chain record another state under that id or name; the files do not "
                    "belong to one chain"
                )
            by_sid[state.sid] = state
    return SnapshotMeta(
        first.key_serializer,
        first.key_group_hash,
        tuple(by_sid[sid] for sid in sorted(by_sid)),
        first.max_parallelism if first.max_parallelism is not None else metas[-1][0].max_parallelism,
    )


class ChainReader:
    """Reads a keyed handle, full or incremental: the merged meta and the merged entries of its chain."""

    def __init__(self, checkpoint: CompletedCheckpoint, handle: KeyedStateHandle, operator_uid: str) -> None:
        self.handle = handle
        self.base = KeyedSnapshotReader(checkpoint, handle, operator_uid)
        self.deltas = [DeltaReader(checkpoint, delta, operator_uid) for delta in handle.deltas]
        self._meta: SnapshotMeta | None = None

    def meta(self) -> SnapshotMeta:
        """The chain's meta (:func:`merge_metas`), after checking every file's header.

        Raises:
            StateRestoreError: a header is damaged, the files do not form one chain.
        """
        if self._meta is None:
            base = self.base.meta()
            if not self.deltas:
                self._meta = base
                return base
            metas = [(base, f"{self.base_where}")]
            previous = self.handle.stream.written_by
            for reader in self.deltas:
                header = reader.header()
                if previous is not None and header.based_on < previous:
                    raise StateRestoreError(
                        f"{reader.where}: the delta extends checkpoint {header.based_on}, but the file before it in "
                        f"the chain was written by checkpoint {previous}; the deltas are out of order"
                    )
                previous = header.checkpoint_id
                metas.append((header.meta, reader.where))
            self._meta = merge_metas(metas)
        return self._meta

    @property
    def base_where(self) -> str:
        return f"state file {self.handle.stream.describe}"

    def check_max_parallelism(self, max_parallelism: int) -> None:
        """See :meth:`KeyedSnapshotReader.check_max_parallelism`; every delta records its own too.

        Raises:
            MaxParallelismMismatchError: a file was written under another max parallelism.
        """
        self.base.check_max_parallelism(max_parallelism)
        for reader in self.deltas:
            recorded = reader.header().meta.max_parallelism
            if recorded != max_parallelism:
                raise MaxParallelismMismatchError(
                    f"{reader.where} was written with max_parallelism {recorded} but this backend has "
                    f"{max_parallelism}; keep max_parallelism {recorded} or start without state"
                )

    def chunks(self, wanted: KeyGroupRange) -> Iterator[tuple[int, Chunk]]:
        """The merged entries of the key groups in ``wanted``, as ``(key group, sorted entries)``.

        Raises:
            StateRestoreError: a file is damaged (see :meth:`KeyedSnapshotReader.chunks`, :meth:`DeltaReader.chunks`).
        """
        if not self.deltas:
            return self.base.chunks(wanted)
        self.meta()
        return merge_chain(self.base.chunks(wanted), [reader.chunks(wanted) for reader in self.deltas])
