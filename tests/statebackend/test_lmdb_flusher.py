"""The LMDB write-back flush on the flusher thread: the task never waits for it, reads stay exact while layers
are in flight (appends never apply twice), and a failed write surfaces as a typed error on the next call."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from keystate.statebackend._lmdb import MAX_PENDING_LAYERS, LmdbKV
from keystate.statebackend._lmdb_flush import Flusher
from keystate.statebackend._lmdb_layers import Layer
from keystate.statebackend.errors import LmdbError
from tests.statebackend.support import lmdb_key as key


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[LmdbKV]:
    store = LmdbKV(tmp_path / "env", buffer_entries=10)
    yield store
    store.close()


def test_writes_do_not_wait_for_the_flush_and_reads_stay_exact(kv: LmdbKV, gate: threading.Event) -> None:
    started = time.perf_counter()
    for i in range(10 * (MAX_PENDING_LAYERS - 1)):  # layers pile up while the flusher is held
        kv.put(key(i), b"v%d" % i)
        kv.append(key(1000), b"<%d>" % i)  # one list spread over every layer
    assert time.perf_counter() - started < 5  # the flusher is held for 30 s: nobody waited for it
    expected_list = b"".join(b"<%d>" % i for i in range(10 * (MAX_PENDING_LAYERS - 1)))
    assert kv.get(key(1000)) == expected_list
    assert kv.get(key(5)) == b"v5"
    in_group_5 = sorted(k for k in map(key, range(20)) if k[:2] == b"\x00\x05")
    assert [k for k, _ in kv.scan(struct.pack(">H", 5))] == in_group_5
    view = kv.snapshot()
    gate.set()
    assert kv.flush()
    for _ in range(3):  # the layers are in LMDB now and gone from memory: no append applies twice
        assert kv.get(key(1000)) == expected_list
        kv.put(key(2000), b"x")  # services the engine: drops layers, renews the reader
    assert view.lookup([key(5), key(1000), key(2000)]) == [b"v5", expected_list, None]
    view.release()


def test_a_failed_write_is_raised_on_the_next_call_and_retried(kv: LmdbKV, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Flusher._write
    failures = [lmdb.DiskError("simulated I/O error")]

    def flaky(self: Flusher, layer: Layer) -> None:
        if failures:
            raise failures.pop()
        original(self, layer)

    monkeypatch.setattr(Flusher, "_write", flaky)

    def put_all() -> None:
        for i in range(200):
            kv.put(key(i), b"v")
            time.sleep(0.001)  # let the flusher fail meanwhile

    with pytest.raises(LmdbError, match=str(kv.path)):
        put_all()
    assert all(kv.get(key(i)) == b"v" for i in range(10))  # still buffered and readable
    assert kv.flush()  # retried
    assert all(kv.get(key(i)) == b"v" for i in range(10))


def test_close_with_layers_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    kv = LmdbKV(tmp_path / "env", buffer_entries=5)
    for i in range(12):
        kv.put(key(i), b"v")
    gate.set()
    kv.close()  # waits for the write in flight, drops the rest (scratch space)
    reopened = LmdbKV(tmp_path / "env")
    reopened.close()
