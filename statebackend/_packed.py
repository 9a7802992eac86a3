"""Restored entries left packed as the keyed snapshot payload holds them, unpacked as they are iterated.

A run of entries that all have one key length and one value length (a fixed-size state: the common
case) is checked in a few C calls by ``_snapshot_reader._uniform_prefix`` without decoding it. Decoding it into
a list would create every entry's tuple and bytes at once, and the bulk load that follows would touch
them again after they left the cache and free them later still: for small entries that costs more than
LMDB's own puts. :class:`PackedEntries` keeps the run as a view of the decompressed bytes instead and
decodes it with ``struct.iter_unpack`` while it is iterated, so py-lmdb's ``Cursor.putmulti`` takes
each ``(key, value)`` as it is made and drops it at once (one C loop, no Python step per entry).

A chain restore applies its deltas' changes to such a run: :class:`PatchedEntries` is the run with its
changes, merged only if a consumer reads it as entries; LMDB's bulk load instead puts the run as it is
(appending), then the changes over it, and deletes the tombstoned keys, all in the same transaction.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator, Sequence
from typing import Any, cast, overload

__all__ = ["Change", "PackedEntries", "PatchedEntries", "apply_changes"]

Change = tuple[bytes, bytes | None]
"""A delta's entry: a key and its whole value now, or ``None`` (a tombstone: the key has no value now)."""
Entry = tuple[bytes, bytes]


class PackedEntries(Sequence[Entry]):
    """``count`` entries of ``entry`` (``>2x{key length}s4x{value length}s``: ``>H key length | key | >I
    value length | value``, the length fields skipped) packed one after another in ``view``.

    An immutable sequence of ``(key, value)`` like a restored chunk list; every read decodes from
    ``view`` again, so it is cheap to hold and to slice (a slice is a view) and each iteration makes
    the entries anew. The caller has checked the run (lengths, key heads): decoding cannot fail.
    """

    __slots__ = ("_count", "_entry", "_view")

    def __init__(self, view: memoryview, entry: struct.Struct, count: int) -> None:
        if len(view) != count * entry.size:
            raise ValueError(f"{count} entries of {entry.size} bytes do not fill {len(view)} bytes")
        self._view = view
        self._entry = entry
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return cast(Iterator[tuple[bytes, bytes]], self._entry.iter_unpack(self._view))

    @overload
    def __getitem__(self, index: int) -> tuple[bytes, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[bytes, bytes]]: ...

    def __getitem__(self, index: int | slice) -> tuple[bytes, bytes] | Sequence[tuple[bytes, bytes]]:
        size = self._entry.size
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step != 1:
                return list(self)[index]
            stop = max(start, stop)
            return PackedEntries(self._view[start * size : stop * size], self._entry, stop - start)
        i = index + self._count if index < 0 else index
        if not 0 <= i < self._count:
            raise IndexError(f"entry {index} of {self._count}")
        return cast(tuple[bytes, bytes], self._entry.unpack_from(self._view, i * size))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedEntries | list | tuple):
            return len(self) == len(other) and list(self) == list(cast(Sequence[Any], other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compares by content, like the list it stands for

    def __repr__(self) -> str:
        return f"PackedEntries({self._count} entries of {self._entry.size} bytes)"


class PatchedEntries(Sequence[Entry]):
    """The sorted entries of ``base`` with ``changes`` (sorted by key, each key once, newer than the base)
    applied: a change replaces or adds its key's entry, a tombstone (``dead``: there may be some) removes it.

    Read as a sequence it is the merged entries (merged on first use, then held). An engine that can
    apply the parts itself reads :attr:`base`, :meth:`puts` and :meth:`deletes` and merges nothing.
    """

    __slots__ = ("_merged", "base", "changes", "dead")

    def __init__(self, base: PackedEntries, changes: list[Change], dead: bool) -> None:
        self.base = base
        self.changes = changes
        self.dead = dead
        self._merged: list[Entry] | None = None

    def puts(self) -> list[Entry]:
        """The changes that give a key a value."""
        if not self.dead:
            return cast(list[Entry], self.changes)
        return [(key, value) for key, value in self.changes if value is not None]

    def deletes(self) -> list[bytes]:
        """The keys the changes remove (whether or not :attr:`base` has them)."""
        return [key for key, value in self.changes if value is None] if self.dead else []

    def merged(self) -> list[Entry]:
        if self._merged is None:
            self._merged = apply_changes(self.base, self.changes, self.dead)
        return self._merged

    def __bool__(self) -> bool:
        if not self.dead or any(value is not None for _, value in self.changes):
            return bool(self.base) or bool(self.changes)  # nothing is removed, or a change adds a value
        return len(self.base) > len(self.changes) or bool(self.merged())

    def __len__(self) -> int:
        return len(self.merged())

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.merged())

    @overload
    def __getitem__(self, index: int) -> Entry: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Entry]: ...

    def __getitem__(self, index: int | slice) -> Entry | Sequence[Entry]:
        return self.merged()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedEntries | PatchedEntries | list | tuple):
            return list(self) == list(cast(Sequence[Any], other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PatchedEntries({self.base!r} with {len(self.changes)} changes)"


_DICT_MERGE = 2
"""A base chunk gets its changes by bisection when it has more than this many entries per change, else
by one dict merge (C loops, no Python step per entry, but one per entry of the chunk)."""


def apply_changes(chunk: Sequence[Entry], changes: list[Change], dead: bool) -> list[Entry]:
    """``chunk`` (sorted entries) with ``changes`` (sorted, ``dead``: some are tombstones) applied."""
    if len(changes) * _DICT_MERGE < len(chunk):
        out = list(chunk)
        size = hi = len(out)
        # From the end: an insertion or deletion at i moves no position below i, which is all that is
        # left to visit.
        for change in reversed(changes):
            key = change[0]
            hi = i = bisect.bisect_left(out, (key,), 0, hi)
            found = i < size and out[i][0] == key
            if change[1] is None:
                if found:
                    del out[i]
            elif found:
                out[i] = cast(Entry, change)
            else:
                out.insert(i, cast(Entry, change))
        return out
    merged: dict[bytes, bytes | None] = dict(chunk)
    size = len(merged)
    merged.update(changes)
    if dead:
        for key in [key for key, value in changes if value is None]:
            del merged[key]
    elif len(merged) == size:  # only replacements: the dict keeps the chunk's order
        return cast(list[Entry], list(merged.items()))
    # The chunk's keys in order, then the new ones in order: two runs, which the sort merges.
    return cast(list[Entry], sorted(merged.items()))
