"""The key-value engine under the keyed backend: what LMDB and the heap both provide.

Keys are the composite state keys of ``docs/format.md`` (``>H`` key group first, so a key group is
one contiguous, sorted range). The state types (value, list, map, ...) are written once against this
interface in ``keystate.statebackend._states``; the engines only store bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from itertools import islice

from keystate.storage.format.keygroups import KeyGroupRange

__all__ = ["CHUNK_ENTRIES", "Chunk", "Columns", "KVSnapshot", "KVStore"]

Chunk = list[tuple[bytes, bytes]]
"""Restored entries, all of one key group."""
Columns = tuple[list[bytes], list[bytes]]
"""Entries as a list of keys and the list of their values."""
CHUNK_ENTRIES = 4096
"""Entries per chunk in snapshots and restores: large enough that per-chunk work vanishes, small
enough that a chunk of small entries stays well under a block."""


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

    @abstractmethod
    def release(self) -> None:
        """Free the view (idempotent)."""


class KVStore(ABC):
    """Byte keys to byte values, sorted. Used by a single thread, except snapshots."""

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
