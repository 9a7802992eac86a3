"""Soak: the demo-style job under checkpoints every 200 ms for minutes; memory, files and durations stay flat.

Not a CI test: a load script to run by hand (``--quick``: 1 minute, about 65 s in all; default 10 minutes).

**The job** (the demo job of DESIGN.md section 9 with more keys and higher rates, built from the demo's own
``OrderTotals`` and ``ClickCounts`` functions)::

    orders (bounded, 4 splits, p=2) --hash--> order-totals (keyed, p=2) --\\
                                                                            +--> sink (TransactionalFileSink, p=1)
    clicks (unbounded, 1 split, p=1) --hash--> click-counts (keyed, p=2) --/

20,000 users and 30,000 pages (the demo has 50 and 20), so every snapshot writes real state files rather
than inlining its state in ``_metadata`` (the inline threshold is 20 KiB). LMDB keyed state in a scratch
directory, local checkpoint storage (fsync on), ``num_retained=2``, one checkpoint at a time, checkpoint
timeout 30 s and 5 tolerated failures (so a failure is counted and reported rather than ending the soak at
once). The orders branch is paced to end inside the warm-up (about 40 s into a 10-minute run, 15 s into a
quick one), so the steady state is the FLIP-147 one: ``orders`` and ``order-totals`` recorded as finished
in every checkpoint while the clicks branch goes on. At the end the job is stopped with a drained savepoint.

**Sampled** every 5 s (2 s with ``--quick``): process RSS (``VmRSS`` of ``/proc/self/status``, split into
anonymous and file-backed: LMDB's memory map counts as file-backed); the C heap (glibc ``mallinfo2``: bytes in
use, free but held) before and after a ``gc.collect()`` that each sample runs (so object counts are of
reachable objects; the unreachable ones it finds, reference cycles, are reported as "cyclic garbage");
Python allocated blocks (``sys.getallocatedblocks()``) and live gc-tracked objects (``gc.get_objects()`` less
the soak's own records; tracemalloc slows the job down too much to run throughout, ``--tracemalloc FRAMES``
turns it on after the warm-up as a diagnostic); open file descriptors and threads; files / bytes /
directories under the checkpoint root (everything under the location except the sink's ``output/``, which
grows by design and is reported on its own, with its ``_staging/``); incomplete ``chk-*`` directories (no
``_metadata``); files and bytes of the LMDB environments in the scratch directory; records processed by the
two keyed functions; event-loop lag (a 50 ms ticker's overshoot). A gc type histogram is taken after the
warm-up and again at the end, and the types that grew most are listed. ``--samples FILE`` writes every
sample as CSV.

**Per checkpoint**: duration from trigger to completion (``_metadata.timestamp``, taken by the coordinator at
trigger, to the coordinator's completion listener, which runs after retention and the commit
notifications), the size of its directory, and failures from ``failure_listeners`` with their reason.

**Reported**: each sampled memory figure at start, after the warm-up (the first minute, or a third of a
shorter run), at the end and its maximum, with least-squares slopes per minute over the samples after the
warm-up and over the second half of them (growth that levels off has a smaller second slope);
files and bytes under the root over time (max and final) against the bound (num_retained + 2 checkpoints:
the retained ones, the one just completed whose predecessor retention is still deleting, and the next one
in flight) times the largest checkpoint seen; checkpoint duration p50 / p95 / max and the longest gap
between completions per window (one minute; a quarter of a shorter run); records/s; committed output
records. After the drained stop: no ``chk-*`` directory without ``_metadata`` (an aborted checkpoint's
leftovers) may remain, nor any directory of a checkpoint whose failure was reported during the run; the
committed output must hold every order exactly once and, per page, the click counts ``1..n`` exactly once
(no duplicate, no gap), and as many records as the keyed functions processed. A failed check makes the
exit status 1.

``--json`` prints ``{"benchmarks": [{"name", "value", "unit", "baseline", "ratio"}]}`` (DESIGN.md section 8);
every ratio is "higher is better" with 1.0 meaning flat / within bound / exact; the entries are explained
in docs/reliability.md ("Soak").

Run from the repository root: ``python benchmarks/soak.py [--quick] [--minutes M] [--json]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is benchmarks/ and benchmarks/runtime.py would shadow the `runtime` package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import csv
import ctypes
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
import tracemalloc
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from runtime import (
    CheckpointConfig,
    CheckpointFailureReason,
    GeneratorSource,
    JobConfig,
    JobGraph,
    JobStatus,
    OperatorContext,
    SequenceSource,
    TransactionalFileSink,
    submit,
)
from runtime.demo import ClickCounts, OrderTotals
from statebackend import LmdbStateBackend
from storage.checkpoints import CompletedCheckpoint
from storage.metadata import CheckpointKind, OperatorStatus

USERS = 20_000
PAGES = 30_000
ORDER_SPLITS = 4
CLICK_SPLITS = 1
MIB = 1 << 20


# --- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    duration: float
    """Seconds the job runs before the drained stop."""
    sample_every: float
    interval: float
    """Checkpoint interval in seconds."""
    num_retained: int
    order_rate: float
    """Orders per second in all (spread over the splits) while the bounded branch runs."""
    order_seconds: float
    """How long the bounded branch runs: orders = order_rate * order_seconds."""
    click_rate: float
    """Clicks per second (unbounded)."""
    tracemalloc: int = 0
    """Frames per tracemalloc trace from the end of the warm-up on (0: off; a diagnostic, it slows the run)."""

    @property
    def warm_up(self) -> float:
        return min(60.0, self.duration / 3)

    @property
    def window(self) -> float:
        return min(60.0, self.duration / 4)

    @property
    def orders(self) -> int:
        return int(self.order_rate * self.order_seconds)


def settings_from(args: argparse.Namespace) -> Settings:
    minutes = 1.0 if args.quick else args.minutes
    duration = minutes * 60
    order_seconds = args.order_seconds if args.order_seconds is not None else min(40.0, duration / 4)
    return Settings(
        duration=duration,
        sample_every=args.sample_every or (2.0 if duration <= 120 else 5.0),
        interval=args.interval,
        num_retained=args.num_retained,
        order_rate=args.order_rate,
        order_seconds=order_seconds,
        click_rate=args.click_rate,
        tracemalloc=args.tracemalloc,
    )


# --- the job -----------------------------------------------------------------------------------------------


def make_order(n: int) -> dict[str, Any]:
    return {"order": n, "user": f"user-{n * 7919 % USERS:04d}", "amount": n * 31 % 97 + 1}


def make_click(n: int) -> dict[str, Any]:
    return {"click": n, "page": f"/page/{n * 104729 % PAGES}"}


def user_of(order: dict[str, Any]) -> Any:
    return order["user"]


def page_of(click: dict[str, Any]) -> Any:
    return click["page"]


class Probe:
    """Records the keyed functions processed. Operators are deep-copied per subtask; the probe is shared."""

    def __init__(self) -> None:
        self.orders = 0
        self.clicks = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Probe:
        return self

    @property
    def total(self) -> int:
        return self.orders + self.clicks


class CountedOrderTotals(OrderTotals):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        super().process_element(value, ctx)
        self.probe.orders += 1


class CountedClickCounts(ClickCounts):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        super().process_element(value, ctx)
        self.probe.clicks += 1


def build_soak_job(settings: Settings, output: str, probe: Probe) -> JobGraph:
    job = JobGraph("keystate-soak")
    orders = job.source(
        SequenceSource(settings.orders, splits=ORDER_SPLITS, make=make_order, rate=settings.order_rate / ORDER_SPLITS),
        uid="orders",
        parallelism=2,
    )
    clicks = job.source(
        GeneratorSource(make_click, splits=CLICK_SPLITS, rate=settings.click_rate / CLICK_SPLITS),
        uid="clicks",
        parallelism=1,
    )
    totals = orders.key_by(user_of).process(CountedOrderTotals(probe), uid="order-totals", parallelism=2)
    counts = clicks.key_by(page_of).process(CountedClickCounts(probe), uid="click-counts", parallelism=2)
    job.operator(
        TransactionalFileSink(output), uid="sink", inputs=[totals.rebalance(), counts.rebalance()], parallelism=1
    )
    return job


# --- measuring ---------------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` (KiB) and ``Threads`` of this process; empty off Linux."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                    found[name] = int(rest.split()[0])
    except OSError:
        pass
    return found


def rss_bytes() -> int:
    status = _proc_status()
    if "VmRSS" in status:
        return status["VmRSS"] * 1024
    import resource  # peak, not current: the best there is without /proc

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, type[ctypes.c_size_t]]]] = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    fn.argtypes = []

    def call() -> _Mallinfo2:
        info: _Mallinfo2 = fn()
        return info

    return call


_MALLINFO2 = _load_mallinfo2()


def malloc_stats() -> tuple[int, int]:
    """C heap bytes in use (``uordblks + hblkhd``) and free but held (``fordblks``), all arenas; -1 off glibc.

    Python objects over 512 bytes, bytes buffers and every C library allocate here; pymalloc's small-object
    arenas are mmapped separately (``sys.getallocatedblocks()`` covers them).
    """
    if _MALLINFO2 is None:
        return -1, -1
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd), int(info.fordblks)


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


@dataclass(frozen=True, slots=True)
class Tree:
    files: int = 0
    bytes: int = 0
    dirs: int = 0


def walk(root: Path, *, skip: frozenset[str] = frozenset()) -> Tree:
    """Regular files, their bytes and the directories under ``root`` (top-level names in ``skip`` left out)."""
    files = size = dirs = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if directory == root and entry.name in skip:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # removed meanwhile (retention runs concurrently)
    return Tree(files, size, dirs)


def checkpoint_dirs(job_dir: Path) -> tuple[list[int], list[int]]:
    """Ids of the ``chk-*`` directories with and without ``_metadata``."""
    complete: list[int] = []
    incomplete: list[int] = []
    try:
        names = os.listdir(job_dir)
    except FileNotFoundError:
        return complete, incomplete
    for name in names:
        if name.startswith("chk-") and name[4:].isdigit():
            (complete if (job_dir / name / "_metadata").exists() else incomplete).append(int(name[4:]))
    return sorted(complete), sorted(incomplete)


@dataclass(frozen=True, slots=True)
class Disk:
    root: Tree
    """Under the location, the sink's output/ left out."""
    output_files: int
    output_bytes: int
    staging_files: int
    lmdb: Tree
    complete: tuple[int, ...]
    incomplete: tuple[int, ...]


