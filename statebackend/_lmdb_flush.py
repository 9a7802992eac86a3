"""The LMDB engine's flusher: a worker thread that writes frozen layers into LMDB, off the task's thread.

Writing 100,000 buffered entries takes 120-170 ms; on the task's thread (the event loop) that stalled every
task of the process. The flusher writes the frozen layers one write transaction each, in the order they
were frozen, while they stay readable in memory; the task thread only freezes layers, and drops them once
its read transaction sees them in LMDB (:class:`~keystate.statebackend._lmdb_layers.Layer`).

The flusher holds the GIL only for short steps: it sorts a layer in runs of :data:`_PUT_SLICE` keys (never
merged: one merge of 100,000 keys is a 10 ms C call, a 10 ms stall of the loop) and py-lmdb releases the GIL
while it puts. When a write fails it stops and keeps the layer: a full map
(:attr:`map_full`, the task thread grows the map when no snapshot holds a read transaction) or another
error (:meth:`take_error`, raised to the task on its next call). The task thread resumes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import lmdb

from keystate.statebackend._lmdb_layers import Append, Layer
from keystate.statebackend.errors import StateError

__all__ = ["Flusher"]

log = logging.getLogger(__name__)

_PUT_SLICE = 4096
"""Keys per sorted run, and plain values per ``putmulti`` call."""


class Flusher:
    """Writes queued layers into ``env``/``db`` on a daemon thread, in order.

    Args:
        env, db: the LMDB environment and database.
        name: the thread's name.
        on_written: called (on the flusher's thread) after each layer is committed, and when it stops on a
            failure: the engine then looks at it on the task's next call.
        translate: turns an ``lmdb.Error`` into the engine's typed error.
    """

    def __init__(
        self,
        env: Any,
        db: Any,
        name: str,
        on_written: Callable[[], None],
        translate: Callable[[lmdb.Error], StateError],
    ) -> None:
        self._env = env
        self._db = db
        self._name = name
        self._on_written = on_written
        self._translate = translate
        self._cv = threading.Condition()
        self._queue: list[Layer] = []
        self._busy = False  # a layer is being written
        self._paused = False  # stopped after a failure until resume()
        self.map_full = False
        self._error: StateError | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.written = 0
        """Layers committed so far (a counter the engine compares to notice progress)."""

    # --- the task's side ----------------------------------------------------------------------------

    def submit(self, layer: Layer) -> None:
        with self._cv:
            self._queue.append(layer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def pending(self) -> int:
        """Layers queued or being written."""
        return len(self._queue)

    @property
    def stalled(self) -> bool:
        """Stopped after a failure (a full map or an error) and not resumed yet."""
        return self._paused

    def take_error(self) -> StateError | None:
        """The error of the last failed write, once (the flusher stays paused until :meth:`resume`)."""
        with self._cv:
            error, self._error = self._error, None
            return error

    def resume(self) -> None:
        """Retry the layer that failed (after the map grew, or its error was raised: the cause may be gone)."""
        with self._cv:
            if self._paused and self._error is None:
                self._paused = False
                self.map_full = False
                self._cv.notify_all()

    def wait(self, *, below: int = 1) -> bool:
        """Block until fewer than ``below`` layers are pending (``below=1``: all written) or the flusher is
        stalled. Returns True if it got there without a stall."""
        with self._cv:
            self._cv.wait_for(lambda: len(self._queue) < below or self._paused or self._stopping)
            return len(self._queue) < below

    def stop(self) -> None:
        """Stop after the write in flight (queued layers are not written); wait for the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # --- the flusher's thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or (self._queue and not self._paused))
                if self._stopping:
                    return
                layer = self._queue[0]
                self._busy = True
            failure: StateError | None = None
            full = False
            try:
                self._write(layer)
            except lmdb.MapFullError:
                full = True
            except lmdb.Error as exc:
                failure = self._translate(exc)
            except BaseException as exc:  # never lose a layer silently: report it to the task
                log.exception("LMDB flusher %s failed", self._name)
                failure = StateError(f"writing buffered state into LMDB failed: {exc!r}")
            with self._cv:
                self._busy = False
                if full or failure is not None:
                    layer.txn_id = None
                    self._paused = True
                    self.map_full = full
                    self._error = failure
                else:
                    self._queue.pop(0)
                    self.written += 1
                self._cv.notify_all()
            self._on_written()

    def _write(self, layer: Layer) -> None:
        # A layer holds one change per key, so changes to different keys commute: the layer goes in as sorted
        # runs of _PUT_SLICE keys (sorted runs put about as fast as one sorted list, and nothing here holds
        # the GIL for more than a short C call: one sort of a run, one putmulti, which releases it per put),
        # plain values by putmulti, deletes and appends one by one after them.
        data = layer.data
        runs = layer.runs
        if runs is None:
            items = list(data)
            runs = [sorted(items[i : i + _PUT_SLICE]) for i in range(0, len(items), _PUT_SLICE)]
            layer.runs = runs
        txn = self._env.begin(write=True, db=self._db)
        try:
            layer.txn_id = txn.id()
            cursor = txn.cursor()
            others: list[bytes] = []
            for part in runs:
                values = list(map(data.__getitem__, part))
                if set(map(type, values)) == {bytes}:
                    cursor.putmulti(zip(part, values, strict=True), dupdata=False, overwrite=True)
                    continue
                plain = [(key, v) for key, v in zip(part, values, strict=True) if v.__class__ is bytes]
                others.extend(key for key, v in zip(part, values, strict=True) if v.__class__ is not bytes)
                if plain:
                    cursor.putmulti(plain, dupdata=False, overwrite=True)
            for key in others:
                v = data[key]
                if v is None:
                    txn.delete(key)
                elif v.__class__ is Append:
                    base = txn.get(key)
                    txn.put(key, (base or b"") + v.data)
                else:
                    txn.put(key, bytes(v))
            txn.commit()
            last = self._env.info()["last_txnid"]
            if last < layer.txn_id:  # LMDB commits a transaction that changed nothing as no transaction
                layer.txn_id = last  # nothing to apply again: every reader from now on counts as seeing it
        except BaseException:
            txn.abort()
            raise
