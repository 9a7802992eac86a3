"""Soak: the demo-style job under checkpoints every 200 ms for minutes; memory, files and durations stay flat.

Not a CI test: a load script to run by hand (``--quick``: 1 minute, about 65 s in all; default 10 minutes).

**The job** (the demo job of docs/architecture.md#the-demo-job with more keys and higher rates, built from
the demo's own ``OrderTotals`` and ``ClickCounts`` functions)::

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

``--json`` prints ``{"benchmarks": [{"name", "value", "unit", "baseline", "ratio"}]}``
(docs/architecture.md#benchmark-json); every ratio is "higher is better" with 1.0 meaning flat / within
bound / exact; the entries are explained in docs/reliability.md ("Soak").

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
import logging
import shutil
import tempfile

from benchmarks._common import print_json
from benchmarks._soak_job import Settings
from benchmarks._soak_report import analyse, render, results, write_samples
from benchmarks._soak_run import soak


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
        print_json(res)
    return 0 if all(ok for _, ok in analysis.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