def measure_disk(location: Path, job_dir: Path, lmdb_dir: Path) -> Disk:
    output = location / "output"
    out_files = out_bytes = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(output):
            if entry.is_file() and entry.name.endswith(".jsonl"):
                out_files += 1
                out_bytes += entry.stat().st_size
    staging = 0
    with contextlib.suppress(FileNotFoundError):
        staging = sum(1 for e in os.scandir(output / "_staging") if e.is_file())
    complete, incomplete = checkpoint_dirs(job_dir)
    return Disk(
        root=walk(location, skip=frozenset({"output"})),
        output_files=out_files,
        output_bytes=out_bytes,
        staging_files=staging,
        lmdb=walk(lmdb_dir),
        complete=tuple(complete),
        incomplete=tuple(incomplete),
    )


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
    """gc-tracked objects, the soak's own records (types of this module) left out."""
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


METRICS: dict[str, tuple[str, Callable[[Sample], float], str]] = {
    "rss": ("RSS", lambda x: x.rss / MIB, "MiB"),
    "anon": ("  anonymous", lambda x: x.rss_anon / MIB, "MiB"),
    "file": ("  file-backed", lambda x: x.rss_file / MIB, "MiB"),
    "malloc": ("malloc in use", lambda x: x.malloc_used / MIB, "MiB"),
    "malloc_free": ("malloc free", lambda x: x.malloc_free / MIB, "MiB"),
    "malloc_gc": ("malloc after gc", lambda x: x.malloc_after_gc / MIB, "MiB"),
    "collected": ("cyclic garbage", lambda x: x.collected, "objects/sample"),
    "blocks": ("alloc. blocks", lambda x: x.blocks, "blocks"),
    "objects": ("gc objects", lambda x: x.objects, "objects"),
    "fds": ("open fds", lambda x: x.fds, "fds"),
    "threads": ("threads", lambda x: x.threads, "threads"),
    "lmdb": ("LMDB scratch", lambda x: x.lmdb_bytes / MIB, "MiB"),
}
"""Memory-like figures sampled: label, value from a sample, unit."""


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


