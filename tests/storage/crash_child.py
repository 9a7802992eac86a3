"""A checkpointing process for the crash tests in ``test_crash.py``: run as a script, never collected.

Usage (with the repository root on ``PYTHONPATH``)::

    python tests/storage/crash_child.py ROOT [--count N] [--kill-at POINT --kill-in K]

It writes checkpoints ``latest + 1``, ``latest + 2``, ... of :data:`JOB_ID` under the local directory
ROOT, after removing what an earlier crash left of incomplete checkpoints. It prints ``ready <id>``
with the first id it will write, then ``done <id>`` after each commit, flushing every line. With
``--kill-at`` it SIGKILLs itself at ``POINT`` while writing its ``K``-th checkpoint (see
:data:`KILL_POINTS`). The state bytes are a pure function of the checkpoint id, so the test can check
every byte that was restored.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn
from unittest import mock

from keystate.storage import (
    METADATA_FILE,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    DistributionMode,
    InputEdge,
    KeyedStateHandle,
    LocalObjectStore,
    ObjectWriter,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    Partitioning,
    PutMode,
    StreamOptions,
    SubtaskState,
    _local,
    key_group_range_for_subtask,
)

JOB_ID = "c0ffee00c0ffee00c0ffee00c0ffee00"
PARALLELISM = 2
MAX_PARALLELISM = 16
INLINE_THRESHOLD = 4 * 1024
OPTIONS = StreamOptions(inline_threshold=INLINE_THRESHOLD, block_size=32 * 1024)

KILL_POINTS = {
    "mid-state": "half of the first chunk of the checkpoint's second state file is written",
    "before-metadata": "every state file is durable; the _metadata write has not started",
    "mid-metadata-temp": "half of the _metadata temp file is written, before os.link",
    "after-link": "_metadata is linked into place; its temp name is not unlinked, the directory not fsynced",
    "before-dir-fsync": "_metadata is linked and its temp name unlinked; the directory is not fsynced",
}
"""Where ``--kill-at`` kills the process; the last two are after the commit point."""


# --- the state of checkpoint N (pure functions of N) -------------------------------------------------


def timestamp(checkpoint_id: int) -> int:
    return 1_700_000_000_000 + checkpoint_id * 1_000


def key_group_bytes(checkpoint_id: int, key_group: int) -> bytes:
    """Random (incompressible) bytes of varied size; the first key group of each subtask is large, so
    every keyed state file is above the inline threshold."""
    rng = random.Random(f"keyed-{checkpoint_id}-{key_group}")
    first = key_group in (0, MAX_PARALLELISM // PARALLELISM)
    size = rng.randrange(20_000, 90_000) if first else rng.choice([0, 16, 700, 3_000, 12_000, 40_000])
    return rng.randbytes(size)


def operator_elements(checkpoint_id: int, index: int) -> list[bytes]:
    """Subtask 0's list state is small enough to be inlined, subtask 1's is a file more often than not."""
    rng = random.Random(f"operator-{checkpoint_id}-{index}")
    largest = 400 if index == 0 else 6_000
    return [rng.randbytes(rng.randrange(1, largest)) for _ in range(rng.randrange(1, 6))]


def write_checkpoint(storage: CheckpointStorage, checkpoint_id: int) -> None:
    """Write checkpoint ``checkpoint_id``: keyed streams, then operator streams, then ``_metadata``."""
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    keyed: list[SubtaskState] = []
    for index in range(PARALLELISM):
        key_groups = key_group_range_for_subtask(MAX_PARALLELISM, PARALLELISM, index)
        with writer.open_stream(f"counts/{index}/keyed") as stream:
            offsets = []
            for kg in key_groups:
                offsets.append(stream.start_block())
                stream.write(key_group_bytes(checkpoint_id, kg))
            handle = stream.close()
        keyed.append(SubtaskState(index, keyed=(KeyedStateHandle(key_groups, tuple(offsets), handle),)))
    operator: list[SubtaskState] = []
    for index in range(PARALLELISM):
        with writer.open_stream(f"source/{index}/operator") as stream:
            positions = []
            for element in operator_elements(checkpoint_id, index):
                positions.append(stream.tell())
                stream.write(element)
            handle = stream.close()
        entry = OperatorStateEntry("splits", DistributionMode.SPLIT, tuple(positions), "bytes")
        operator.append(SubtaskState(index, operator=(OperatorStateHandle((entry,), handle),)))
    metadata = CheckpointMetadata(
        checkpoint_id=checkpoint_id,
        job_id=JOB_ID,
        kind=CheckpointKind.CHECKPOINT,
        timestamp=timestamp(checkpoint_id),
        operators=(
            OperatorState("source", PARALLELISM, 128, subtasks=tuple(operator)),
            OperatorState(
                "counts",
                PARALLELISM,
                MAX_PARALLELISM,
                (InputEdge("source", Partitioning.HASH),),
                subtasks=tuple(keyed),
            ),
        ),
    )
    writer.commit(metadata)


# --- dying at a chosen point -------------------------------------------------------------------------


def die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not kill the process")


class _DyingWriter(ObjectWriter):
    """Passes half of the first chunk to the real writer, then kills the process."""

    def __init__(self, inner: ObjectWriter) -> None:
        self._inner = inner

    def write(self, data: bytes | memoryview) -> None:
        self._inner.write(data[: max(1, len(data) // 2)])
        die()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    @property
    def bytes_written(self) -> int:
        return self._inner.bytes_written


class CrashingStore(LocalObjectStore):
    """A local store that kills the process at ``point`` once :attr:`armed`."""

    def __init__(self, root: Path, point: str | None) -> None:
        super().__init__(root)
        self.point = point
        self.armed = False
        self._state_files = 0

    def _at(self, point: str) -> bool:
        return self.armed and self.point == point

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        writer = super().open_writer(key, mode)
        if self._at("mid-state"):
            self._state_files += 1
            if self._state_files == 2:
                return _DyingWriter(writer)
        return writer

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        if self._at("before-metadata") and key.endswith("/" + METADATA_FILE):
            die()
        super().put(key, data, mode)

    def _write_temp(self, parent: int, name: str, write: Callable[[BinaryIO], object], key: str) -> str:
        if not (self._at("mid-metadata-temp") and name == METADATA_FILE):
            return super()._write_temp(parent, name, write, key)

        def write_half(f: BinaryIO) -> None:
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            die()

        return super()._write_temp(parent, name, write_half, key)


def _has(directory: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def install_link_and_fsync_points(store: CrashingStore) -> list[Any]:
    """Patches that die right after ``os.link`` of ``_metadata`` or right before its directory fsync."""
    real_link = os.link
    real_fsync_dir = _local._fsync_dir

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        real_link(src, dst, **kwargs)
        if store._at("after-link") and os.path.basename(dst) == METADATA_FILE:
            die()

    def fsync_dir(fd: int) -> None:
        if store._at("before-dir-fsync") and _has(fd, METADATA_FILE):
            die()
        real_fsync_dir(fd)

    return [mock.patch.object(os, "link", link), mock.patch.object(_local, "_fsync_dir", fsync_dir)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--count", type=int, default=None, help="stop after this many checkpoints")
    parser.add_argument("--kill-at", choices=sorted(KILL_POINTS), default=None)
    parser.add_argument("--kill-in", type=int, default=1, help="die while writing this checkpoint (1 = first)")
    args = parser.parse_args(argv)

    store = CrashingStore(args.root, args.kill_at)
    checkpoints = CheckpointStorage(store, "", options=OPTIONS)
    latest = checkpoints.latest(JOB_ID)
    next_id = 1 if latest is None else latest.checkpoint_id + 1
    checkpoints.cleanup_incomplete(JOB_ID, below=next_id + 1)
    print(f"ready {next_id}", flush=True)
    patches = install_link_and_fsync_points(store)
    for patch in patches:
        patch.start()
    written = 0
    while args.count is None or written < args.count:
        store.armed = args.kill_at is not None and written + 1 == args.kill_in
        write_checkpoint(checkpoints, next_id)
        print(f"done {next_id}", flush=True)
        next_id += 1
        written += 1
    for patch in patches:
        patch.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
