"""The LMDB engine: a sorted write-back buffer in front of an LMDB environment.

Writes go to an in-memory buffer (read-your-own-writes: reads look in the buffer first). When the
buffer passes its bound it is frozen and handed to the flusher (``_lmdb_flush``), a worker thread that
writes it into LMDB in one write transaction, as sorted runs of a thousand keys (runs put about as fast
as one sorted list and need no long merge). The task thread never waits for a whole flush (unless the
flusher falls :data:`MAX_PENDING_LAYERS` behind, or :meth:`LmdbKV.flush` is called): while the flusher has
layers pending, the task lends it the GIL (which py-lmdb needs for every put) in loans of at most
:data:`PACE_MAX_S` (``Flusher.pace``). A frozen layer stays readable in memory until the task's read
transaction sees it in LMDB. LMDB runs with ``sync=False``: durability comes from checkpoints, not from
the local store.

Snapshots are O(1) on the task thread: the active buffer is frozen (never mutated again), a read
transaction is opened (LMDB's MVCC keeps that view stable), and the snapshot reads the frozen
buffers it does not see in LMDB on top of the transaction, from any thread, while processing continues
(``_lmdb_snapshot``).

The map size grows on demand: when the flusher finds the map full and no snapshot holds a read
transaction, the task thread doubles the map size on its next call (py-lmdb invalidates open
transactions on resize, so growth is deferred, never waited for, until no snapshot is open; until then
the frozen buffers stay in memory and reads remain correct). A failed write keeps its layer buffered
and readable; its typed error is raised to the task on its next call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb

from keystate.statebackend._kv import Chunk, KVSnapshot, KVStore
from keystate.statebackend._lmdb_env import MAX_READERS, DirectoryLock, lmdb_error
from keystate.statebackend._lmdb_flush import Flusher
from keystate.statebackend._lmdb_layers import MISSING, Append, Buffer, Layer, merged, prefix_end
from keystate.statebackend._lmdb_snapshot import LmdbSnapshot
from keystate.statebackend.errors import LmdbError, LmdbMapFullError, StateError

__all__ = ["LMDB_LAYOUT_VERSION", "LmdbKV", "prefix_end"]

log = logging.getLogger(__name__)

LMDB_LAYOUT_VERSION = b"1"
_LOAD_BATCH = 50_000
"""Restored entries per LMDB write transaction."""
_MISSING: Any = MISSING
PACE_LAYERS = 1
"""Frozen layers pending from which the task thread lends the flusher time (a busy task thread: a flusher
whose work keeps up with it on its own has nothing pending by the next freeze)."""
PACE_ENTRIES = 256
"""While the flusher is behind, the task thread looks whether a loan is due once every this many writes."""
PACE_STEPS = 4096
"""The work a loan asks for (:attr:`Flusher.progress`: sorting an entry is one step, putting it another)."""
PACE_MAX_S = 0.0025
"""The longest loan: its deadline, at which the flusher gets out of the way (the task thread, the event
loop, is blocked that long plus the time the OS takes to run it again)."""
PACE_RUN = (1.0, 0.3, 0.0)
"""After a loan, the task runs at least this many times the loan's duration before the next, by the layers
pending (1, 2, 3): the flusher gets up to half of the task thread's time, then 77%, then all but
:data:`PACE_ENTRIES` writes per loan. From 2 layers on, a loan lasts its time even while the flusher
commits (which needs no GIL): LMDB is slower than the task then, and the task must not outrun it into the
memory bound, where it would wait for a whole layer. A task that yields to the loop every few hundred
writes never blocks it for more than one loan at a time."""
MAX_PENDING_LAYERS = 4
"""Frozen layers pending at which the task thread waits for a whole layer: the memory bound (the loans keep
the task from reaching it unless LMDB is far slower than the task)."""
_SCAN_FREEZE = 4096
"""A scan freezes an active layer larger than this, so the next scans find it sorted by the flusher."""


class LmdbKV(KVStore):
    """An LMDB environment in ``path`` behind a sorted write-back buffer.

    Args:
        path: a directory for the environment (created; should be empty or a previous environment).
            It is locked for this store's lifetime (``keystate.lock`` in it): one store per directory.
        map_size: the initial map size in bytes; it doubles on demand.
        buffer_entries: freeze the buffer (and have it flushed) when it holds this many keys.
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
        self._check_at = buffer_entries
        self._lend_at = 0.0
        self._written_seen = 0
        """``Flusher.written`` when the task thread last dropped the layers the flusher wrote."""
        """When the task thread next lends the flusher time (``perf_counter``), while it is behind."""
        """Active entries at which a write services the engine: the buffer bound, or sooner while pacing."""
        self._active: Buffer = {}
        self._active_bytes = 0
        self._frozen: list[Layer] = []
        """Frozen layers the task's read transaction does not see in LMDB (oldest first)."""
        self._flush_due = False
        """Set (from any thread) when the task thread has something to do on its next write: the flusher
        wrote or failed, or a snapshot was released while the map waits to grow."""
        self._reader: Any = None
        self._reader_id = -1
        self._lock = threading.Condition()
        self._snapshots_open = 0
        self._closed = False
        self._broken: str | None = None
        """Why the environment cannot be used any more (py-lmdb invalidates it when a resize fails)."""
        self._flusher = Flusher(
            env,
            self.db,
            f"keystate-lmdb-flush-{self._path.name[-24:]}",
            self._flusher_done,
            lambda exc: self._error(exc, "write to the LMDB environment in"),
        )

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
        """The task thread's read transaction, opened again once the flusher wrote a layer. The frozen
        layers it sees in LMDB are dropped (applying them again would double their appends)."""
        self._check_open()
        try:
            reader = self._env.begin(db=self.db)
        except lmdb.Error as exc:
            raise self._error(exc, "read from the LMDB environment in") from exc
        self._reader, self._reader_id = reader, reader.id()
        frozen = self._frozen
        seen = 0
        while seen < len(frozen) and frozen[seen].visible_in(self._reader_id):
            seen += 1
        if seen:
            del frozen[:seen]
            self._left_over = 0
        return reader

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
        if cls is Append:
            return (base or b"") + bytes(v.data)
        return base

    def _lower(self, key: bytes) -> bytes | None:
        """The value below the active buffer: frozen buffers (newest first) over LMDB."""
        if self._flush_due and self._frozen:
            self._drop_reader()  # the flusher wrote a layer: a new reader lets us drop it
        reader = self._reader
        if reader is None:
            reader = self._begin_read()  # first: it decides which frozen layers are still to be applied
        suffixes: list[bytearray] = []
        base: Any = _MISSING
        for layer in reversed(self._frozen):
            v = layer.data.get(key, _MISSING)
            if v is _MISSING:
                continue
            if v.__class__ is Append:
                suffixes.append(v.data)
                continue
            base = v
            break
        if base is _MISSING:
            base = reader.get(key)
        if not suffixes:
            return None if base is None else bytes(base)
        return (b"" if base is None else bytes(base)) + b"".join(reversed(suffixes))

    # --- writes --------------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        self._active[key] = value
        self._active_bytes += len(key) + len(value)
        changes = self.changes
        if changes is not None:
            changes.add(key)
        if self._flush_due or len(self._active) >= self._check_at or self._active_bytes >= self._max_bytes:
            self._service()

    def delete(self, key: bytes) -> None:
        self._active[key] = None
        self._active_bytes += len(key)
        if self.changes is not None:
            self.changes.add(key)
        if self._flush_due or len(self._active) >= self._check_at or self._active_bytes >= self._max_bytes:
            self._service()

    def append(self, key: bytes, data: bytes) -> None:
        v = self._active.get(key, _MISSING)
        if v is _MISSING:
            self._active[key] = Append(data)
        elif v is None:
            self._active[key] = bytearray(data)
        elif v.__class__ is bytes:
            self._active[key] = bytearray(v) + data
        elif v.__class__ is bytearray:
            v += data
        else:
            v.data += data
        self._active_bytes += len(data)
        if self.changes is not None:
            self.changes.add(key)
        if self._flush_due or len(self._active) >= self._check_at or self._active_bytes >= self._max_bytes:
            self._service()

    def _freeze(self) -> None:
        """Hand the active buffer to the flusher (it stays readable as a frozen layer)."""
        if self._active:
            layer = Layer(self._active)
            self._frozen.append(layer)
            self._active = {}
            self._active_bytes = 0
            self._flusher.submit(layer)

    def _flusher_done(self) -> None:
        self._flush_due = True  # from the flusher's thread: the task thread looks on its next write

    def _service(self) -> None:
        """The task thread's part of flushing, on a write that filled the buffer, after the flusher wrote or
        failed, or every :data:`PACE_ENTRIES` writes while it has layers pending: freeze the buffer, lend the
        flusher the GIL when a loan is due (:data:`PACE_RUN`), drop layers LMDB now holds, grow the map,
        raise a write's error. Waits for a whole layer only at :data:`MAX_PENDING_LAYERS`."""
        self._check_open()
        self._flush_due = False
        self._settle()
        if len(self._active) >= self._max_entries or self._active_bytes >= self._max_bytes:
            self._freeze()
        flusher = self._flusher
        pending = flusher.pending()
        if pending >= PACE_LAYERS and not flusher.stalled:
            if pending >= MAX_PENDING_LAYERS:
                flusher.wait(below=MAX_PENDING_LAYERS)
            else:
                started = time.perf_counter()
                if started >= self._lend_at:
                    flusher.pace(PACE_STEPS, PACE_MAX_S, throttle=pending > PACE_LAYERS)
                    ended = time.perf_counter()
                    self._lend_at = ended + (ended - started) * PACE_RUN[min(pending - PACE_LAYERS, len(PACE_RUN) - 1)]
            self._check_at = min(self._max_entries, len(self._active) + PACE_ENTRIES)
        else:
            self._check_at = self._max_entries
        if self._frozen:
            self._drop_reader()  # the next read opens a reader that sees what the flusher wrote
            if flusher.written != self._written_seen:
                # The flusher wrote layers: a fresh reader drops them now, not at the next read: a task that
                # only writes would otherwise keep every layer in memory (and the GC would traverse them all).
                self._written_seen = flusher.written
                self._begin_read()

    def _settle(self) -> bool:
        """Deal with a stalled flusher: raise its error (once: the next call retries the layer), or grow the
        map, and resume it. Returns False if the map is full and cannot grow while a snapshot is open."""
        flusher = self._flusher
        if not flusher.stalled:
            return True
        error = flusher.take_error()
        if error is not None:
            raise error
        if flusher.map_full:
            # Never wait for snapshots here: the task thread may be the one that writes or releases them
            # later, so waiting could deadlock. The layers stay readable in memory.
            self._drop_reader()
            if not self._grow(wait=False):
                return False
        flusher.resume()
        return True

    def flush(self) -> bool:
        """Write every buffered change into LMDB and wait for it (task thread only).

        Returns:
            True if everything was written; False if the map is full and cannot grow while a
            snapshot holds a read transaction (the changes stay buffered and reads stay correct).

        Raises:
            LmdbError: a write failed (the changes stay buffered and readable; a later flush retries).
        """
        self._check_open()
        self._flush_due = False
        if not self._settle():
            return False
        self._freeze()
        flusher = self._flusher
        while not flusher.wait():
            if not self._settle():  # raises a write's error; grows the map and resumes
                return False
        self._drop_reader()
        if self._frozen:
            self._begin_read()  # drops the layers it wrote
        return not self._frozen

    def _error(self, exc: lmdb.Error | OSError, action: str) -> StateError:
        """What an LMDB call that failed while trying to ``action`` raises."""
        if self._closed or self._broken:
            return self._closed_error()
        try:
            size: int | None = self.map_size
        except lmdb.Error:
            size = None
        return lmdb_error(exc, self._path, action, map_size=size)

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
            self._flush_due = True  # the map may grow now: the task thread looks on its next write

    # --- scans ---------------------------------------------------------------------------------------

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every entry under ``prefix``: LMDB through a new read transaction, the frozen layers it does not
        see and the active buffer on top (no flush: a scan never waits for LMDB writes)."""
        self._check_open()
        if len(self._active) > _SCAN_FREEZE:
            self._freeze()  # the flusher sorts it: later scans bisect instead of filtering the whole buffer
        hi = prefix_end(prefix)
        try:
            with self._env.begin(db=self.db) as txn:
                txn_id = txn.id()
                layers = [layer for layer in self._frozen if not layer.visible_in(txn_id)]
                cursor = txn.cursor()
                if not layers and not self._active:
                    out: list[tuple[bytes, bytes]] = []
                    if cursor.set_range(prefix):
                        for key, value in cursor.iternext():
                            if not key.startswith(prefix):
                                break
                            out.append((key, value))
                    return out
                keys = {k for k in self._active if k.startswith(prefix)}
                for layer in layers:
                    keys.update(layer.keys_in(prefix, hi))
                buffers = (*(layer.data for layer in layers), self._active)
                return list(merged(cursor, buffers, prefix, hi, sorted(keys)))
        except lmdb.Error as exc:
            raise self._error(exc, "read from the LMDB environment in") from exc

    def delete_prefix(self, prefix: bytes) -> int:
        keys = [k for k, _ in self.scan(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    # --- snapshots and restore -----------------------------------------------------------------------

    def snapshot(self) -> KVSnapshot:
        self._check_open()
        if self._active:
            self._freeze()  # the flusher writes it later; the snapshot reads it from memory meanwhile
        try:
            txn = self._env.begin(db=self.db)
        except lmdb.Error as exc:
            raise self._error(exc, "snapshot the LMDB environment in") from exc
        txn_id = txn.id()
        with self._lock:
            self._snapshots_open += 1
        return LmdbSnapshot(self, txn, tuple(layer for layer in self._frozen if not layer.visible_in(txn_id)))

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
        from keystate.statebackend._packed import PatchedEntries  # a chain restore's chunks

        self.begin_restore()
        total = 0
        batch: list[Chunk] = []
        batch_entries = 0
        for _, chunk in chunks:
            batch.append(chunk)
            # A patched chunk (a chain's base run and its changes) is not merged to be counted.
            batch_entries += len(chunk.base) + len(chunk.changes) if isinstance(chunk, PatchedEntries) else len(chunk)
            if batch_entries >= _LOAD_BATCH:
                total += self._load_batch(batch)
                batch, batch_entries = [], 0
        if batch:
            total += self._load_batch(batch)
        self._drop_reader()
        return total

    def _load_batch(self, batch: list[Chunk]) -> int:
        """Put the chunks in one write transaction (growing the map if it is full); returns how many entries.

        A chunk whose first key is beyond every stored key goes in with ``MDB_APPEND`` (no B+tree search,
        full pages). If it was not sorted after all, LMDB skips the out-of-order entries and reports
        fewer added; the chunk is then put again normally, which gives the same result. A chunk that is
        a packed run with a chain's changes (``_packed.PatchedEntries``) is put as its run, then its
        changes over it, then its tombstoned keys deleted: never merged in Python. Its entries are counted
        from the environment's entry count (its keys are new to the environment, as in every restore).
        """
        from keystate.statebackend._packed import PatchedEntries

        def put_sorted(cursor: Any, chunk: Any, last: bytes) -> bytes:  # a Chunk, PackedEntries included
            """Put ``chunk``, appending if it sorts after ``last`` (the last key stored); returns the new last key."""
            if not chunk:
                return last
            if chunk[0][0] > last and cursor.putmulti(chunk, dupdata=False, append=True)[1] == len(chunk):
                end: bytes = chunk[-1][0]
                return end
            cursor.putmulti(chunk, dupdata=False, overwrite=True)
            return cursor.key() if cursor.last() else b""

        while True:
            try:
                with self._env.begin(write=True, db=self.db) as txn:
                    cursor = txn.cursor()
                    last = cursor.key() if cursor.last() else b""
                    loaded = 0
                    for chunk in batch:
                        if isinstance(chunk, PatchedEntries):
                            before = txn.stat(self.db)["entries"]
                            put_sorted(cursor, chunk.base, last)
                            cursor.putmulti(chunk.puts(), dupdata=False, overwrite=True)
                            for key in chunk.deletes():
                                txn.delete(key, db=self.db)
                            loaded += txn.stat(self.db)["entries"] - before
                            last = cursor.key() if cursor.last() else b""
                            continue
                        loaded += len(chunk)
                        last = put_sorted(cursor, chunk, last)
            except lmdb.MapFullError as exc:
                if not self._grow(wait=True):
                    raise self._error(exc, "restore into the LMDB environment in") from exc
            except lmdb.Error as exc:
                raise self._error(exc, "restore into the LMDB environment in") from exc
            else:
                return loaded

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
        """Close the environment. Buffered changes not yet in LMDB are dropped (it is scratch space: state
        survives through checkpoints); a write in flight finishes first."""
        if self._closed:
            return
        self._flusher.stop()
        self._closed = True
        self._drop_reader()
        self._env.close()
        self._dir_lock.release()
