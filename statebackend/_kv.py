"""The key-value engine under the keyed backend: what LMDB and the heap both provide.

Keys are the composite state keys of ``docs/format.md`` (``>H`` key group first, so a key group is
one contiguous, sorted range). The state types (value, list, map, ...) are written once against this
interface in ``keystate.statebackend._states``; the engines only store bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Sequence
from itertools import islice

from keystate.storage.format.keygroups import KeyGroupRange

__all__ = ["CHUNK_ENTRIES", "Chunk", "Columns", "KVSnapshot", "KVStore", "sorted_in_slices"]

Chunk = Sequence[tuple[bytes, bytes]]
"""Restored entries, all of one key group."""
Columns = tuple[list[bytes], list[bytes]]
"""Entries as a list of keys and the list of their values."""
CHUNK_ENTRIES = 4096
"""Entries per chunk in snapshots and restores: large enough that per-chunk work vanishes, small
enough that a chunk of small entries stays well under a block."""
_SORT_SLICE = 8192
"""Keys sorted by one ``sorted()`` call in :func:`sorted_in_slices` (a millisecond or two)."""


def sorted_in_slices(keys: Collection[bytes]) -> list[bytes]:
    """``sorted(keys)`` for background threads, in C calls that each hold the GIL briefly: slices of
    :data:`_SORT_SLICE` keys are sorted, then merged pairwise (timsort merges two sorted runs in one pass).
    One ``sorted()`` of 100,000 keys holds the GIL for 30-60 ms, which stalls the event loop for as long."""
    if len(keys) <= _SORT_SLICE:
        return sorted(keys)
    items = list(keys)
    runs = [sorted(items[i : i + _SORT_SLICE]) for i in range(0, len(items), _SORT_SLICE)]
    while len(runs) > 1:
        runs = [sorted(runs[i] + runs[i + 1]) if i + 1 < len(runs) else runs[i] for i in range(0, len(runs), 2)]
    return runs[0]


class KVSnapshot(ABC):
    """A consistent, immutable view of the store taken in O(1); readable from any thread."""

    @abstractmethod
    def iter_key_group(self, key_group: int) -> Iterator[tuple[bytes, bytes]]:
        """Entries of one key group in key order."""

    def iter_chunks(
        self, key_groups: KeyGroupRange, size: int = CHUNK_ENTRIES
    ) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
        """``(key group, keys, values)`` in key order over ``key_groups``; at most ``size`` entries each.

        A key group may come in several chunks; one without entries may be left out. The entries are
        those of :meth:`iter_key_group`; engines override this to avoid a Python step per entry.
        """
        for kg in key_groups:
            entries = self.iter_key_group(kg)
            while chunk := list(islice(entries, size)):
                yield kg, [k for k, _ in chunk], [v for _, v in chunk]

    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (sorted) in this view; ``None`` where a key has none. Engines override
        this with point reads; this one reads the key groups of the keys."""
        found: dict[bytes, bytes] = {}
        for kg in sorted({(k[0] << 8) | k[1] for k in keys}):
            found.update(self.iter_key_group(kg))
        return [found.get(k) for k in keys]

    @abstractmethod
    def release(self) -> None:
        """Free the view (idempotent)."""


class KVStore(ABC):
    """Byte keys to byte values, sorted. Used by a single thread, except snapshots.

    Change tracking (for incremental snapshots): once :meth:`take_changes` was called, every key an engine
    puts, deletes or appends to is added to :attr:`changes` (restores are not changes).
    """

    changes: set[bytes] | None = None
    """The keys changed since the last :meth:`take_changes`; ``None`` while not tracking."""

    def take_changes(self) -> set[bytes]:
        """The keys changed since the previous call, and a fresh set for the next ones: O(1). The first
        call starts tracking (and returns an empty set)."""
        taken = self.changes
        self.changes = set()
        return set() if taken is None else taken

    def stop_tracking(self) -> None:
        """Stop recording changed keys (and forget the recorded ones)."""
        self.changes = None

    @abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def put(self, key: bytes, value: bytes) -> None: ...

    @abstractmethod
    def delete(self, key: bytes) -> None: ...

    @abstractmethod
    def append(self, key: bytes, data: bytes) -> None:
        """Set the value to the existing value (or nothing) followed by ``data`` (list-state merge)."""

    @abstractmethod
    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every entry whose key starts with ``prefix`` (which includes the key group), in key order."""

    @abstractmethod
    def delete_prefix(self, prefix: bytes) -> int:
        """Delete every entry whose key starts with ``prefix``; returns how many."""

    @abstractmethod
    def snapshot(self) -> KVSnapshot: ...

    @abstractmethod
    def bulk_load_chunks(self, chunks: Iterable[tuple[int, Chunk]]) -> int:
        """Insert restored ``(key group, entries)`` chunks (every entry of a chunk is in that key group);
        returns how many entries."""

    @abstractmethod
    def close(self) -> None: ...
