"""The LMDB engine's flusher: a worker thread that writes frozen layers into LMDB, off the task's thread.

Writing 100,000 buffered entries takes 120-170 ms; on the task's thread (the event loop) that stalled every
task of the process. The flusher writes the frozen layers one write transaction each, in the order they
were frozen, while they stay readable in memory; the task thread only freezes layers, and drops them once
its read transaction sees them in LMDB (:class:`~keystate.statebackend._lmdb_layers.Layer`).

**The GIL.** py-lmdb releases the GIL around each put and gets it back after it, so while the task thread
runs Python the flusher gets one put per switch interval (5 ms): on its own it cannot keep up with a busy
task. Only its commit (LMDB writing its pages) runs truly in parallel. Hence:

- The flusher never holds the GIL for a long C call: it sorts a layer in runs of :data:`_SORT_RUN` keys
  (never merged: one merge of 100,000 keys is a 10 ms C call) and puts in slices of :data:`_PUT_SLICE`.
- A busy task lends it the GIL in short loans (:meth:`pace`) instead of one wait for a whole layer (which
  blocked the event loop for 0.3-1.7 s). :attr:`progress` counts its steps (entries sorted plus entries
  put), so a loan ends as soon as the flusher has done the work asked for, or at its deadline.
- The flusher gets out of the task's way when a loan ends: it looks at the deadline before every put
  (interrupting ``putmulti``) and parks, so the task gets the GIL back at once, not a switch interval later.
- Without a loan, a put that got the GIL back only after :data:`_CONTENDED_S` means the task thread is busy:
  the flusher parks until the task lends it time or :data:`_PARK_S` passed, rather than interrupting the
  task every 5 ms for a few microseconds of work. A task waiting for input leaves the GIL free: the
  flusher then writes at full speed.

When a write fails it stops and keeps the layer: a full map (:attr:`map_full`, the task thread grows the map
when no snapshot holds a read transaction) or another error (:meth:`take_error`, raised to the task on its
next call). The task thread resumes it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import lmdb

from keystate.statebackend._lmdb_layers import Append, Layer
from keystate.statebackend.errors import StateError

__all__ = ["Flusher"]

log = logging.getLogger(__name__)

_SORT_RUN = 1024
"""Keys per sorted run: one ``sorted()`` call, a fraction of a millisecond holding the GIL."""
_PUT_SLICE = 512
"""Entries per ``putmulti`` call; the flusher reports progress after each."""
_CONTENDED_S = 0.002
"""Getting the GIL back after a put, or sorting a run, slower than this: the task thread is busy (it gives the
GIL up only every switch interval, 5 ms). At full speed a put takes microseconds, a sorted run 0.1-0.3 ms."""
_PARK_S = 0.05
"""How long a flusher that met a busy task thread waits for a loan before it tries again (the task may be idle
by then: that is when the flusher writes on its own)."""


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
        self._cv = threading.Condition(threading.Lock())
        self._queue: list[Layer] = []
        self._paused = False  # stopped after a failure until resume()
        self.map_full = False
        self._error: StateError | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stepping = False  # sorting or putting: work that needs the GIL (not begin, commit or idle)
        self._lenders = 0  # task threads in pace() or wait()
        self._lent_until = 0.0
        """When the task thread's loan of the GIL ends (``perf_counter``; ``inf`` during :meth:`wait`; 0: no
        loan since the flusher last parked). Past it, the flusher gets out of the task's way at once."""
        self._loan_target = 0.0
        self.written = 0
        """Layers committed so far (a counter the engine compares to notice progress)."""
        self.progress = 0
        """Steps done so far: entries sorted plus entries put (one layer entry is about two steps)."""

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
            self._lend(math.inf, math.inf)
            try:
                self._cv.wait_for(lambda: len(self._queue) < below or self._paused or self._stopping)
            finally:
                self._end_loan()
            return len(self._queue) < below

    def pace(self, steps: int, timeout: float, *, throttle: bool = False) -> None:
        """Lend the flusher the GIL until it has done ``steps`` more steps (:attr:`progress`), or ``timeout``
        seconds passed, or it is stalled or idle; also when it commits (which needs no GIL) unless
        ``throttle``: then the task waits out the timeout anyway, so that it does not outrun LMDB while the
        commit writes its pages. A bounded block of the task thread, never a wait for a whole layer; the
        flusher stops contending for the GIL when the loan ends, so the task thread gets it back at once."""
        with self._cv:
            target = self.progress + steps
            self._lend(time.perf_counter() + timeout, target)
            try:
                self._cv.wait_for(
                    lambda: (
                        self.progress >= target
                        or not (self._stepping or (throttle and self._queue))
                        or self._paused
                        or self._stopping
                    ),
                    timeout,
                )
            finally:
                self._end_loan()

    def _lend(self, until: float, target: float) -> None:
        self._lenders += 1
        self._lent_until = until
        self._loan_target = target
        self._cv.notify_all()  # a parked flusher goes on

    def _end_loan(self) -> None:
        self._lenders -= 1
        self._lent_until = time.perf_counter()  # over: the flusher parks at its next check

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
                self._stepping = False
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

    def _step(self, steps: int) -> None:
        """Report ``steps`` done; a loan whose work is done ends (the lender wakes, the flusher parks)."""
        with self._cv:
            self.progress += steps
            if self._lenders and self.progress >= self._loan_target:
                self._lent_until = min(self._lent_until, time.perf_counter())
                self._cv.notify_all()

    def _yielding(self, now: float, last: float) -> bool:
        """Whether to get out of the task thread's way (then :meth:`_park`): its loan ended, or, with no
        loan, getting the GIL back since ``last`` took longer than :data:`_CONTENDED_S` (the task is busy)."""
        lent = self._lent_until
        return now > lent and (lent > 0 or now - last > _CONTENDED_S) and not self._stopping

    def _park(self) -> None:
        """Wait without the GIL until a task thread lends it (:meth:`pace`, :meth:`wait`), or :data:`_PARK_S`
        passed (then try again: the task thread may be idle by now)."""
        with self._cv:
            lent = self._cv.wait_for(
                lambda: self._stopping or (self._lenders > 0 and time.perf_counter() < self._lent_until), _PARK_S
            )
            if not lent:
                self._lent_until = 0.0

    def _watched(self, pairs: list[tuple[bytes, bytes]], at: int, stopped: list[int]) -> Iterator[tuple[bytes, bytes]]:
        """``pairs[at:]`` for one ``putmulti``, ending early (``stopped[0]``: where) when the flusher should
        get out of the task thread's way (:meth:`_yielding`)."""
        clock = time.perf_counter
        last = clock()
        for i in range(at, len(pairs)):
            now = clock()
            if now > self._lent_until and self._yielding(now, last):  # its first test inlined: it runs per put
                stopped[0] = i
                return
            last = now
            yield pairs[i]
        stopped[0] = len(pairs)

    def _put(self, cursor: Any, pairs: list[tuple[bytes, bytes]]) -> None:
        at, stopped = 0, [0]
        while at < len(pairs):
            cursor.putmulti(self._watched(pairs, at, stopped), dupdata=False, overwrite=True)
            at = stopped[0]
            if at < len(pairs):
                self._park()

    def _write(self, layer: Layer) -> None:
        # A layer holds one change per key, so changes to different keys commute: the layer goes in as sorted
        # runs of _SORT_RUN keys (sorted runs put about as fast as one sorted list), plain values by putmulti,
        # deletes and appends one by one after them. Every step is a short C call (see the module docstring).
        with self._cv:
            self._stepping = True
        data = layer.data
        runs = layer.runs
        if runs is None:
            keys = iter(data)
            runs = []
            last = time.perf_counter()
            while True:
                run = sorted(islice(keys, _SORT_RUN))
                if not run:
                    break
                runs.append(run)
                self._step(len(run))
                now = time.perf_counter()
                if self._yielding(now, last):
                    self._park()
                    now = time.perf_counter()
                last = now
            layer.runs = runs
        with self._cv:
            self._stepping = False
        txn = self._env.begin(write=True, db=self._db)
        try:
            layer.txn_id = txn.id()
            with self._cv:
                self._stepping = True
            cursor = txn.cursor()
            others: list[bytes] = []
            for run in runs:
                for at in range(0, len(run), _PUT_SLICE):
                    part = run[at : at + _PUT_SLICE]
                    values = list(map(data.__getitem__, part))
                    if set(map(type, values)) == {bytes}:
                        self._put(cursor, list(zip(part, values, strict=True)))
                        self._step(len(part))
                    else:
                        plain = [(key, v) for key, v in zip(part, values, strict=True) if v.__class__ is bytes]
                        others.extend(key for key, v in zip(part, values, strict=True) if v.__class__ is not bytes)
                        self._put(cursor, plain)
                        self._step(len(plain))
            for at in range(0, len(others), _PUT_SLICE):
                last = time.perf_counter()
                for key in others[at : at + _PUT_SLICE]:
                    v = data[key]
                    if v is None:
                        txn.delete(key)
                    elif v.__class__ is Append:
                        base = txn.get(key)
                        txn.put(key, (base or b"") + v.data)
                    else:
                        txn.put(key, bytes(v))
                    now = time.perf_counter()
                    if self._yielding(now, last):
                        self._park()
                        now = time.perf_counter()
                    last = now
                self._step(min(_PUT_SLICE, len(others) - at))
            with self._cv:
                self._stepping = False  # the commit writes pages with the GIL released: no need to lend it
            txn.commit()
            last = self._env.info()["last_txnid"]
            if last < layer.txn_id:  # LMDB commits a transaction that changed nothing as no transaction
                layer.txn_id = last  # nothing to apply again: every reader from now on counts as seeing it
        except BaseException:
            txn.abort()
            raise
