"""The LMDB engine: a sorted write-back buffer in front of an LMDB environment.

Writes go to an in-memory buffer (read-your-own-writes: reads look in the buffer first). When the
buffer passes its bound it is frozen and flushed into LMDB in one write transaction, in key order:
random puts into LMDB's B+tree run about 12x slower than sorted ones, so sorting first is what makes
this engine faster than py-lmdb used directly. LMDB runs with ``sync=False``: durability comes from
checkpoints, not from the local store.

Snapshots are O(1) on the task thread: the active buffer is frozen (never mutated again), a read
transaction is opened (LMDB's MVCC keeps that view stable), and the snapshot reads the frozen
buffers on top of the transaction from any thread while processing continues. Frozen buffers are
flushed later by the task thread; only the task thread writes to LMDB, so LMDB's single-writer rule
holds without locks on the hot path.

The map size grows on demand: when a flush finds the map full and no snapshot holds a read
transaction, the map size doubles (py-lmdb invalidates open transactions on resize, so growth is
deferred, never waited for, until no snapshot is open; until then the frozen buffers stay in memory
and reads remain correct).
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import lmdb

from keystate.statebackend._kv import CHUNK_ENTRIES, Chunk, Columns, KVSnapshot, KVStore
from keystate.statebackend._lmdb_env import MAX_READERS, DirectoryLock, lmdb_error
from keystate.statebackend.errors import LmdbError, LmdbMapFullError, StateError
from keystate.storage.format.keygroups import KeyGroupRange

__all__ = ["LMDB_LAYOUT_VERSION", "LmdbKV"]

log = logging.getLogger(__name__)

LMDB_LAYOUT_VERSION = b"1"
_KG = struct.Struct(">H")
_LOAD_BATCH = 50_000
"""Restored entries per LMDB write transaction."""
_MISSING: Any = object()


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (``None``: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class _Append:
    """Pending list-state appends on top of whatever the lower layers hold."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)


# A buffer maps a key to: bytes/bytearray (the full value), None (deleted), or _Append.
Buffer = dict[bytes, Any]


def _resolve(layers: Iterable[Buffer], key: bytes, base: Any) -> Any:
    """Apply the layers (oldest first) for ``key`` on top of ``base`` (bytes, None or _MISSING)."""
    value = base
    for layer in layers:
        v = layer.get(key, _MISSING)
        if v is _MISSING:
            continue
        if v.__class__ is _Append:
            value = (b"" if value is _MISSING or value is None else bytes(value)) + bytes(v.data)
        else:
            value = v
    return value


