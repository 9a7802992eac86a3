"""A full disk: every failed write raises a typed ``StorageError`` that says so, an abort never raises
for bytes it was discarding anyway, and no step leaves a ``.tmp-`` file behind (which would keep the
disk full). On a real 3 MiB tmpfs where one can be mounted; failures a tmpfs cannot produce (fsync,
link) are injected."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import (
    CheckpointStorage,
    LocalObjectStore,
    PutMode,
    StorageError,
    StreamOptions,
)
from keystate.storage.format.metadata import HandleScope
from tests.small_disk import fill, free_bytes, small_tmpfs, temp_files, total_bytes

JOB = "0123456789abcdef0123456789abcdef"
NO_SPACE = "no space left on device"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "3m") as mount:
        yield mount


def incompressible(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def write_until_full(write: Callable[[bytes], object], chunks: int) -> StorageError:
    """Write distinct incompressible 64 KiB chunks until the write fails; returns its error."""
    for i in range(chunks):
        try:
            write(incompressible(64 << 10, i))
        except StorageError as exc:
            return exc
    raise AssertionError(f"{chunks} chunks of 64 KiB fit on the small disk")


def assert_disk_full(exc: BaseException) -> None:
    assert isinstance(exc, StorageError), repr(exc)
    assert NO_SPACE in str(exc), str(exc)
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == errno.ENOSPC


def assert_clean(disk: Path, root: Path) -> None:
    """No temp file anywhere, and (but for the filler and directories) the space is free again."""
    assert temp_files(disk) == []
    assert not [p for p in root.rglob("*") if p.is_file()], sorted(root.rglob("*"))


def test_a_put_larger_than_the_disk(disk: Path) -> None:
    store = LocalObjectStore(disk / "root")
    for mode in PutMode:
        with pytest.raises(StorageError) as info:
            store.put(f"job/chk-1/big-{mode.value}", incompressible(4 << 20), mode)
        assert_disk_full(info.value)
    assert_clean(disk, disk / "root")
    assert free_bytes(disk) > total_bytes(disk) - (64 << 10)


def test_a_streaming_write_larger_than_the_disk(disk: Path) -> None:
    store = LocalObjectStore(disk / "root")
    writer = store.open_writer("job/chk-1/op/state.ksf", PutMode.CREATE)
    assert_disk_full(write_until_full(writer.write, 100))
    assert_clean(disk, disk / "root")
    writer.abort()  # safe after the failure
    with pytest.raises(StorageError, match="aborted or failed"):
        writer.close()


def test_close_on_a_full_disk(disk: Path) -> None:
    """Bytes still in the writer's buffer meet the full disk only in close()."""
    store = LocalObjectStore(disk / "root")
    writer = store.open_writer("job/chk-1/op/state.ksf", PutMode.CREATE)
    filler = fill(disk / "filler")
    writer.write(b"x" * 1000)  # buffered: no error yet
    with pytest.raises(StorageError) as info:
        writer.close()
    assert_disk_full(info.value)
    assert temp_files(disk) == []
    filler.unlink()
    assert_clean(disk, disk / "root")


def test_abort_on_a_full_disk_does_not_raise(disk: Path) -> None:
    """Regression: abort closed the file, whose flush of the discarded bytes raised ENOSPC (and, in the
    runtime, ended in an asyncio task nobody awaited: "Task exception was never retrieved")."""
    store = LocalObjectStore(disk / "root")
    writer = store.open_writer("job/chk-1/op/state.ksf", PutMode.CREATE)
    filler = fill(disk / "filler")
    writer.write(b"x" * 1000)
    writer.abort()
    writer.abort()
    assert temp_files(disk) == []
    filler.unlink()
    assert_clean(disk, disk / "root")


def test_a_checkpoint_larger_than_the_disk_aborts_clean(disk: Path) -> None:
    storage = CheckpointStorage(LocalObjectStore(disk / "root"), options=StreamOptions(inline_threshold=0))
    writer = storage.begin_checkpoint(JOB, 1)
    small = writer.open_stream("op/0/keyed")
    small.write(b"fits")
    small.close()
    other = writer.open_stream("op/1/keyed", HandleScope.SHARED)
    other.write(b"buffered")  # still in the stream's buffers when the checkpoint is aborted
    big = writer.open_stream("op/2/keyed")
    assert_disk_full(write_until_full(big.write, 100))
    filler = fill(disk / "filler")  # another writer took the space the failed stream gave back
    writer.abort()  # the other stream's buffered bytes cannot be flushed: they are dropped, no error
    assert temp_files(disk) == []
    filler.unlink()
    assert_clean(disk, disk / "root")


# --- failures a tmpfs does not produce, injected ---------------------------------------------------


def _failing(real: Callable[..., Any], code: int, when: Callable[[tuple[Any, ...]], bool]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if when(args):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return call


def _is_temp_fd(args: tuple[Any, ...]) -> bool:
    """``os.fsync`` of a file (a temp file), not of a directory."""
    return isinstance(args[0], int) and stat.S_ISREG(os.fstat(args[0]).st_mode)


@pytest.mark.parametrize("step", ["fsync", "link", "replace"])
@pytest.mark.parametrize("how", ["put", "writer"])
def test_every_failing_step_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, how: str
) -> None:
    store = LocalObjectStore(tmp_path / "root")
    mode = PutMode.OVERWRITE if step == "replace" else PutMode.CREATE
    writer = store.open_writer("job/chk-1/obj", mode) if how == "writer" else None
    if writer is not None:
        writer.write(b"x" * 1000)
    if step == "fsync":
        monkeypatch.setattr(os, "fsync", _failing(os.fsync, errno.EIO, _is_temp_fd))
    elif step == "link":
        monkeypatch.setattr(os, "link", _failing(os.link, errno.ENOSPC, lambda a: True))
    else:
        monkeypatch.setattr(os, "replace", _failing(os.replace, errno.ENOSPC, lambda a: True))
    complete: Callable[[], None] = (
        writer.close if writer is not None else lambda: store.put("job/chk-1/obj", b"x" * 1000, mode)
    )
    with pytest.raises(StorageError) as info:
        complete()
    assert isinstance(info.value.__cause__, OSError), repr(info.value)
    assert "cannot write" in str(info.value)
    assert temp_files(tmp_path) == []
    monkeypatch.undo()
    assert not store.exists("job/chk-1/obj")
