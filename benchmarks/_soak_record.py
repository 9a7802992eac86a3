"""What the soak (``benchmarks/soak.py``) records while its job runs: samples of the process and the disk,
checkpoint completions and failures, event-loop lag; rows kept in flat arrays so recording retains no objects."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from benchmarks._soak_job import Probe
from benchmarks._soak_measure import (
    Disk,
    live_objects,
    malloc_stats,
    measure_disk,
    open_fds,
    proc_status,
    rss_bytes,
    walk,
)
from keystate.runtime import CheckpointFailureReason
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind, OperatorStatus


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    """Seconds since the job was submitted."""
    rss: int
    rss_anon: int
    """Anonymous memory (heap, thread stacks) of the RSS; the rest is file mappings (LMDB, libraries)."""
    rss_file: int
    blocks: int
    """``sys.getallocatedblocks()``."""
    malloc_used: int
    malloc_free: int
    malloc_after_gc: int
    """C heap in use right after ``gc.collect()``: what reachable objects and C libraries hold."""
    collected: int
    """Unreachable objects (reference cycles) ``gc.collect()`` found since the previous sample."""
    objects: int
    """gc-tracked objects, the soak's own records (types of the benchmarks package) left out."""
    fds: int
    threads: int
    processed: int
    cpu: float
    """Process CPU seconds so far."""
    root_files: int
    """Under the location, the sink's output/ left out."""
    root_bytes: int
    complete: int
    """``chk-*`` directories with ``_metadata``."""
    incomplete: int
    """``chk-*`` directories without ``_metadata`` (the one in flight, or an aborted one's leftovers)."""
    output_files: int
    output_bytes: int
    staging_files: int
    lmdb_files: int
    lmdb_bytes: int
    lmdb_dirs: int


R = TypeVar("R")


class Table(Generic[R]):
    """Rows of a flat dataclass of numbers, kept in ``array('d')`` columns: recording a row retains no Python
    object, so the soak's own records do not show up as growth in the memory figures it samples."""

    def __init__(self, cls: type[R]) -> None:
        self._cls = cls
        self._types = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        self._columns = {name: array("d") for name in self._types}

    def __len__(self) -> int:
        return len(next(iter(self._columns.values())))

    def append(self, row: R) -> None:
        for name, column in self._columns.items():
            column.append(getattr(row, name))

    def rows(self) -> list[R]:
        convert: dict[str, Callable[[float], Any]] = {"int": int, "bool": bool, "float": float}
        fields = [(name, convert[str(kind)], self._columns[name]) for name, kind in self._types.items()]
        return [self._cls(**{name: conv(column[i]) for name, conv, column in fields}) for i in range(len(self))]


@dataclass(frozen=True, slots=True)
class CheckpointEvent:
    t: float
    """Seconds since submit, at completion."""
    checkpoint_id: int
    duration_ms: float
    savepoint: bool
    state_bytes: int
    dir_files: int
    dir_bytes: int


@dataclass(frozen=True, slots=True)
class Failure:
    t: float
    checkpoint_id: int
    reason: str
    message: str


@dataclass
class Recorder:
    """Everything observed while the job runs."""

    started: float
    job_dir: Path
    checkpoints: Table[CheckpointEvent] = field(default_factory=lambda: Table(CheckpointEvent))
    samples: Table[Sample] = field(default_factory=lambda: Table(Sample))
    lag_times: array[float] = field(default_factory=lambda: array("d"))
    lags: array[float] = field(default_factory=lambda: array("d"))
    """Event-loop lag in seconds per ticker round, at ``lag_times``."""
    failures: list[Failure] = field(default_factory=list)
    failures_checked: int = 0
    leaked: list[int] = field(default_factory=list)
    """Failed checkpoints whose directory was still there at a sample at least 1 s after the failure."""
    orders_finished_at: float | None = None

    def check_failed(self, disk: Disk) -> None:
        """Note failed checkpoints whose directory is still there a second after the failure."""
        now = self.now()
        while self.failures_checked < len(self.failures) and self.failures[self.failures_checked].t + 1.0 <= now:
            failed = self.failures[self.failures_checked].checkpoint_id
            if failed in disk.complete or failed in disk.incomplete:
                self.leaked.append(failed)
            self.failures_checked += 1

    def now(self) -> float:
        return time.monotonic() - self.started

    def on_complete(self, checkpoint: CompletedCheckpoint) -> None:
        duration = time.time() * 1000 - checkpoint.metadata.timestamp
        files = size = 0
        if checkpoint.kind is CheckpointKind.CHECKPOINT:
            tree = walk(self.job_dir / f"chk-{checkpoint.checkpoint_id}")
            files, size = tree.files, tree.bytes
        t = self.now()
        self.checkpoints.append(
            CheckpointEvent(
                t,
                checkpoint.checkpoint_id,
                duration,
                checkpoint.kind is CheckpointKind.SAVEPOINT,
                checkpoint.metadata.total_state_bytes,
                files,
                size,
            )
        )
        if self.orders_finished_at is None:
            for op in checkpoint.metadata.operators:
                if op.uid == "order-totals" and op.status is OperatorStatus.FULLY_FINISHED:
                    self.orders_finished_at = t

    def on_failure(self, checkpoint_id: int, reason: CheckpointFailureReason, message: str) -> None:
        self.failures.append(Failure(self.now(), checkpoint_id, reason.value, message))


async def ticker(recorder: Recorder, stop: asyncio.Event, period: float = 0.05) -> None:
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(period)
        recorder.lag_times.append(recorder.now())
        recorder.lags.append(time.monotonic() - before - period)


async def take_sample(recorder: Recorder, probe: Probe, location: Path, lmdb_dir: Path) -> Sample:
    disk = await asyncio.to_thread(measure_disk, location, recorder.job_dir, lmdb_dir)
    recorder.check_failed(disk)
    status = proc_status()
    malloc_used, malloc_free = malloc_stats()
    rss = rss_bytes()
    # Count what is reachable: cyclic garbage waiting for the collector is not a leak (but is counted).
    collected = gc.collect()
    malloc_after_gc, _ = malloc_stats()
    return Sample(
        t=recorder.now(),
        rss=rss,
        rss_anon=status.get("RssAnon", -1) * 1024,
        rss_file=status.get("RssFile", -1) * 1024,
        blocks=sys.getallocatedblocks(),
        malloc_used=malloc_used,
        malloc_free=malloc_free,
        malloc_after_gc=malloc_after_gc,
        collected=collected,
        objects=live_objects(),
        fds=open_fds(),
        threads=status.get("Threads", -1),
        processed=probe.total,
        cpu=time.process_time(),
        root_files=disk.root.files,
        root_bytes=disk.root.bytes,
        complete=len(disk.complete),
        incomplete=len(disk.incomplete),
        output_files=disk.output_files,
        output_bytes=disk.output_bytes,
        staging_files=disk.staging_files,
        lmdb_files=disk.lmdb.files,
        lmdb_bytes=disk.lmdb.bytes,
        lmdb_dirs=disk.lmdb.dirs,
    )