def _merged(
    cursor: Any, layers: tuple[Buffer, ...], lo: bytes, hi: bytes | None, keys: list[bytes] | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """Entries in ``[lo, hi)`` of LMDB (through ``cursor``) with ``layers`` (oldest first) applied.

    ``keys``, if given, is the sorted union of the layers' keys (a snapshot computes it once instead
    of once per key group).
    """
    if keys is None:
        overlay = sorted({k for layer in layers for k in layer if k >= lo and (hi is None or k < hi)})
    else:
        overlay = keys[bisect.bisect_left(keys, lo) : len(keys) if hi is None else bisect.bisect_left(keys, hi)]
    stored: Iterator[tuple[bytes, bytes]] = iter(())
    if cursor.set_range(lo):
        stored = cursor.iternext()
    pending = next(stored, None)
    for key in overlay:
        while pending is not None and pending[0] < key:
            if hi is not None and pending[0] >= hi:
                pending = None
                break
            yield pending
            pending = next(stored, None)
        base: Any = _MISSING
        if pending is not None and pending[0] == key:
            base = pending[1]
            pending = next(stored, None)
        value = _resolve(layers, key, base)
        if value is not _MISSING and value is not None:
            yield key, bytes(value)
    while pending is not None and (hi is None or pending[0] < hi):
        yield pending
        pending = next(stored, None)


def _overlay(ks: list[bytes], vs: list[bytes], layers: tuple[Buffer, ...], keys: list[bytes]) -> Columns:
    """LMDB's entries ``ks``/``vs`` with ``layers`` applied for ``keys`` (sorted: every key of the layers in
    the chunk's key range). Few keys: in place, by bisection; many: through a dict and one sort."""
    if len(keys) * 8 > len(ks):
        merged = dict(zip(ks, vs, strict=True))
        for key in keys:
            value = _resolve(layers, key, merged.get(key, _MISSING))
            if value is _MISSING or value is None:
                merged.pop(key, None)
            else:
                merged[key] = bytes(value)
        ks = sorted(merged)
        return ks, list(map(merged.__getitem__, ks))
    for key in reversed(keys):  # from the end, so an insertion or deletion moves no position still to visit
        i = bisect.bisect_left(ks, key)
        found = i < len(ks) and ks[i] == key
        value = _resolve(layers, key, vs[i] if found else _MISSING)
        if value is _MISSING or value is None:
            if found:
                del ks[i], vs[i]
        elif found:
            vs[i] = bytes(value)
        else:
            ks.insert(i, key)
            vs.insert(i, bytes(value))
    return ks, vs


def _merged_chunks(
    cursors: tuple[Iterator[bytes], Iterator[bytes]],
    layers: tuple[Buffer, ...],
    keys: list[bytes],
    hi: bytes | None,
    size: int,
) -> Iterator[Columns]:
    """Sorted chunks of LMDB's entries below ``hi`` with ``layers`` applied. ``cursors`` iterate LMDB's
    keys and values in step (two plain iterators cost less than one of tuples); ``keys`` is the sorted
    union of the layers' keys in the same range."""
    key_iter, value_iter = cursors
    done_keys = 0
    while True:
        ks = list(islice(key_iter, size))
        vs = list(islice(value_iter, size))
        last = len(ks) < size
        if hi is not None and ks and ks[-1] >= hi:
            cut = bisect.bisect_left(ks, hi)
            del ks[cut:], vs[cut:]
            last = True
        upto = len(keys) if last else bisect.bisect_right(keys, ks[-1], done_keys)
        if upto > done_keys:
            ks, vs = _overlay(ks, vs, layers, keys[done_keys:upto])
            done_keys = upto
        if len(ks) <= size:
            if ks:
                yield ks, vs
        else:  # the layers added entries: keep chunks at most `size` long
            for start in range(0, len(ks), size):
                yield ks[start : start + size], vs[start : start + size]
        if last:
            return


def _split_key_groups(ks: list[bytes], vs: list[bytes]) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """``(key group, keys, values)`` runs of a sorted chunk that may span key groups."""
    start, n = 0, len(ks)
    while start < n:
        first = ks[start]
        kg = (first[0] << 8) | first[1]
        end = n if kg == 0xFFFF else bisect.bisect_left(ks, _KG.pack(kg + 1), start)
        if start == 0 and end == n:
            yield kg, ks, vs
        else:
            yield kg, ks[start:end], vs[start:end]
        start = end


class _LmdbSnapshot(KVSnapshot):
    def __init__(self, owner: LmdbKV, txn: Any, layers: tuple[Buffer, ...]) -> None:
        self._owner = owner
        self._txn: Any = txn
        self._layers = layers
        self._keys: list[bytes] | None = None
        self._lock = threading.Lock()

    def iter_key_group(self, key_group: int) -> Iterator[tuple[bytes, bytes]]:
        with self._lock:
            txn = self._txn
        if txn is None:
            raise StateError("LMDB snapshot already released")
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
                self._keys = sorted(set().union(*self._layers))  # once per snapshot, in its own thread
            yield from _merged(cursor, self._layers, lo, hi, self._keys)
        except lmdb.Error as exc:
            raise StateError(
                f"LMDB snapshot of {self._owner.path} cannot be read ({exc}); was the backend closed before "
                "the snapshot was written?"
            ) from exc

    def iter_chunks(
        self, key_groups: KeyGroupRange, size: int = CHUNK_ENTRIES
    ) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
        # One pass over the whole range, a chunk at a time: no Python step per entry.
        with self._lock:
            txn = self._txn
        if txn is None:
            raise StateError("LMDB snapshot already released")
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
                    self._keys = sorted(set().union(*self._layers))
                first = bisect.bisect_left(self._keys, lo)
                keys = self._keys[first : len(self._keys) if hi is None else bisect.bisect_left(self._keys, hi)]
            for ks, vs in _merged_chunks(cursors, self._layers, keys, hi, size):
                yield from _split_key_groups(ks, vs)
        except lmdb.Error as exc:
            raise StateError(
                f"LMDB snapshot of {self._owner.path} cannot be read ({exc}); was the backend closed before "
                "the snapshot was written?"
            ) from exc

    def release(self) -> None:
        with self._lock:
            txn, self._txn = self._txn, None
        if txn is not None:
            txn.abort()
            self._owner.snapshot_released()


class LmdbKV(KVStore):
    """An LMDB environment in ``path`` behind a sorted write-back buffer.

    Args:
        path: a directory for the environment (created; should be empty or a previous environment).
            It is locked for this store's lifetime (``keystate.lock`` in it): one store per directory.
        map_size: the initial map size in bytes; it doubles on demand.
        buffer_entries: flush the buffer when it holds this many keys.
        buffer_bytes: or when its keys and values add up to this many bytes.
        writemap: LMDB ``MDB_WRITEMAP`` (faster random writes, data file sized to the map).
        owner: who holds the directory, for the message another opener gets (``"operator 'x' subtask 0"``).

    Raises:
        LmdbDirectoryInUseError: another store, in this process or another, holds ``path``.
        LmdbError: the environment cannot be created or opened (permissions, disk full, ...).
        StateError: the environment has another state layout version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = 256 << 20,
        buffer_entries: int = 100_000,
        buffer_bytes: int = 64 << 20,
        writemap: bool = False,
        owner: str = "",
    ) -> None:
        self._path = Path(path)
        self._dir_lock = DirectoryLock(self._path, owner)  # before LMDB opens it: LMDB lets processes share it
        env: Any = None
        try:
            env = lmdb.open(
                str(self._path),
                map_size=map_size,
                subdir=True,
                sync=False,
                metasync=False,
                max_dbs=2,
                readahead=False,
                writemap=writemap,
                meminit=False,
                max_readers=MAX_READERS,
            )
            self.db: Any = env.open_db(b"state")
            meta = env.open_db(b"meta")
            with env.begin(write=True, db=meta) as txn:
                found = txn.get(b"layout")
                if found is None:
                    txn.put(b"layout", LMDB_LAYOUT_VERSION)
                left_over: int = txn.stat(self.db)["entries"]
        except (lmdb.Error, OSError) as exc:
            if env is not None:
                env.close()
            self._dir_lock.release()
            raise lmdb_error(exc, self._path, "open the LMDB environment in") from exc
        self._env: Any = env
        if found is not None and found != LMDB_LAYOUT_VERSION:
            self._env.close()
            self._dir_lock.release()
            raise StateError(
                f"LMDB environment {self._path} has state layout {found!r}, this keystate writes "
                f"{LMDB_LAYOUT_VERSION!r}; remove the directory (state is restored from checkpoints)"
            )
        self._left_over = left_over
        """Entries an earlier owner left in the environment while nothing has been written since: a restore
        discards them first (:meth:`begin_restore`), so it yields exactly the checkpoint's state."""
        self._max_entries = buffer_entries
        self._max_bytes = buffer_bytes
        self._active: Buffer = {}
        self._active_bytes = 0
        self._frozen: list[Buffer] = []
        self._flush_due = False
        self._reader: Any = None
        self._lock = threading.Condition()
        self._snapshots_open = 0
        self._closed = False
        self._broken: str | None = None
        """Why the environment cannot be used any more (py-lmdb invalidates it when a resize fails)."""

    @property
    def path(self) -> Path:
        return self._path

    @property
    def map_size(self) -> int:
        return int(self._env.info()["map_size"])

    # --- reads ---------------------------------------------------------------------------------------

    def _read(self, key: bytes) -> bytes | None:
        reader = self._reader
        if reader is None:
            reader = self._begin_read()
        value: bytes | None = reader.get(key)
        return value

    def _begin_read(self) -> Any:
        """The task thread's read transaction, opened again after each flush."""
        self._check_open()
        try:
            self._reader = self._env.begin(db=self.db)
        except lmdb.Error as exc:
            raise self._error(exc, "read from the LMDB environment in") from exc
        return self._reader

    def _check_open(self) -> None:
        if self._closed or self._broken:
            raise self._closed_error()

    def _closed_error(self) -> StateError:
        if self._broken and not self._closed:
            return LmdbError(
                f"the LMDB environment in {self._path} cannot be used any more: {self._broken}; close the backend "
                "and restore from the last checkpoint (with a larger map_size)"
            )
        return StateError(f"the LMDB environment in {self._path} is closed; its backend was closed before this use")

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def get(self, key: bytes) -> bytes | None:
        v = self._active.get(key, _MISSING)
        cls = v.__class__
        if cls is bytes:
            value: bytes = v
            return value
        if v is None:
            return None
        if cls is bytearray:
            return bytes(v)
        if v is _MISSING and not self._frozen:
            reader = self._reader  # _read() inlined: this is the hot path of a read that misses the buffer
            if reader is None:
                reader = self._begin_read()
            stored: bytes | None = reader.get(key)
            return stored
        base = self._lower(key)
        if cls is _Append:
            return (base or b"") + bytes(v.data)
        return base

    def _lower(self, key: bytes) -> bytes | None:
        """The value below the active buffer: frozen buffers (newest first) over LMDB."""
        suffixes: list[bytearray] = []
        base: Any = _MISSING
        for layer in reversed(self._frozen):
            v = layer.get(key, _MISSING)
            if v is _MISSING:
                continue
            if v.__class__ is _Append:
                suffixes.append(v.data)
                continue
            base = v
            break
        if base is _MISSING:
            base = self._read(key)
        if not suffixes:
            return None if base is None else bytes(base)
        return (b"" if base is None else bytes(base)) + b"".join(reversed(suffixes))

    # --- writes --------------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        self._active[key] = value
        self._active_bytes += len(key) + len(value)
        if self._flush_due or len(self._active) >= self._max_entries or self._active_bytes >= self._max_bytes:
            self.flush()

    def delete(self, key: bytes) -> None:
        self._active[key] = None
        self._active_bytes += len(key)
        if self._flush_due or len(self._active) >= self._max_entries:
            self.flush()

    def append(self, key: bytes, data: bytes) -> None:
        v = self._active.get(key, _MISSING)
        if v is _MISSING:
            self._active[key] = _Append(data)
        elif v is None:
            self._active[key] = bytearray(data)
        elif v.__class__ is bytes:
            self._active[key] = bytearray(v) + data
        elif v.__class__ is bytearray:
            v += data
        else:
            v.data += data
        self._active_bytes += len(data)
        if self._flush_due or len(self._active) >= self._max_entries or self._active_bytes >= self._max_bytes:
            self.flush()

    def flush(self) -> bool:
        """Write every buffered change into LMDB (task thread only).

        Returns:
            True if everything was written; False if the map is full and cannot grow while a
            snapshot holds a read transaction (the changes stay buffered and reads stay correct).
        """
        self._flush_due = False
        if self._active:
            self._frozen.append(self._active)
            self._active = {}
            self._active_bytes = 0
        while self._frozen:
            try:
                self._write_layer(self._frozen[0])
            except lmdb.MapFullError:
                # Never wait for snapshots here: the task thread may be the one that writes or
                # releases them later, so waiting could deadlock. The layers stay readable in memory.
                if self._grow(wait=False):
                    continue
                return False
            except lmdb.Error as exc:  # the layer stays buffered: a later flush may succeed (disk freed)
                raise self._error(exc, "write to the LMDB environment in") from exc
            self._frozen.pop(0)
            self._left_over = 0
            self._drop_reader()
        return True

    def _error(self, exc: lmdb.Error | OSError, action: str) -> StateError:
        """What an LMDB call that failed while trying to ``action`` raises."""
        if self._closed or self._broken:
            return self._closed_error()
        try:
            size: int | None = self.map_size
        except lmdb.Error:
            size = None
        return lmdb_error(exc, self._path, action, map_size=size)

    def _write_layer(self, layer: Buffer) -> None:
        # A layer holds one change per key, so changes to different keys commute: plain values go in one
        # sorted putmulti (no Python call per entry), deletes and appends one by one after it.
        keys = sorted(layer)  # sorting the keys alone is ~2x faster than sorting (key, value) pairs
        kinds = set(map(type, layer.values()))
        with self._env.begin(write=True, db=self.db) as txn:
            if bytes in kinds:
                plain = (
                    zip(keys, map(layer.__getitem__, keys), strict=True)
                    if len(kinds) == 1
                    else [(key, v) for key in keys if (v := layer[key]).__class__ is bytes]
                )
                txn.cursor().putmulti(plain, dupdata=False, overwrite=True)
                if len(kinds) == 1:
                    return
            for key in keys:
                v = layer[key]
                if v.__class__ is bytes:
                    continue
                if v is None:
                    txn.delete(key)
                elif v.__class__ is _Append:
                    base = txn.get(key)
                    txn.put(key, (base or b"") + v.data)
                else:
                    txn.put(key, v)

    def _grow(self, *, wait: bool) -> bool:
        with self._lock:
            if self._snapshots_open and wait:
                log.warning("LMDB map of %s is full; waiting for running snapshots before growing it", self._path)
                self._lock.wait_for(lambda: self._snapshots_open == 0)
            if self._snapshots_open:
                return False
            self._drop_reader()
            new_size = self.map_size * 2
            try:
                self._env.set_mapsize(new_size)
            except lmdb.Error as exc:
                self._broken = f"growing its map to {new_size >> 20} MiB failed ({exc})"
                raise LmdbMapFullError(
                    f"cannot write to the LMDB environment in {self._path}: its map is full at {new_size >> 21} MiB "
                    f"and growing it to {new_size >> 20} MiB failed ({exc}); raise map_size "
                    "(LmdbStateBackend(map_size=...)) or free memory or address space for the mapping"
                ) from exc
        log.info("LMDB map of %s grown to %d MiB", self._path, new_size >> 20)
        return True

    def snapshot_released(self) -> None:
        with self._lock:
            self._snapshots_open -= 1
            self._lock.notify_all()
        if self._frozen:
            self._flush_due = True  # the map may grow now: the task thread flushes on its next write

    # --- scans ---------------------------------------------------------------------------------------

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        self.flush()
        try:
            with self._env.begin(db=self.db) as txn:
                cursor = txn.cursor()
                if self._frozen:
                    return list(_merged(cursor, tuple(self._frozen), prefix, prefix_end(prefix)))
                out: list[tuple[bytes, bytes]] = []
                if cursor.set_range(prefix):
                    for key, value in cursor.iternext():
                        if not key.startswith(prefix):
                            break
                        out.append((key, value))
                return out
        except lmdb.Error as exc:
            raise self._error(exc, "read from the LMDB environment in") from exc

    def delete_prefix(self, prefix: bytes) -> int:
        keys = [k for k, _ in self.scan(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    # --- snapshots and restore -----------------------------------------------------------------------

    def snapshot(self) -> KVSnapshot:
        if self._active:
            self._frozen.append(self._active)
            self._active = {}
            self._active_bytes = 0
        try:
            txn = self._env.begin(db=self.db)
        except lmdb.Error as exc:
            raise self._error(exc, "snapshot the LMDB environment in") from exc
        with self._lock:
            self._snapshots_open += 1
        # The frozen buffers go to LMDB on the task thread's next write (not here: this is the
        # synchronous part); they stay readable to this snapshot, which holds them and its old view.
        self._flush_due = bool(self._frozen)
        return _LmdbSnapshot(self, txn, tuple(self._frozen))

    def begin_restore(self) -> None:
        """Start a restore from an empty environment: discard the entries the environment held when it was
        opened, unless something was written since. They were left by an earlier owner (a crashed worker,
        say) and are not the checkpoint's state; Flink's RocksDB backend restores into a fresh instance
        directory for the same reason. :meth:`bulk_load_chunks` calls this first."""
        self.flush()
        if self._left_over:
            self._discard_left_over()

    def bulk_load_chunks(self, chunks: Iterable[tuple[int, Chunk]]) -> int:
        """Load restored entries (see :class:`KVStore`), after :meth:`begin_restore`."""
        self.begin_restore()
        total = 0
        batch: list[Chunk] = []
        batch_entries = 0
        for _, chunk in chunks:
            batch.append(chunk)
            batch_entries += len(chunk)
            if batch_entries >= _LOAD_BATCH:
                self._load_batch(batch)
                total += batch_entries
                batch, batch_entries = [], 0
        if batch:
            self._load_batch(batch)
            total += batch_entries
        self._drop_reader()
        return total

    def _load_batch(self, batch: list[Chunk]) -> None:
        """Put the chunks in one write transaction (growing the map if it is full).

        A chunk whose first key is beyond every stored key goes in with ``MDB_APPEND`` (no B+tree search,
        full pages). If it was not sorted after all, LMDB skips the out-of-order entries and reports
        fewer added; the chunk is then put again normally, which gives the same result.
        """
        while True:
            try:
                with self._env.begin(write=True, db=self.db) as txn:
                    cursor = txn.cursor()
                    last = cursor.key() if cursor.last() else b""
                    for chunk in batch:
                        if not chunk:
                            continue
                        if chunk[0][0] > last and cursor.putmulti(chunk, dupdata=False, append=True)[1] == len(chunk):
                            last = chunk[-1][0]
                            continue
                        cursor.putmulti(chunk, dupdata=False, overwrite=True)
                        last = cursor.key() if cursor.last() else b""
            except lmdb.MapFullError as exc:
                if not self._grow(wait=True):
                    raise self._error(exc, "restore into the LMDB environment in") from exc
            except lmdb.Error as exc:
                raise self._error(exc, "restore into the LMDB environment in") from exc
            else:
                return

    def _discard_left_over(self) -> None:
        log.warning(
            "LMDB environment %s held %d entries left by an earlier owner; discarding them before the restore",
            self._path,
            self._left_over,
        )
        self._drop_reader()
        try:
            with self._env.begin(write=True) as txn:
                txn.drop(self.db, delete=False)
        except lmdb.Error as exc:
            raise self._error(exc, "clear the LMDB environment in") from exc
        self._left_over = 0

    def set_owner(self, owner: str) -> None:
        """Describe who holds the directory (``"operator 'totals' subtask 0"``), for another opener's message."""
        self._dir_lock.set_owner(owner)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_reader()
        self._env.close()
        self._dir_lock.release()
