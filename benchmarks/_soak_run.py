"""The soak's run (``benchmarks/soak.py``): submit the job, sample it until the deadline, stop it with a
drained savepoint, and check its committed output."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import MIB
from benchmarks._soak_job import Probe, Settings, build_soak_job
from benchmarks._soak_measure import Disk, measure_disk, top_growth, type_histogram
from benchmarks._soak_record import CheckpointEvent, Recorder, Sample, take_sample, ticker
from keystate.runtime import CheckpointConfig, JobConfig, JobStatus, submit
from keystate.statebackend import LmdbStateBackend
from keystate.storage.checkpoints import CompletedCheckpoint

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
