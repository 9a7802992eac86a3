"""Runtime: job throughput, checkpointing overhead and FLIP-147 finishing latency vs references in the same run.

Every line reports our figure, a raw reference measured in the same run and their ratio (higher is better):

1. job throughput: ``SequenceSource(N)`` (1M records; 200k with ``--quick``; one split) -> ``key_by(n % 10,000)``
   (a hash edge) -> a keyed count (``ValueState`` with ``IntSerializer`` on the LMDB backend: ``value()``,
   ``update(c + 1)``, emit ``{"key", "count"}``) -> a sink that discards. Parallelism 1 everywhere (one
   asyncio thread runs every task), checkpointing off. Records/s = N / wall time from ``run_job`` to its
   result (deployment, LMDB environment and teardown included). Baseline: a bare Python loop doing the same
   state work on an ``LmdbKeyedStateBackend`` created directly (same key serializer, max parallelism, buffer):
   per record ``set_current_key``, ``value()``, ``update()`` and the output dict appended to a list.
2. checkpoint overhead: the same job with a checkpoint every 1 s (local storage, fsync on) vs the same job
   without checkpoints (line 1's job); records/s to the job's result, so the final checkpoint of the bounded
   job is included. Ratio = with / without.
3. transactional sink cost: the checkpointed job with ``TransactionalFileSink`` (JSON lines staged per
   checkpoint, committed on completion) instead of the discarding sink; baseline: the checkpointed job with
   the discarding sink.
4. finishing latency: a bounded chain source -> 3 two-phase-commit operators (a ``TwoPhaseCommitSink``
   that stages records in memory and also forwards them with ``ctx.emit``) with a checkpoint every 2 s and a
   paced source whose input spans a bit more than one interval (so periodic checkpoints commit part of the
   output first). Measured: time from the source's end of input to the job's result, in checkpoint intervals.
   Every record must be committed by every operator. Before FLIP-147's immediate final checkpoint a chain of
   n such operators could take up to n intervals; the target is about one. Baseline 1.0 interval; this is a
   latency, so the ratio is inverted (``baseline / value``) and higher is still better.

Runs alternate (loop, job, checkpointed job, file-sink job) so each ratio compares back-to-back runs; each
figure is the best of 3 (2 with ``--quick``; the chain: best of 3 / 1). Everything runs in temp directories
removed afterwards. ``--profile FILE`` runs one throughput job (line 1) under cProfile instead.

Run from the repository root: ``python benchmarks/runtime.py [--quick] [--json]`` (or ``-m benchmarks.runtime``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is benchmarks/ and this module would shadow the `runtime` package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from benchmarks._common import Result, SharedProbe, print_json
from keystate.runtime import (
    CheckpointConfig,
    JobConfig,
    JobGraph,
    JobResult,
    JobStatus,
    KeyedProcessFunction,
    Operator,
    OperatorContext,
    SequenceSource,
    Source,
    SplitReader,
    TransactionalFileSink,
    TwoPhaseCommitSink,
    run_job,
)
from keystate.statebackend import (
    IntSerializer,
    KeySerializer,
    LmdbKeyedStateBackend,
    LmdbStateBackend,
    ValueState,
    ValueStateDescriptor,
    default_max_parallelism,
    key_group_range_for_subtask,
)

KEYS = 10_000
CHECKPOINT_INTERVAL = 1.0
CHAIN_INTERVAL = 2.0
CHAIN_LENGTH = 3
COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0)


@dataclass(frozen=True)
class Settings:
    records: int
    repeats: int
    chain_records: int
    chain_rate: float
    """Records per second of the chain's paced source: its input spans ``chain_records / chain_rate`` s."""
    chain_repeats: int


FULL = Settings(records=1_000_000, repeats=3, chain_records=12_000, chain_rate=4_000.0, chain_repeats=3)
QUICK = Settings(records=200_000, repeats=2, chain_records=10_000, chain_rate=4_000.0, chain_repeats=1)


@dataclass(frozen=True, slots=True)
class RuntimeResult(Result):
    cpu_ratio: float | None = None
    """The ratio from CPU time instead of wall time (shown in the table only)."""


# --- shared probes ------------------------------------------------------------------------------------


class Probe(SharedProbe):
    """What the sinks and the chain's operators and source of one run saw."""

    def __init__(self) -> None:
        self.sunk = 0
        self.committed = 0
        self.end_of_input: float | None = None


