"""The soak's report (``benchmarks/soak.py``): analysis of a run (slopes, windows, bounds, checks), its
benchmark lines, the readable summary and the samples as CSV."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks._common import MIB, Result
from benchmarks._soak_job import PAGES, USERS
from benchmarks._soak_measure import Tree
from benchmarks._soak_record import CheckpointEvent, Sample
from benchmarks._soak_run import Run
from keystate.runtime import JobStatus

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
