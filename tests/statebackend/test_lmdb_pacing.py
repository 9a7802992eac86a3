"""Pacing of the LMDB flusher (``_lmdb_flush``): a busy task thread lends the flusher the GIL in short loans
instead of waiting for whole layers, the memory bound still holds, and the flusher's own bookkeeping (its
progress counter, the puts it interrupts to get out of the task's way) loses no entry. No timing asserts:
loans are observed by what they are called with, and what the flusher wrote by reading LMDB."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from keystate.statebackend import _lmdb
from keystate.statebackend._lmdb import MAX_PENDING_LAYERS, PACE_LAYERS, PACE_MAX_S, LmdbKV
from keystate.statebackend._lmdb_flush import _CONTENDED_S, Flusher
from keystate.statebackend._lmdb_layers import Append, Layer
from keystate.statebackend.errors import StateError
from tests.statebackend.support import lmdb_key as key


class Calls:
    """Records the task thread's loans and whole-layer waits (and then makes them as usual)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paces: list[tuple[int, float, bool, int]] = []
        self.waits: list[int] = []
        self.waiting = threading.Event()
        pace, wait = Flusher.pace, Flusher.wait

        def recorded_pace(flusher: Flusher, steps: int, timeout: float, *, throttle: bool = False) -> None:
            self.paces.append((steps, timeout, throttle, flusher.pending()))
            pace(flusher, steps, timeout, throttle=throttle)

        def recorded_wait(flusher: Flusher, *, below: int = 1) -> bool:
            self.waits.append(flusher.pending())
            self.waiting.set()
            return wait(flusher, below=below)

        monkeypatch.setattr(Flusher, "pace", recorded_pace)
        monkeypatch.setattr(Flusher, "wait", recorded_wait)