# --- the throughput job ---------------------------------------------------------------------------------


def key_of(n: int) -> int:
    return n % KEYS


class CountPerKey(KeyedProcessFunction):
    """The keyed count: one ``ValueState[int]`` per key; emits the new count."""

    count: ValueState[int]

    def open(self, ctx: OperatorContext) -> None:
        self.count = ctx.get_state(COUNT)

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        state = self.count
        c = (state.value() or 0) + 1
        state.update(c)
        ctx.emit({"key": value % KEYS, "count": c})


class DiscardSink(Operator):
    """A sink that drops its records (and counts them on finish, to check the run)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._n = 0

    def process(self, record: Any, input_index: int) -> None:
        self._n += 1

    async def finish(self) -> None:
        self.probe.sunk += self._n


def count_job(records: int, sink: Operator) -> JobGraph:
    job = JobGraph("runtime-bench")
    source = job.source(SequenceSource(records, splits=1), uid="numbers", parallelism=1)
    counts = source.key_by(key_of).process(CountPerKey(), uid="counts", parallelism=1)
    counts.sink(sink, uid="sink", parallelism=1)
    return job


@dataclass(frozen=True, slots=True)
class Timing:
    wall: float
    """Seconds of wall-clock time (what the figures report)."""
    cpu: float
    """Seconds of CPU time of this process, every thread (a cross-check less sensitive to other load)."""


class Stopwatch:
    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self) -> Timing:
        return Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def _run(job: JobGraph, config: JobConfig) -> tuple[Timing, JobResult]:
    async def go() -> tuple[Timing, JobResult]:
        watch = Stopwatch()
        result = await run_job(job, config)
        return watch.stop(), result

    timing, result = asyncio.run(go())
    if result.status is not JobStatus.FINISHED:
        raise RuntimeError(f"benchmark job ended {result.status.value}: {result.error}")
    return timing, result


def job_config(tmp: Path, *, interval: float | None) -> JobConfig:
    return JobConfig(
        state_backend=LmdbStateBackend(tmp / "lmdb"),
        checkpoint=CheckpointConfig(interval=interval, storage=str(tmp / "checkpoints")),
    )


@contextmanager
def scratch(parent: str | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="keystate-bench-runtime-", dir=parent) as tmp:
        root = Path(tmp)
        (root / "lmdb").mkdir()
        yield root


@dataclass(frozen=True, slots=True)
class JobRun:
    timing: Timing
    checkpoints: int


def run_discard_job(records: int, parent: str | None, *, interval: float | None) -> JobRun:
    probe = Probe()
    with scratch(parent) as tmp:
        timing, result = _run(count_job(records, DiscardSink(probe)), job_config(tmp, interval=interval))
    if probe.sunk != records:
        raise RuntimeError(f"the sink received {probe.sunk} records, expected {records}")
    return JobRun(timing, result.checkpoints)


def run_file_sink_job(records: int, parent: str | None, *, interval: float) -> JobRun:
    with scratch(parent) as tmp:
        out = tmp / "out"
        timing, result = _run(count_job(records, TransactionalFileSink(str(out))), job_config(tmp, interval=interval))
        lines = 0
        for path in out.glob("*.jsonl"):
            with path.open("rb") as f:
                lines += sum(1 for _ in f)
    if lines != records:
        raise RuntimeError(f"the file sink committed {lines} records, expected {records}")
    return JobRun(timing, result.checkpoints)


def run_loop(records: int, parent: str | None) -> Timing:
    """The baseline: the keyed count's state work in a bare loop on a directly created LMDB backend."""
    max_p = default_max_parallelism(1)
    with scratch(parent) as tmp:
        backend = LmdbKeyedStateBackend(
            directory=tmp / "lmdb" / "loop",
            operator_uid="counts",
            subtask_index=0,
            max_parallelism=max_p,
            key_groups=key_group_range_for_subtask(max_p, 1, 0),
            key_serializer=KeySerializer(),
        )
        try:
            watch = Stopwatch()
            state = backend.get_state(COUNT)
            set_key, value, update = backend.set_current_key, state.value, state.update
            out: list[dict[str, int]] = []
            append = out.append
            for n in range(records):
                key = n % KEYS
                set_key(key)
                c = (value() or 0) + 1
                update(c)
                append({"key": key, "count": c})
            timing = watch.stop()
        finally:
            backend.close()
    if sum(1 for o in out if o["count"] == 1) != min(KEYS, records):
        raise RuntimeError("the baseline loop counted wrong")
    return timing