def live_objects() -> int:
    """gc-tracked objects, without the soak's own records (which grow by design)."""
    return sum(1 for o in gc.get_objects() if type(o).__module__ != __name__)


def top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, limit: int = 12) -> list[str]:
    """The allocation sites whose live bytes grew most between two snapshots (tracebacks, newest frame last)."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    lines: list[str] = []
    for stat in stats[:limit]:
        lines.append(
            f"{stat.size_diff / 1024:+,.1f} KiB ({stat.count_diff:+,} blocks), {stat.size / 1024:,.1f} KiB live"
        )
        lines.extend(f"    {frame.filename}:{frame.lineno}" for frame in stat.traceback)
    return lines


def type_histogram() -> Counter[str]:
    """Live gc-tracked objects per type (``module.qualname``), the soak's own left out (after a collection)."""
    gc.collect()
    return Counter(f"{t.__module__}.{t.__qualname__}" for t in map(type, gc.get_objects()) if t.__module__ != __name__)


async def ticker(recorder: Recorder, stop: asyncio.Event, period: float = 0.05) -> None:
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(period)
        recorder.lag_times.append(recorder.now())
        recorder.lags.append(time.monotonic() - before - period)


async def take_sample(recorder: Recorder, probe: Probe, location: Path, lmdb_dir: Path) -> Sample:
    disk = await asyncio.to_thread(measure_disk, location, recorder.job_dir, lmdb_dir)
    recorder.check_failed(disk)
    status = _proc_status()
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


