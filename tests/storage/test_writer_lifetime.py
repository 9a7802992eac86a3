"""Checkpoint writers and state streams leave no reference cycles behind, and abort from another thread.

Regression (found by benchmarks/soak.py): every committed checkpoint left its writer, streams and state-file
writers in reference cycles (writer -> stream -> bound ``_track`` -> writer; stream -> file writer -> bound
``_sink`` -> stream), so memory grew between garbage-collector passes in a long-running job.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import CheckpointStorage, LocalObjectStore, StorageError, StreamOptions
from tests.storage.test_retention import JOB, complete


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    return CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), options=StreamOptions(inline_threshold=0))


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_committed_checkpoint_leaves_no_cycles(storage: CheckpointStorage, no_gc: None) -> None:
    writer = storage.begin_checkpoint(JOB, 1)
    stream = writer.open_stream("op/0/keyed")
    stream.compress_in_background()
    stream.write(os.urandom(3 << 20))  # several blocks, through the helper thread
    stream.close()
    refs: list[weakref.ref[Any]] = [weakref.ref(writer), weakref.ref(stream), weakref.ref(stream._file)]
    del stream, writer
    completed, _ = complete(storage, 2)
    refs.append(weakref.ref(completed))
    del completed
    assert [r() for r in refs] == [None] * len(refs)  # freed by reference counting alone


@pytest.mark.parametrize("closed", [False, True])
def test_an_aborted_checkpoint_leaves_no_cycles(storage: CheckpointStorage, no_gc: None, closed: bool) -> None:
    writer = storage.begin_checkpoint(JOB, 1)
    stream = writer.open_stream("op/0/keyed")
    stream.write(os.urandom(100_000))
    if closed:
        stream.close()
    refs: list[weakref.ref[Any]] = [weakref.ref(writer), weakref.ref(stream), weakref.ref(stream._file)]
    writer.abort()
    del stream, writer
    assert [r() for r in refs] == [None] * len(refs)
    assert not any(storage.store.list_objects(""))  # and nothing it wrote is left


def test_abort_from_another_thread_stops_the_writer(storage: CheckpointStorage) -> None:
    writer = storage.begin_checkpoint(JOB, 1)
    stream = writer.open_stream("op/0/keyed")
    stream.write(os.urandom(2 << 20))  # the object exists now
    aborted = threading.Event()
    errors: list[BaseException] = []

    def write_on() -> None:
        try:
            for _ in range(10_000):
                stream.write(os.urandom(1 << 16))
                if aborted.is_set():
                    stream.write(os.urandom(2 << 20))  # at least one full block after the abort
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write_on)
    thread.start()
    writer.abort()
    aborted.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(errors) == 1, errors
    assert isinstance(errors[0], StorageError), errors
    assert "abort" in str(errors[0])
    assert not any(storage.store.list_objects(""))
    with pytest.raises(StorageError):
        stream.close()


@pytest.mark.parametrize("call", ["write", "mark_block", "close"])
def test_a_call_racing_an_abort_reports_the_abort(storage: CheckpointStorage, call: str) -> None:
    # The interleaving the thread test above hits only sometimes: abort() lands in another thread after
    # the stream checked it was not aborted and before its file writer runs (which is closed by then).
    writer = storage.begin_checkpoint(JOB, 1)
    stream = writer.open_stream("op/0/keyed")
    stream.write(os.urandom(2 << 20))
    file = stream._file
    inner = getattr(file, "finish" if call == "close" else call)

    def abort_first(*args: Any) -> Any:
        writer.abort()
        return inner(*args)

    setattr(file, "finish" if call == "close" else call, abort_first)
    args: tuple[Any, ...] = (os.urandom(1 << 20),) if call == "write" else ()
    with pytest.raises(StorageError, match="was aborted while being written") as caught:
        getattr(stream, call)(*args)
    assert caught.value.__cause__ is not None, "the file writer's own error is kept as the cause"
    assert not any(storage.store.list_objects(""))
