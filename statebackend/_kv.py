"""The key-value engine under the keyed backend: what LMDB and the heap both provide.

Keys are the composite state keys of ``docs/format.md`` (``>H`` key group first, so a key group is
one contiguous, sorted range). The state types (value, list, map, ...) are written once against this
interface in ``statebackend._states``; the engines only store bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

__all__ = ["KVSnapshot", "KVStore"]


class KVSnapshot(ABC):
    """A consistent, immutable view of the store taken in O(1); readable from any thread."""

    @abstractmethod
    def iter_key_group(self, key_group: int) -> Iterator[tuple[bytes, bytes]]:
        """Entries of one key group in key order."""

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
    def bulk_load(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Insert entries during restore (into an empty key range); returns how many."""

    @abstractmethod
    def close(self) -> None: ...