# --- output verification -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputCheck:
    files: int
    records: int
    orders: int
    distinct_orders: int
    missing_orders: int
    clicks: int
    distinct_clicks: int
    click_gaps: int
    """Pages whose committed counts are not exactly 1..n."""
    unknown: int

    @property
    def duplicates(self) -> int:
        return (self.orders - self.distinct_orders) + (self.clicks - self.distinct_clicks)


def verify_output(output: Path, expected_orders: int) -> OutputCheck:
    files = records = unknown = 0
    orders: Counter[int] = Counter()
    clicks: dict[str, list[int]] = {}
    for path in sorted(output.glob("*.jsonl")):
        files += 1
        with path.open("rb") as f:
            for line in f:
                records += 1
                record = json.loads(line)
                if "order" in record:
                    orders[record["order"]] += 1
                elif "page" in record:
                    clicks.setdefault(record["page"], []).append(record["clicks"])
                else:
                    unknown += 1
    order_total = sum(orders.values())
    click_total = sum(len(c) for c in clicks.values())
    distinct_clicks = sum(len(set(c)) for c in clicks.values())
    gaps = sum(1 for c in clicks.values() if sorted(c) != list(range(1, len(c) + 1)))
    missing = sum(1 for n in range(expected_orders) if n not in orders)
    return OutputCheck(files, records, order_total, len(orders), missing, click_total, distinct_clicks, gaps, unknown)


# --- the run -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    settings: Settings
    recorder: Recorder
    samples: list[Sample]
    checkpoints: list[CheckpointEvent]
    before: Counter[str]
    after: Counter[str]
    warm_index: int
    stop_seconds: float
    savepoint: CompletedCheckpoint | None
    status: JobStatus
    attempts: int
    error: BaseException | None
    completed: int
    final_disk: Disk
    final_samples_processed: int
    output: OutputCheck
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    elapsed: float
    location: Path
    traces: list[str]
    """With ``--tracemalloc``: the allocation sites that grew most after the warm-up."""


async def soak(settings: Settings, tmp: Path, out: Callable[[str], None]) -> Run:
    location = tmp / "checkpoints"
    lmdb_dir = tmp / "lmdb"
    lmdb_dir.mkdir(parents=True)
    load_start = os.getloadavg()
    probe = Probe()
    config = JobConfig(
        state_backend=LmdbStateBackend(lmdb_dir),
        checkpoint=CheckpointConfig(
            interval=settings.interval,
            storage=str(location),
            num_retained=settings.num_retained,
            timeout=30.0,
            tolerable_failed_checkpoints=5,
        ),
    )
    gc.collect()
    started = time.monotonic()
    client = submit(build_soak_job(settings, str(location / "output"), probe), config)
    recorder = Recorder(started, location / client.job_id)
    client.coordinator.listeners.append(recorder.on_complete)
    client.coordinator.failure_listeners.append(recorder.on_failure)
    out(
        f"soak: job {client.job_id}, {settings.duration / 60:g} min, checkpoints every "
        f"{settings.interval * 1000:.0f} ms to {location}, load average {load_start[0]:.2f}"
    )
    stop_ticker = asyncio.Event()
    tick = asyncio.ensure_future(ticker(recorder, stop_ticker))
    waiter = asyncio.ensure_future(client.wait())
    before: Counter[str] = Counter()
    traced: tracemalloc.Snapshot | None = None
    traces: list[str] = []
    warm_index = -1
    next_report = 0.0
    try:
        deadline = started + settings.duration
        next_sample = started
        while True:
            sample = await take_sample(recorder, probe, location, lmdb_dir)
            recorder.samples.append(sample)
            if warm_index < 0 and sample.t >= settings.warm_up:
                warm_index = len(recorder.samples) - 1
                before = type_histogram()
                if settings.tracemalloc:
                    tracemalloc.start(settings.tracemalloc)
                    traced = tracemalloc.take_snapshot()
            if sample.t >= next_report:
                next_report += 60.0 if settings.duration > 120 else 15.0
                out(
                    f"  {sample.t:6.0f} s  rss {sample.rss / MIB:6.1f} MiB  objects {sample.objects:,}  "
                    f"checkpoints {client.coordinator.completed:,}  failed {len(recorder.failures)}  "
                    f"root {sample.root_files} files {sample.root_bytes / 1024:,.0f} KiB  "
                    f"records {sample.processed:,}"
                )
            next_sample += settings.sample_every
            if next_sample >= deadline:
                break
            await asyncio.wait({waiter}, timeout=max(0.0, next_sample - time.monotonic()))
            if waiter.done():
                result = waiter.result()
                raise RuntimeError(f"the soak job ended on its own ({result.status}): {result.error}")
        await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()))
        last = await take_sample(recorder, probe, location, lmdb_dir)
        recorder.samples.append(last)
        after = type_histogram()
        if traced is not None:
            traces = top_growth(traced, tracemalloc.take_snapshot())
            tracemalloc.stop()
        if warm_index < 0:
            warm_index = 0
        out(f"stopping with a drained savepoint after {recorder.now():.1f} s ...")
        stop_started = time.monotonic()
        savepoint = await client.stop_with_savepoint(drain=True)
        result = await client.wait()
        stop_seconds = time.monotonic() - stop_started
    finally:
        stop_ticker.set()
        await asyncio.gather(tick, return_exceptions=True)
        if not waiter.done():
            await client.cancel()
    final_disk = measure_disk(location, recorder.job_dir, lmdb_dir)
    output = verify_output(location / "output", settings.orders)
    return Run(
        settings=settings,
        recorder=recorder,
        samples=recorder.samples.rows(),
        checkpoints=recorder.checkpoints.rows(),
        before=before,
        after=after,
        warm_index=warm_index,
        stop_seconds=stop_seconds,
        savepoint=savepoint,
        status=result.status,
        attempts=result.attempts,
        error=result.error,
        completed=client.coordinator.completed,
        final_disk=final_disk,
        final_samples_processed=probe.total,
        output=output,
        load_start=load_start,
        load_end=os.getloadavg(),
        elapsed=time.monotonic() - started,
        location=location,
        traces=traces,
    )