# --- the two-phase-commit chain ---------------------------------------------------------------------------


class PassThrough2PC(TwoPhaseCommitSink):
    """A two-phase-commit operator that stages records in memory and forwards them downstream."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe
        self._staged: dict[str, list[Any]] = {}

    def begin_transaction(self) -> str:
        txn = uuid.uuid4().hex
        self._staged[txn] = []
        return txn

    def write(self, transaction: str, record: Any) -> None:
        self._staged[transaction].append(record)

    def process(self, record: Any, input_index: int) -> None:
        super().process(record, input_index)
        self.ctx.emit(record)

    async def pre_commit(self, transaction: str) -> Any:
        return {"records": len(self._staged.get(transaction, ()))}

    async def commit(self, transaction: str, info: Any) -> None:
        if self._staged.pop(transaction, None) is not None:  # idempotent
            self.probe.committed += info["records"]

    async def abort(self, transaction: str) -> None:
        self._staged.pop(transaction, None)


class _TimedReader(SplitReader):
    def __init__(self, inner: SplitReader, probe: Probe) -> None:
        self._inner = inner
        self._probe = probe

    async def read(self, max_records: int) -> list[Any] | None:
        records = await self._inner.read(max_records)
        if records is None and self._probe.end_of_input is None:
            self._probe.end_of_input = time.perf_counter()
        return records

    def position(self) -> Any:
        return self._inner.position()


class TimedSource(Source):
    """A source that notes when its input ended (the split reader reported its end)."""

    def __init__(self, inner: Source, probe: Probe) -> None:
        self._inner = inner
        self._probe = probe
        self.bounded = inner.bounded

    def splits(self) -> list[str]:
        return self._inner.splits()

    def reader(self, split: str, position: Any | None) -> SplitReader:
        return _TimedReader(self._inner.reader(split, position), self._probe)


@dataclass(frozen=True, slots=True)
class ChainRun:
    tail: float
    """Seconds from the end of input to the job's result."""
    total: float
    checkpoints: int


def run_chain(settings: Settings, parent: str | None) -> ChainRun:
    probe = Probe()
    records = settings.chain_records
    job = JobGraph("runtime-bench-chain")
    stream = job.source(
        TimedSource(SequenceSource(records, splits=1, rate=settings.chain_rate), probe), uid="numbers", parallelism=1
    )
    for i in range(CHAIN_LENGTH):
        stream = stream.transform(PassThrough2PC(probe), uid=f"2pc-{i + 1}", parallelism=1)
    with scratch(parent) as tmp:
        started = time.perf_counter()
        timing, result = _run(job, job_config(tmp, interval=CHAIN_INTERVAL))
        ended = started + timing.wall
    if probe.end_of_input is None:
        raise RuntimeError("the chain's source never reported its end of input")
    if probe.committed != CHAIN_LENGTH * records:
        raise RuntimeError(f"the chain committed {probe.committed} records, expected {CHAIN_LENGTH * records}")
    return ChainRun(ended - probe.end_of_input, timing.wall, result.checkpoints)


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class Info:
    records: int
    repeats: int
    loop: Timing | None = None
    job: Timing | None = None
    checkpoints_periodic: int = 0
    checkpoints_file: int = 0
    chain: ChainRun | None = None


def _best(timings: list[Timing]) -> Timing:
    """The best wall time and, separately, the best CPU time of the samples."""
    return Timing(min(t.wall for t in timings), min(t.cpu for t in timings))


