"""Reading a keyed snapshot payload (:mod:`keystate.statebackend._snapshot` defines it and writes it): the
meta, then each wanted key group's entries, parsed as its blocks arrive and checked entry by entry.

A run of entries of one key length and one value length (a fixed-size state, the common case) is checked
with strided slices in a few C calls and left packed (:class:`~keystate.statebackend._packed.PackedEntries`);
anything else goes through the checked parser, which names the first bad entry: file, key group, byte,
expected and found.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from operator import itemgetter

from keystate.statebackend._entry_format import MAX_STORED_KEY_BYTES, split_frames
from keystate.statebackend._kv import CHUNK_ENTRIES, Chunk
from keystate.statebackend._packed import PackedEntries
from keystate.statebackend._snapshot import (  # one format: the writer's layout constants
    _KEY_LEN,
    _META_LEN,
    _MIN_KEY,
    _PARSE_SLAB,
    _TTL_HEADER,
    _VALUE_LEN,
    MAX_SNAPSHOT_META,
    SnapshotMeta,
    StateMeta,
)
from keystate.statebackend.errors import MaxParallelismMismatchError, StateError, StateRestoreError
from keystate.statebackend.state import StateKind
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.errors import StateFileError
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import KeyedStateHandle
from keystate.storage.format.statefile import FILE_HEADER

__all__ = ["KeyedSnapshotReader"]


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
    """The entries if they all have the key length and value length of the first (a fixed-size state)."""
    found = _uniform_prefix(data, 0, len(data), heads)
    return found[0] if found is not None and found[1] == len(data) else None


def _parse_variable(data: bytes, heads: frozenset[bytes]) -> Chunk | None:
    """The entries, one struct call per entry, checked at the end; ``None`` if anything is wrong."""
    found = _variable_prefix(data, 0, len(data), heads)
    return found[0] if found is not None and found[1] == len(data) else None


def _uniform_prefix(data: bytes, pos: int, limit: int, heads: frozenset[bytes]) -> tuple[Chunk, int] | None:
    """The entries from ``pos`` that start before ``limit`` and are complete in ``data``, and where they
    end, if they all have the key length and value length of the first (a fixed-size state).

    Every length field and key head is checked with strided slices, and the entries come as a
    :class:`~keystate.statebackend._packed.PackedEntries` view that ``struct.iter_unpack`` decodes as it is
    iterated: no Python step per entry. ``None`` if the data is not like that.
    """
    end = len(data)
    if end - pos < 6:
        return None
    (kl,) = _KEY_LEN.unpack_from(data, pos)
    if not _MIN_KEY <= kl <= MAX_STORED_KEY_BYTES or end - pos < 6 + kl:
        return None
    (vl,) = _VALUE_LEN.unpack_from(data, pos + 2 + kl)
    step = 6 + kl + vl
    n = min(-(-(limit - pos) // step), (end - pos) // step)
    if n == 0:
        return None
    stop = pos + n * step
    for offset in (pos, pos + 1, pos + 2 + kl, pos + 3 + kl, pos + 4 + kl, pos + 5 + kl):  # both length fields
        if data[offset:stop:step].count(data[offset]) != n:
            return None
    if all(data[offset:stop:step].count(data[offset]) == n for offset in range(pos + 2, pos + 6)):
        if data[pos + 2 : pos + 6] not in heads:
            return None
    else:
        found = set(zip(*(data[offset:stop:step] for offset in range(pos + 2, pos + 6)), strict=True))
        if not {bytes(head) for head in found} <= heads:
            return None
    # Left packed: decoded as the bulk load iterates it (``_packed``), not all at once here.
    return PackedEntries(memoryview(data)[pos:stop], _FIXED_ENTRY[kl, vl], n), stop


def _variable_prefix(data: bytes, pos: int, limit: int, heads: frozenset[bytes]) -> tuple[Chunk, int] | None:
    """Like :func:`_uniform_prefix` for entries of any sizes: one struct call per entry, checked at the
    end. An entry that runs past the end of ``data`` ends the prefix; ``None`` if anything is wrong."""
    out: list[tuple[bytes, bytes]] = []
    append = out.append
    key_len, key_then_value_len = _KEY_LEN.unpack_from, _KEY_THEN_VALUE_LEN
    end = len(data)
    try:
        while pos < limit:
            (kl,) = key_len(data, pos)
            key, vl = key_then_value_len[kl].unpack_from(data, pos + 2)
            value = pos + kl + 6
            if value + vl > end:
                break
            append((key, data[value : value + vl]))
            pos = value + vl
    except struct.error:  # a length field runs past the end: the entry at ``pos`` continues later
        pass
    if out:
        lengths = list(map(len, map(itemgetter(0), out)))
        if min(lengths) < _MIN_KEY or max(lengths) > MAX_STORED_KEY_BYTES:
            return None
    if not set(map(_HEAD, map(itemgetter(0), out))) <= heads:
        return None
    return out, pos


class KeyedSnapshotReader:
    """Reads one keyed handle: its meta, and the entries of the key groups a backend owns."""

    def __init__(self, checkpoint: CompletedCheckpoint, handle: KeyedStateHandle, operator_uid: str) -> None:
        self._checkpoint = checkpoint
        self._handle = handle
        self._reader = checkpoint.open_state(handle.stream)
        self._where = f"operator {operator_uid!r}: state file {self._reader.name}"
        self._meta: SnapshotMeta | None = None

    def meta(self) -> SnapshotMeta:
        """The snapshot's meta section.

        Raises:
            StateRestoreError: the meta is damaged, of an unknown version, or records a max parallelism
                the handle's key groups do not fit.
        """
        if self._meta is None:
            raw = self._read_meta()
            meta = SnapshotMeta.from_json_bytes(raw[_META_LEN.size :], f"{self._where} (meta)")
            groups = self._handle.key_groups
            if meta.max_parallelism is not None and groups.end >= meta.max_parallelism:
                raise StateRestoreError(
                    f"{self._where}: its handle names key groups {groups}, but the snapshot was written with "
                    f"max_parallelism {meta.max_parallelism} (key groups 0..{meta.max_parallelism - 1}); the handle "
                    "does not belong to this state file"
                )
            self._meta = meta
        return self._meta

    def recorded_max_parallelism(self) -> int | None:
        """The max parallelism the snapshot was written with: from its meta (format 2) or, for a format-1
        snapshot, from the checkpoint's metadata, of the operator one of whose subtasks lists this handle
        (whatever uid restores it). ``None`` if neither records it (a handle not in the checkpoint's metadata)."""
        recorded = self.meta().max_parallelism
        if recorded is not None:
            return recorded
        for operator in self._checkpoint.metadata.operators:
            if any(self._handle in subtask.keyed for subtask in operator.subtasks):
                return operator.max_parallelism
        return None

    def check_max_parallelism(self, max_parallelism: int) -> None:
        """Refuse to restore into another max parallelism: key groups are numbered modulo it, so the same
        number holds other keys there and restoring would lose keys without any entry looking wrong.

        Raises:
            MaxParallelismMismatchError: :meth:`recorded_max_parallelism` is another one.
        """
        recorded = self.recorded_max_parallelism()
        if recorded is not None and recorded != max_parallelism:
            raise MaxParallelismMismatchError(
                f"{self._where} was written with max_parallelism {recorded} but this backend has {max_parallelism}; "
                f"keep max_parallelism {recorded} (it cannot change across a restore) or start without state"
            )

    def _read_meta(self) -> bytes:
        """The blocks before the first key group: ``>I`` length and the meta JSON, at most
        :data:`MAX_SNAPSHOT_META` bytes (checked as the blocks arrive, not once they are all read)."""
        parts: list[bytes] = []
        held = 0
        declared: int | None = None
        try:
            for block in self._reader.iter_range(FILE_HEADER.size, self._handle.offsets[0]):
                parts.append(block)
                held += len(block)
                if declared is None and held >= _META_LEN.size:
                    head = parts[0] if len(parts[0]) >= _META_LEN.size else b"".join(parts)
                    (declared,) = _META_LEN.unpack_from(head)
                    if declared > MAX_SNAPSHOT_META:
                        raise StateRestoreError(
                            f"{self._where}: snapshot meta declares {declared} bytes, over the "
                            f"{MAX_SNAPSHOT_META}-byte limit; the state file is corrupted"
                        )
                if declared is not None and held > _META_LEN.size + declared:
                    raise StateRestoreError(
                        f"{self._where}: snapshot meta declares {declared} bytes but more precede the first key "
                        "group; the handle's offsets do not match the file"
                    )
        except StateFileError as exc:
            raise StateRestoreError(f"{self._where}: cannot read the snapshot meta: {exc}") from exc
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(raw) < _META_LEN.size:
            raise StateRestoreError(f"{self._where}: snapshot meta is truncated ({len(raw)} bytes)")
        if declared != len(raw) - _META_LEN.size:
            raise StateRestoreError(
                f"{self._where}: snapshot meta declares {declared} bytes but {len(raw) - _META_LEN.size} precede "
                "the first key group; the handle's offsets do not match the file"
            )
        return raw

    def entries(self, wanted: KeyGroupRange) -> Iterator[tuple[bytes, bytes]]:
        """``(composite key, value)`` of every key group in ``wanted`` ∩ the handle's range, in order.

        Raises:
            StateRestoreError: a block is damaged, or an entry is malformed or in the wrong key group.
        """
        for _, chunk in self.chunks(wanted):
            yield from chunk

    def chunks(self, wanted: KeyGroupRange, size: int = CHUNK_ENTRIES) -> Iterator[tuple[int, Chunk]]:
        """The entries of :meth:`entries` as ``(key group, up to size entries)`` lists, in order.

        A key group's data is parsed as its blocks arrive, about :data:`_PARSE_SLAB` bytes at a time, so
        what is held at once is a few blocks and the entries parsed from them (and an entry longer than
        that, whole), however large the key group.

        Raises:
            StateRestoreError: as :meth:`entries`, at the damaged block or entry; the entries before it
                have been returned.
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
        group = _KeyGroupData(self, kg, sids, ttl_states, size)
        try:
            for offset, raw in self._reader.iter_range_with_offsets(starts[0], end):
                while index + 1 < len(starts) and offset >= starts[index + 1]:
                    yield from group.finish()
                    index += 1
                    kg += 1
                    group = _KeyGroupData(self, kg, sids, ttl_states, size)
                yield from group.feed(raw)
        except StateFileError as exc:
            raise StateRestoreError(f"{self._where}: key groups {part}: {exc}") from exc
        yield from group.finish()

    def _parse_checked(
        self, data: bytes, pos: int, limit: int, group: _KeyGroupData, *, final: bool
    ) -> tuple[Chunk, int]:
        """The entries from ``pos`` that start before ``limit``, each checked, raising at the first bad one.

        Unless ``final``, an entry that runs past the end of ``data`` ends them (it continues in the next
        block); ``final`` means the key group's data ends there, so such an entry is an error.
        """
        key_len, value_len = _KEY_LEN.unpack_from, _VALUE_LEN.unpack_from
        kg, heads, prefix, base = group.kg, group.heads, group.prefix, group.base
        out: list[tuple[bytes, bytes]] = []
        append = out.append
        end = len(data)
        while pos < limit:
            entry = pos
            if end - pos < _KEY_LEN.size:
                if not final:
                    break
                raise self._bad(kg, base + pos, "entry header truncated")
            (kl,) = key_len(data, pos)
            pos += _KEY_LEN.size
            if kl < _MIN_KEY or kl > MAX_STORED_KEY_BYTES:
                raise self._bad(
                    kg,
                    base + pos,
                    f"entry key of {kl} bytes; composite keys have {_MIN_KEY}..{MAX_STORED_KEY_BYTES} bytes",
                )
            if end - pos < kl + _VALUE_LEN.size:
                if not final:
                    pos = entry
                    break
                raise self._bad(kg, base + pos, f"entry key of {kl} bytes does not fit")
            key = data[pos : pos + kl]
            pos += kl
            if key[:4] not in heads:
                raise self._bad_head(kg, base + pos, key, prefix)
            (vl,) = value_len(data, pos)
            pos += _VALUE_LEN.size
            if end - pos < vl:
                if not final:
                    pos = entry
                    break
                raise self._bad(kg, base + pos, f"entry value of {vl} bytes runs past the key group's data")
            append((key, data[pos : pos + vl]))
            pos += vl
        return out, pos

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
        start = self._handle.offsets[kg - self._handle.key_groups.start]
        return StateRestoreError(
            f"{self._where}: key group {kg}, byte {pos} of its data (which starts at file offset {start}): {what}"
        )


class _KeyGroupData:
    """One key group's data, parsed into entries as its blocks arrive.

    Blocks are held until about :data:`_PARSE_SLAB` bytes are (a key group of one block is parsed whole,
    once, as before), then the entries that start in each slab are parsed and returned, and only an
    entry that continues in the next block is kept back: the bytes held are at most a slab, one block
    and that entry, however large the key group is.
    """

    def __init__(
        self, reader: KeyedSnapshotReader, kg: int, sids: list[bytes], ttl_states: dict[bytes, StateMeta], size: int
    ) -> None:
        self.reader = reader
        self.kg = kg
        self.prefix = _KEY_LEN.pack(kg)
        self.heads = frozenset(self.prefix + sid for sid in sids)  # key group and state id: the first 4 key bytes
        self.ttl_states = ttl_states
        self.size = size
        self.base = 0
        """Where the held bytes start in the key group's data (for error messages)."""
        self._pending: list[bytes] = []
        self._held = 0
        self._need = _PARSE_SLAB

    def feed(self, block: bytes) -> Iterator[tuple[int, Chunk]]:
        self._pending.append(block)
        self._held += len(block)
        if self._held >= self._need:
            yield from self._parse(final=False)

    def finish(self) -> Iterator[tuple[int, Chunk]]:
        """The rest of the entries: the key group's data ends here."""
        if self._held:
            yield from self._parse(final=True)

    def _parse(self, *, final: bool) -> Iterator[tuple[int, Chunk]]:
        """Two fast parsers run first; on anything unexpected, :meth:`KeyedSnapshotReader._parse_checked`
        parses again to raise the error at the entry where it is."""
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        heads, size = self.heads, self.size
        pos, end = 0, len(data)
        while pos < end:
            limit = min(end, pos + _PARSE_SLAB)
            found = _uniform_prefix(data, pos, limit, heads) or _variable_prefix(data, pos, limit, heads)
            if found is None:
                found = self.reader._parse_checked(data, pos, limit, self, final=final)
            out, stop = found
            if out:
                if self.ttl_states:
                    self.reader._check_ttl_values(out, self.kg, self.ttl_states)
                for start in range(0, len(out), size):
                    yield self.kg, out if start == 0 and len(out) <= size else out[start : start + size]
            if stop == pos:
                break  # the entry at ``pos`` is not complete in ``data``
            pos = stop
        rest = end - pos
        if rest and final:
            self.reader._parse_checked(data, pos, end, self, final=True)  # raises at that entry
            raise AssertionError("unreachable: an incomplete entry passed the checked parser")
        self.base += pos
        self._held = rest
        self._need = _PARSE_SLAB
        if rest:
            tail = data[pos:]
            self._pending = [tail]
            # An entry longer than a slab is parsed once it is all here (no re-joining per block); its
            # header is checked now, so a bad one does not make us gather the rest of the key group.
            self.reader._parse_checked(tail, 0, 1, self, final=False)
            if rest >= 6 + (kl := _KEY_LEN.unpack_from(tail)[0]):
                self._need = max(_PARSE_SLAB, 6 + kl + _VALUE_LEN.unpack_from(tail, 2 + kl)[0])