def test_a_busy_task_lends_bounded_loans_until_the_memory_bound(
    tmp_path: Path, gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    monkeypatch.setattr(_lmdb, "PACE_RUN", (0.0, 0.0, 0.0))  # a loan at every look: each is recorded
    kv = LmdbKV(tmp_path / "env", buffer_entries=10)
    try:
        for i in range(10 * (MAX_PENDING_LAYERS - 1)):  # the flusher is held: layers pile up below the bound
            kv.put(key(i), b"v")
        assert calls.waits == []  # nobody waited for a whole layer
        assert calls.paces, "a task with layers pending lends the flusher time"
        assert {timeout for _, timeout, _, _ in calls.paces} == {PACE_MAX_S}
        assert all(pending >= PACE_LAYERS for *_, pending in calls.paces)
        # from 2 layers pending a loan lasts its time while the flusher commits (LMDB is behind the task)
        assert all(throttle == (pending > PACE_LAYERS) for _, _, throttle, pending in calls.paces)

        def write_a_layer() -> None:
            for i in range(1000, 1010):
                kv.put(key(i), b"v")

        writer = threading.Thread(target=write_a_layer)
        writer.start()  # its tenth write freezes a layer: MAX_PENDING_LAYERS pending, the memory bound
        assert calls.waiting.wait(30)
        assert calls.waits == [MAX_PENDING_LAYERS]
        assert writer.is_alive()
        gate.set()
        writer.join(30)
        assert not writer.is_alive()
        assert kv.flush()
        assert all(kv.get(key(i)) == b"v" for i in [*range(10 * (MAX_PENDING_LAYERS - 1)), *range(1000, 1010)])
    finally:
        gate.set()
        kv.close()


def test_no_loans_while_the_flusher_keeps_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    kv = LmdbKV(tmp_path / "env", buffer_entries=10)
    try:
        for layer in range(5):
            for i in range(10):
                kv.put(key(10 * layer + i), b"v")
            assert kv.flush()  # written before the next freeze: nothing pending there
        assert [pending for *_, pending in calls.paces if pending > PACE_LAYERS] == []
    finally:
        kv.close()


def test_a_stalled_flusher_is_not_lent_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    original = Flusher._write

    def failing(self: Flusher, layer: Layer) -> None:
        raise lmdb.DiskError("simulated I/O error")

    monkeypatch.setattr(Flusher, "_write", failing)
    kv = LmdbKV(tmp_path / "env", buffer_entries=10)
    try:
        kv.put(key(0), b"v")
        kv._freeze()
        assert not kv._flusher.wait()  # stalled on the error
        calls.paces.clear()
        with pytest.raises(StateError):
            kv.put(key(1), b"v")  # raises the error; no loan to a flusher that cannot write
        assert calls.paces == []
        monkeypatch.setattr(Flusher, "_write", original)
        assert kv.flush()  # retried
        assert kv.get(key(0)) == kv.get(key(1)) == b"v"
    finally:
        kv.close()


# --- the flusher on its own ---------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    environment = lmdb.open(str(tmp_path / "env"), max_dbs=1, map_size=64 << 20)
    yield environment, environment.open_db(b"state")
    environment.close()


def flusher_on(env: tuple[Any, Any]) -> Flusher:
    return Flusher(env[0], env[1], "test-flusher", lambda: None, lambda exc: StateError(str(exc)))


def stored(env: tuple[Any, Any]) -> dict[bytes, bytes]:
    with env[0].begin(db=env[1]) as txn:
        return dict(txn.cursor())


def test_progress_counts_a_sort_and_a_put_per_entry(env: tuple[Any, Any]) -> None:
    with env[0].begin(write=True, db=env[1]) as txn:
        txn.put(key(1), b"base")
        txn.put(key(2), b"gone")
    flusher = flusher_on(env)
    data: dict[bytes, Any] = {key(i): b"v%d" % i for i in range(3, 3000)}
    data[key(1)] = Append(b"+tail")
    data[key(2)] = None
    flusher.submit(Layer(data))
    assert flusher.wait()
    flusher.stop()
    assert flusher.progress == 2 * len(data)
    expected = {key(i): b"v%d" % i for i in range(3, 3000)} | {key(1): b"base+tail"}
    assert stored(env) == expected


def test_puts_interrupted_to_get_out_of_the_way_lose_nothing(
    env: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    flusher = flusher_on(env)
    looks = iter(range(10**9))
    parks: list[int] = []
    monkeypatch.setattr(Flusher, "_yielding", lambda self, now, last: next(looks) % 7 == 3)
    monkeypatch.setattr(Flusher, "_park", lambda self: parks.append(1))
    data: dict[bytes, Any] = {key(i): b"v%d" % i for i in range(5000)}
    data[key(7)] = None
    flusher.submit(Layer(data))
    assert flusher.wait()
    flusher.stop()
    assert parks, "the flusher got out of the task's way"
    assert stored(env) == {k: v for k, v in data.items() if v is not None}


def test_when_the_flusher_gets_out_of_the_tasks_way(env: tuple[Any, Any]) -> None:
    flusher = flusher_on(env)
    quick, slow = 0.0001, 2 * _CONTENDED_S
    assert not flusher._yielding(10.0, 10.0 - quick)  # no loan, the GIL came back at once: the task is idle
    assert flusher._yielding(10.0, 10.0 - slow)  # no loan, the GIL came back late: the task is busy
    flusher._lent_until = 11.0
    assert not flusher._yielding(10.0, 10.0 - slow)  # lent: it works on, however slow
    assert flusher._yielding(11.5, 11.5 - quick)  # the loan ended: the task wants the GIL back at once
    flusher._lent_until = math.inf
    assert not flusher._yielding(11.5, 11.5 - slow)  # the task waits for whole layers
    flusher._lent_until = 11.0
    flusher._stopping = True
    assert not flusher._yielding(11.5, 11.5 - slow)  # stopping: finish the write in flight


def test_a_loan_ends_when_its_work_is_done(env: tuple[Any, Any], gate: threading.Event) -> None:
    flusher = flusher_on(env)
    flusher.submit(Layer({key(i): b"v" for i in range(20_000)}))
    gate.set()
    flusher.pace(1000, 60.0, throttle=True)  # ends long before its timeout: at 1000 steps, or once written
    assert flusher.progress >= 1000 or flusher.pending() == 0
    assert flusher.wait()
    flusher.stop()
    assert len(stored(env)) == 20_000


def test_a_task_that_only_writes_drops_the_layers_written(tmp_path: Path) -> None:
    kv = LmdbKV(tmp_path / "env", buffer_entries=10)
    try:
        for i in range(200):
            kv.put(key(i), b"v")
        assert kv._flusher.wait()  # the flusher's own wait: no read, no engine flush drops anything
        kv.put(key(1000), b"v")  # the next write sees that the flusher wrote layers
        assert kv._frozen == []  # dropped: LMDB holds them, and nothing read them since
        assert all(kv.get(key(i)) == b"v" for i in [*range(200), 1000])
    finally:
        kv.close()
