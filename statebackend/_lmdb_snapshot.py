"""The snapshot view of the LMDB engine (``_lmdb.LmdbKV.snapshot``): a read transaction, whose MVCC view
stays stable while the task goes on writing, and the frozen write-back layers that transaction does not
see yet, read on top of it from the snapshot's own thread."""

from __future__ import annotations

import bisect
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import lmdb

from keystate.statebackend._kv import CHUNK_ENTRIES, KVSnapshot, sorted_in_slices
from keystate.statebackend._lmdb_layers import MISSING, Buffer, Layer, merged, merged_chunks, resolve, split_key_groups
from keystate.statebackend.errors import StateError
from keystate.storage.format.keygroups import KeyGroupRange

__all__ = ["LmdbSnapshot", "SnapshotOwner"]

_KG = struct.Struct(">H")
_MISSING: Any = MISSING


class SnapshotOwner(Protocol):
    """What a snapshot needs of its engine (``LmdbKV``)."""

    @property
    def path(self) -> Path: ...

    db: Any

    def snapshot_released(self) -> None: ...


def _sorted_keys(layers: tuple[Layer, ...]) -> list[bytes]:
    """The sorted union of the layers' keys (for a snapshot, in its own thread)."""
    if len(layers) == 1 and layers[0].runs is not None and len(layers[0].runs) == 1:
        return layers[0].runs[0]
    return sorted_in_slices(set().union(*(layer.data for layer in layers)))


class LmdbSnapshot(KVSnapshot):
    """An LMDB read transaction plus the frozen layers it does not see yet, read merged; any thread."""

    def __init__(self, owner: SnapshotOwner, txn: Any, layers: tuple[Layer, ...]) -> None:
        self._owner = owner
        self._txn: Any = txn
        self._frozen = layers
        self._layers: tuple[Buffer, ...] = tuple(layer.data for layer in layers)
        self._keys: list[bytes] | None = None
        self._lock = threading.Lock()

    def _view(self) -> Any:
        with self._lock:
            txn = self._txn
        if txn is None:
            raise StateError("LMDB snapshot already released")
        return txn

    def _unreadable(self, exc: lmdb.Error) -> StateError:
        return StateError(
            f"LMDB snapshot of {self._owner.path} cannot be read ({exc}); was the backend closed before "
            "the snapshot was written?"
        )

    def iter_key_group(self, key_group: int) -> Iterator[tuple[bytes, bytes]]:
        txn = self._view()
        lo = _KG.pack(key_group)
        hi = _KG.pack(key_group + 1) if key_group < 0xFFFF else None
        try:
            cursor = txn.cursor(db=self._owner.db)
            if not self._layers:
                if not cursor.set_range(lo):
                    return
                for key, value in cursor.iternext():
                    if hi is not None and key >= hi:
                        return
                    yield key, value
                return
            if self._keys is None:
                self._keys = _sorted_keys(self._frozen)  # once per snapshot, in its own thread
            yield from merged(cursor, self._layers, lo, hi, self._keys)
        except lmdb.Error as exc:
            raise self._unreadable(exc) from exc

    def iter_chunks(
        self, key_groups: KeyGroupRange, size: int = CHUNK_ENTRIES
    ) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
        # One pass over the whole range, a chunk at a time: no Python step per entry.
        txn = self._view()
        lo = _KG.pack(key_groups.start)
        hi = _KG.pack(key_groups.end + 1) if key_groups.end < 0xFFFF else None
        try:
            key_cursor, value_cursor = txn.cursor(db=self._owner.db), txn.cursor(db=self._owner.db)
            cursors: tuple[Iterator[bytes], Iterator[bytes]] = (iter(()), iter(()))
            if key_cursor.set_range(lo) and value_cursor.set_range(lo):
                cursors = key_cursor.iternext(values=False), value_cursor.iternext(keys=False)
            keys: list[bytes] = []
            if self._layers:
                if self._keys is None:
                    self._keys = _sorted_keys(self._frozen)
                first = bisect.bisect_left(self._keys, lo)
                keys = self._keys[first : len(self._keys) if hi is None else bisect.bisect_left(self._keys, hi)]
            for ks, vs in merged_chunks(cursors, self._layers, keys, hi, size):
                yield from split_key_groups(ks, vs)
        except lmdb.Error as exc:
            raise self._unreadable(exc) from exc

    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        txn = self._view()
        try:
            stored: list[bytes | None] = list(map(txn.get, keys))
        except lmdb.Error as exc:
            raise self._unreadable(exc) from exc
        layers = self._layers
        if not layers:
            return stored
        out: list[bytes | None] = []
        for key, base in zip(keys, stored, strict=True):
            value = resolve(layers, key, _MISSING if base is None else base)
            out.append(None if value is _MISSING or value is None else bytes(value))
        return out

    def release(self) -> None:
        with self._lock:
            txn, self._txn = self._txn, None
        if txn is not None:
            txn.abort()
            self._owner.snapshot_released()