def run(settings: Settings, parent: str | None) -> tuple[list[RuntimeResult], Info]:
    n = settings.records
    info = Info(n, settings.repeats)
    loop: list[Timing] = []
    plain: list[JobRun] = []
    periodic: list[JobRun] = []
    file_sink: list[JobRun] = []
    run_loop(min(n, 50_000), parent)  # warm-up (imports, LMDB, allocator)
    run_discard_job(min(n, 50_000), parent, interval=None)
    for _ in range(settings.repeats):
        loop.append(run_loop(n, parent))
        plain.append(run_discard_job(n, parent, interval=None))
        periodic.append(run_discard_job(n, parent, interval=CHECKPOINT_INTERVAL))
        file_sink.append(run_file_sink_job(n, parent, interval=CHECKPOINT_INTERVAL))
    chains = [run_chain(settings, parent) for _ in range(settings.chain_repeats)]

    best_loop = _best(loop)
    best_plain = _best([r.timing for r in plain])
    best_periodic = _best([r.timing for r in periodic])
    best_file = _best([r.timing for r in file_sink])
    info.loop, info.job = best_loop, best_plain
    info.checkpoints_periodic = min(r.checkpoints for r in periodic)
    info.checkpoints_file = min(r.checkpoints for r in file_sink)
    chain = min(chains, key=lambda c: c.tail)
    info.chain = chain

    def line(name: str, value: Timing, baseline: Timing) -> RuntimeResult:
        return RuntimeResult(name, n / value.wall, n / baseline.wall, "rec/s", cpu_ratio=baseline.cpu / value.cpu)

    results = [
        line("job throughput vs bare loop (LMDB count)", best_plain, best_loop),
        line(f"checkpoints every {CHECKPOINT_INTERVAL:g} s vs none", best_periodic, best_plain),
        line(f"TransactionalFileSink vs discard (ckpt {CHECKPOINT_INTERVAL:g} s)", best_file, best_periodic),
        RuntimeResult(
            f"finish latency, {CHAIN_LENGTH}x 2PC chain (ckpt {CHAIN_INTERVAL:g} s)",
            chain.tail / CHAIN_INTERVAL,
            1.0,
            "intervals",
            inverted=True,
        ),
    ]
    return results, info


def render_table(results: list[RuntimeResult], info: Info, settings: Settings, elapsed: float) -> str:
    lines = [
        f"keystate runtime benchmark: {info.records:,} records, {KEYS:,} keys, parallelism 1, LMDB state; "
        f"best of {info.repeats} (chain: best of {settings.chain_repeats})",
        "",
        f"{'benchmark':<46} {'value':>12} {'baseline':>12} {'unit':>10} {'ratio':>8} {'cpu ratio':>10}",
    ]
    for r in results:
        cpu = "" if r.cpu_ratio is None else f"{r.cpu_ratio:.3f}"
        lines.append(f"{r.name:<46} {r.value:>12,.2f} {r.baseline:>12,.2f} {r.unit:>10} {r.ratio:>8.3f} {cpu:>10}")
    chain, job, loop = info.chain, info.job, info.loop
    assert chain is not None
    assert job is not None
    assert loop is not None
    lines += [
        "",
        f"job without checkpoints: {job.wall:.2f} s ({job.cpu:.2f} s CPU); bare loop: {loop.wall:.2f} s "
        f"({loop.cpu:.2f} s CPU); checkpoints completed per run: {info.checkpoints_periodic} (discard sink), "
        f"{info.checkpoints_file} (file sink)",
        f"chain: {settings.chain_records:,} records at {settings.chain_rate:,.0f}/s, end of input -> job result "
        f"{chain.tail * 1000:.0f} ms ({chain.tail / CHAIN_INTERVAL:.3f} intervals), job {chain.total:.2f} s, "
        f"{chain.checkpoints} checkpoints",
        "ratio: wall clock, value / baseline (finish latency: baseline / value); higher is better",
        "cpu ratio: the same from each side's best CPU time of the process (less sensitive to other load)",
        f"finished in {elapsed:.1f} s",
    ]
    return "\n".join(lines)


def profile(settings: Settings, parent: str | None, path: str) -> None:
    """Profile one throughput job (no checkpoints, discard sink) and print the hot spots to stderr."""
    run_discard_job(min(settings.records, 50_000), parent, interval=None)
    profiler = cProfile.Profile()
    profiler.runcall(run_discard_job, settings.records, parent, interval=None)
    profiler.dump_stats(path)
    stats = pstats.Stats(path, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keystate runtime: job throughput and checkpointing vs references.")
    parser.add_argument("--quick", action="store_true", help="200k records, best of 2 (under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--dir", default=None, help="parent directory for the temp files (default: the temp dir)")
    parser.add_argument("--profile", metavar="FILE", default=None, help="profile one throughput job into FILE")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.profile:
        profile(settings, args.dir, args.profile)
        return 0
    started = time.perf_counter()
    results, info = run(settings, args.dir)
    elapsed = time.perf_counter() - started
    if args.json:
        print_json(results)
    else:
        print(render_table(results, info, settings, elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