# --- analysis ----------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute; 0.0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float
    checkpoints: int
    failed: int
    p50: float
    p95: float
    max: float
    max_gap: float
    """Longest time between consecutive checkpoint completions ending in this window (s)."""
    rate: float
    """Records processed per second."""
    rss: int
    objects: int
    root_files: int
    root_bytes: int
    lag: float
    """Largest event-loop lag (s)."""


def windows(run: Run) -> list[Window]:
    s = run.settings
    rec = run.recorder
    regular = [c for c in run.checkpoints if not c.savepoint]
    gaps = [(c.t, c.t - (regular[i - 1].t if i else 0.0)) for i, c in enumerate(regular)]
    count = max(1, round(s.duration / s.window))
    out: list[Window] = []
    for k in range(count):
        lo, hi = k * s.window, (k + 1) * s.window if k < count - 1 else math.inf
        durations = [c.duration_ms for c in regular if lo <= c.t < hi]
        inside = [x for x in run.samples if lo <= x.t < hi] or run.samples[-1:]
        before = [x for x in run.samples if x.t < lo]
        first = before[-1] if before else run.samples[0]
        last = inside[-1]
        rate = (last.processed - first.processed) / (last.t - first.t) if last.t > first.t else 0.0
        out.append(
            Window(
                lo,
                min(hi, s.duration),
                len(durations),
                sum(1 for f in rec.failures if lo <= f.t < hi),
                percentile(durations, 50),
                percentile(durations, 95),
                max(durations, default=0.0),
                max((g for t, g in gaps if lo <= t < hi), default=0.0),
                rate,
                last.rss,
                last.objects,
                max(x.root_files for x in inside),
                max(x.root_bytes for x in inside),
                max((lag for t, lag in zip(rec.lag_times, rec.lags, strict=True) if lo <= t < hi), default=0.0),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark line: ``ratio`` = value / baseline, or baseline / value when ``inverted``."""

    name: str
    value: float
    baseline: float
    unit: str
    inverted: bool = False

    @property
    def ratio(self) -> float:
        if self.inverted:
            return self.baseline / self.value if self.value else float("inf")
        return self.value / self.baseline if self.baseline else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _round(self.value),
            "unit": self.unit,
            "baseline": _round(self.baseline),
            "ratio": round(self.ratio, 3),
        }


def _round(x: float) -> float:
    return round(x, 1) if abs(x) >= 100 else float(f"{x:.4g}")


@dataclass(frozen=True)
class Analysis:
    warm: Sample
    end: Sample
    slopes: dict[str, tuple[float, float]]
    """Per memory metric (see ``METRICS``): least-squares slope per minute over the samples after the warm-up,
    and over the second half of those samples (growth that levels off shows a smaller second figure)."""
    max_rss: int
    max_root_files: int
    max_root_bytes: int
    final_root: Tree
    largest_checkpoint: CheckpointEvent
    bound_files: int
    bound_bytes: int
    max_incomplete: int
    leftover_incomplete: tuple[int, ...]
    leaked_failed: tuple[int, ...]
    """Ids of failed checkpoints whose directory was still there a sample later (>= 1 s after the failure)."""
    windows: list[Window]
    steady_rate: float
    configured_steady_rate: float
    growth: list[tuple[str, int, int]]
    """Types with the largest growth in live objects: (type, after warm-up, end)."""
    checks: list[tuple[str, bool]]


def analyse(run: Run) -> Analysis:
    s = run.settings
    samples = run.samples
    warm, end = samples[run.warm_index], samples[-1]
    steady = samples[run.warm_index :]

    def slope(points: list[Sample], get: Callable[[Sample], float]) -> float:
        return slope_per_minute([(x.t, get(x)) for x in points])

    regular = [c for c in run.checkpoints if not c.savepoint]
    if not regular:
        raise RuntimeError("no checkpoint completed during the soak")
    largest = max(regular, key=lambda c: c.dir_bytes)
    max_files = max(c.dir_files for c in regular)
    held = s.num_retained + 2
    leaked = run.recorder.leaked
    orders_end = run.recorder.orders_finished_at or s.order_seconds
    steady_rate = (end.processed - warm.processed) / (end.t - warm.t) if end.t > warm.t else 0.0
    configured = s.click_rate + (s.order_rate if orders_end > warm.t else 0.0)
    growth = sorted(
        ((name, run.before.get(name, 0), n) for name, n in run.after.items() if n > run.before.get(name, 0)),
        key=lambda g: g[2] - g[1],
        reverse=True,
    )[:8]
    a = Analysis(
        warm=warm,
        end=end,
        slopes={
            name: (slope(steady, get), slope(steady[len(steady) // 2 :], get)) for name, (_, get, _) in METRICS.items()
        },
        max_rss=max(x.rss for x in samples),
        max_root_files=max(x.root_files for x in samples),
        max_root_bytes=max(x.root_bytes for x in samples),
        final_root=run.final_disk.root,
        largest_checkpoint=largest,
        bound_files=held * max_files,
        bound_bytes=held * largest.dir_bytes,
        max_incomplete=max(x.incomplete for x in samples),
        leftover_incomplete=run.final_disk.incomplete,
        leaked_failed=tuple(leaked),
        windows=windows(run),
        steady_rate=steady_rate,
        configured_steady_rate=configured,
        growth=growth,
        checks=[],
    )
    o = run.output
    a.checks.extend(
        [
            (
                f"job finished after the drained savepoint (status {run.status.value}, attempts {run.attempts})",
                run.status is JobStatus.FINISHED and run.attempts == 1,
            ),
            (
                f"files under the root stayed within the bound (max {a.max_root_files} <= {a.bound_files})",
                a.max_root_files <= a.bound_files,
            ),
            (
                f"bytes under the root stayed within the bound (max {a.max_root_bytes:,} <= {a.bound_bytes:,})",
                a.max_root_bytes <= a.bound_bytes,
            ),
            (
                f"no leftover chk-* directory without _metadata after the stop (found {list(a.leftover_incomplete)})",
                not a.leftover_incomplete,
            ),
            (f"no directory of a failed checkpoint left behind (found {list(a.leaked_failed)})", not a.leaked_failed),
            (
                f"retained checkpoints after the stop <= num_retained (found {len(run.final_disk.complete)})",
                len(run.final_disk.complete) <= s.num_retained,
            ),
            (f"committed output has no duplicates (found {o.duplicates})", o.duplicates == 0),
            (f"every order committed (missing {o.missing_orders} of {s.orders:,})", o.missing_orders == 0),
            (f"click counts per page are exactly 1..n (pages with gaps or extras: {o.click_gaps})", o.click_gaps == 0),
            (
                f"committed records = records processed ({o.records:,} vs {run.final_samples_processed:,})",
                o.records == run.final_samples_processed and o.unknown == 0,
            ),
            (
                f"nothing left staged uncommitted (found {run.final_disk.staging_files})",
                run.final_disk.staging_files == 0,
            ),
        ]
    )
    return a


def results(run: Run, a: Analysis) -> list[Result]:
    first = next((w for w in a.windows if w.start >= run.settings.warm_up - 1e-9 and w.checkpoints), a.windows[0])
    last = a.windows[-1]
    failed = len(run.recorder.failures)
    regular = sum(1 for c in run.checkpoints if not c.savepoint)
    warm_rss = a.warm.rss / MIB
    return [
        Result("RSS at the end vs after warm-up", a.end.rss / MIB, warm_rss, "MiB", inverted=True),
        Result(
            "RSS in 1 h at the post-warm-up slope vs after warm-up",
            max(warm_rss + 60 * a.slopes["rss"][0], 1e-9),
            warm_rss,
            "MiB",
            inverted=True,
        ),
        Result("gc objects at the end vs after warm-up", a.end.objects, a.warm.objects, "objects", inverted=True),
        Result("open fds at the end vs after warm-up", a.end.fds, a.warm.fds, "fds", inverted=True),
        Result(
            "LMDB scratch bytes at the end vs after warm-up",
            a.end.lmdb_bytes / MIB,
            a.warm.lmdb_bytes / MIB,
            "MiB",
            inverted=True,
        ),
        Result(
            "checkpoint p95 duration, last window vs first after warm-up",
            last.p95,
            first.p95,
            "ms",
            inverted=True,
        ),
        Result(
            "bytes under checkpoint root, max vs bound",
            a.max_root_bytes / 1024,
            a.bound_bytes / 1024,
            "KiB",
            inverted=True,
        ),
        Result("files under checkpoint root, max vs bound", a.max_root_files, a.bound_files, "files", inverted=True),
        Result("records/s after warm-up vs source rate", a.steady_rate, a.configured_steady_rate, "rec/s"),
        Result("checkpoints completed vs triggered", regular, regular + failed, "checkpoints"),
        Result(
            "distinct committed records vs records processed",
            run.output.distinct_orders + run.output.distinct_clicks,
            run.final_samples_processed,
            "records",
        ),
    ]


def render(run: Run, a: Analysis, res: list[Result]) -> str:
    s, rec = run.settings, run.recorder
    regular = [c for c in run.checkpoints if not c.savepoint]
    start = run.samples[0]
    cpu = run.samples[-1].cpu - start.cpu
    wall = run.samples[-1].t - start.t
    lines = [
        f"keystate soak: {s.duration / 60:g} min, checkpoint every {s.interval * 1000:.0f} ms, "
        f"num_retained {s.num_retained}, LMDB state, local storage (fsync); {USERS:,} users, {PAGES:,} pages",
        f"orders: {s.orders:,} at {s.order_rate:,.0f}/s (bounded; order-totals fully finished at "
        f"{rec.orders_finished_at or float('nan'):.1f} s); clicks: {s.click_rate:,.0f}/s (unbounded)",
        f"load average {run.load_start[0]:.2f} at start, {run.load_end[0]:.2f} / {run.load_end[1]:.2f} / "
        f"{run.load_end[2]:.2f} at the end (1/5/15 min); process CPU {cpu:.0f} s in {wall:.0f} s "
        f"({cpu / wall * 100 if wall else 0:.0f} % of one core)",
        f"warm-up {s.warm_up:.0f} s; samples every {s.sample_every:g} s ({len(run.samples)}); "
        f"windows of {s.window:.0f} s",
        "",
        f"{'memory':<16} {'start':>10} {'warm-up':>10} {'end':>10} {'max':>10}  {'slope/min':>10} "
        f"{'2nd half':>10}  (slopes after warm-up)",
        *(
            f"  {label:<14} {get(start):10,.1f} {get(a.warm):10,.1f} {get(a.end):10,.1f} "
            f"{max(get(x) for x in run.samples):10,.1f}  {a.slopes[name][0]:+10.3f} {a.slopes[name][1]:+10.3f}  {unit}"
            for name, (label, get, unit) in METRICS.items()
        ),
        f"  LMDB scratch at the end: {a.end.lmdb_files} files in {a.end.lmdb_dirs} environments",
        f"  RSS end / start {a.end.rss / start.rss:.3f}, end / after warm-up {a.end.rss / a.warm.rss:.3f}",
        "  gc object types that grew most after warm-up: "
        + (", ".join(f"{name} {b:,}->{n:,}" for name, b, n in a.growth[:6]) or "none"),
        "",
        f"checkpoints: {len(regular):,} completed, {len(rec.failures)} failed"
        + (
            " (" + ", ".join(f"{r} x{n}" for r, n in Counter(f.reason for f in rec.failures).items()) + ")"
            if rec.failures
            else ""
        ),
        f"  largest checkpoint: chk-{a.largest_checkpoint.checkpoint_id}, {a.largest_checkpoint.dir_files} files, "
        f"{a.largest_checkpoint.dir_bytes:,} bytes ({a.largest_checkpoint.state_bytes:,} state bytes)",
        f"  under the root (output/ excluded): max {a.max_root_files} files / {a.max_root_bytes:,} bytes; "
        f"final (running) {a.end.root_files} files / {a.end.root_bytes:,} bytes; bound "
        f"({s.num_retained}+2 x largest) {a.bound_files} files / {a.bound_bytes:,} bytes",
        f"  incomplete chk-* directories seen at once: max {a.max_incomplete} (the one in flight); "
        f"after the stop: {len(a.leftover_incomplete)}",
        f"  after the stop: {len(run.final_disk.complete)} retained checkpoint(s) {list(run.final_disk.complete)}, "
        f"{a.final_root.files} files / {a.final_root.bytes:,} bytes under the root (savepoint included)",
        "",
        f"{'window (s)':>13} {'ckpts':>6} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'max gap s':>10} "
        f"{'rec/s':>8} {'RSS MiB':>8} {'objects':>9} {'root files':>10} {'root KiB':>9} {'lag ms':>7}",
    ]
    for w in a.windows:
        lines.append(
            f"{w.start:6.0f}-{w.end:<6.0f} {w.checkpoints:6} {w.failed:6} {w.p50:8.1f} {w.p95:8.1f} {w.max:8.1f} "
            f"{w.max_gap:10.2f} {w.rate:8,.0f} {w.rss / MIB:8.1f} {w.objects:9,} {w.root_files:10} "
            f"{w.root_bytes / 1024:9,.0f} {w.lag * 1000:7.1f}"
        )
    o = run.output
    lines += [
        "",
        f"records processed: {run.final_samples_processed:,} ({run.final_samples_processed / run.elapsed:,.0f}/s "
        f"overall; {a.steady_rate:,.0f}/s after warm-up vs {a.configured_steady_rate:,.0f}/s configured)",
        f"stop with drained savepoint: {run.stop_seconds:.2f} s; "
        f"savepoint {run.savepoint.location if run.savepoint else None}",
        f"committed output: {o.records:,} records in {o.files:,} files ({run.final_disk.output_bytes / MIB:,.1f} MiB; "
        f"grows by design): {o.orders:,} orders ({o.distinct_orders:,} distinct), {o.clicks:,} clicks "
        f"({o.distinct_clicks:,} distinct)",
        "",
        *(["tracemalloc: allocation sites that grew most after warm-up", *run.traces, ""] if run.traces else []),
        "checks:",
        *(f"  [{'ok' if ok else 'FAILED'}] {text}" for text, ok in a.checks),
        "",
        f"{'benchmark':<62} {'value':>12} {'baseline':>12} {'unit':>12} {'ratio':>7}",
        *(f"{r.name:<62} {r.value:>12,.2f} {r.baseline:>12,.2f} {r.unit:>12} {r.ratio:>7.3f}" for r in res),
        f"finished in {run.elapsed:.1f} s",
    ]
    if rec.failures:
        lines.insert(
            lines.index("checks:"),
            "failures: "
            + "; ".join(f"chk-{f.checkpoint_id} at {f.t:.1f} s {f.reason}: {f.message}" for f in rec.failures[:5])
            + "\n",
        )
    return "\n".join(lines)


def write_samples(run: Run, path: str) -> None:
    """The samples as CSV, one row per sample (bytes and counts; ``t`` in seconds since submit)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        names = [f.name for f in dataclasses.fields(Sample)]
        writer.writerow(names)
        for x in run.samples:
            writer.writerow([getattr(x, name) for name in names])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keystate soak: the demo-style job for minutes under checkpoints.")
    parser.add_argument("--quick", action="store_true", help="1 minute (about 65 s in all)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the job runs (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the summary goes to stderr)")
    parser.add_argument("--interval", type=float, default=0.2, help="checkpoint interval in seconds (0.2)")
    parser.add_argument("--num-retained", type=int, default=2, help="completed checkpoints kept (2)")
    parser.add_argument("--click-rate", type=float, default=2_000.0, help="clicks per second (2,000)")
    parser.add_argument("--order-rate", type=float, default=2_000.0, help="orders per second (2,000)")
    parser.add_argument(
        "--order-seconds", type=float, default=None, help="how long the bounded orders run (40 s; quick 15 s)"
    )
    parser.add_argument("--sample-every", type=float, default=None, help="seconds between samples (5; quick 2)")
    parser.add_argument("--dir", default=None, help="parent directory for the temp files (default: the temp dir)")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="diagnose memory growth: trace allocations after the warm-up (slows the run)",
    )
    parser.add_argument("--samples", metavar="FILE", default=None, help="write every sample to FILE (CSV)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints, output and LMDB scratch")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="keystate-soak-", dir=args.dir))

    def out(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        run = asyncio.run(soak(settings, tmp, out))
    finally:
        if args.keep:
            out(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    analysis = analyse(run)
    if args.samples:
        write_samples(run, args.samples)
    res = results(run, analysis)
    out(render(run, analysis, res))  # with --json: to stderr, and the JSON object alone on stdout
    if args.json:
        print(json.dumps({"benchmarks": [r.to_dict() for r in res]}))
    return 0 if all(ok for _, ok in analysis.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
