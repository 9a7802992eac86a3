"""State backend: keyed state operations, snapshots and restore vs raw baselines measured in the same run.

Every line reports our figure, a raw reference measured in the same run and their ratio (higher is better):

1. value state read-modify-write: N distinct random 16-byte keys (1M; 200k with ``--quick``), 100-byte
   values, every pass in a fresh random order. ``LmdbKeyedStateBackend`` (``BytesSerializer`` keys and
   values, max parallelism 128, one subtask owning every key group) does ``set_current_key`` +
   ``value()`` + ``update()`` per key. Baseline: py-lmdb used directly with the same batching, 1000 ops
   per write transaction (``sync=False, metasync=False``), ``txn.get`` then ``txn.put``. The same for
   ``HeapKeyedStateBackend`` against a plain dict (``get`` + set). The insert pass of every key is the
   warm-up; the timed passes modify every value (rotate its bytes by one).
2. map and list state: K keys (100k; 10k with ``--quick``) x 10 map puts (8-byte user keys, 100-byte
   values), then 10 map gets per key; 10 list appends (40-byte elements) per key, then one list get
   per key. Puts and appends go round-robin over the keys (a key's events are spread over time). The
   baseline does the same through py-lmdb: ``put(key + user_key)``, ``get``, append = ``get`` + ``put``
   of old value + frame, get = ``get`` + split the frames; 1000 ops per transaction (reads too).
   Each repetition starts from empty stores; the warm-up runs on a tenth of the keys.
3. snapshot pause: value state loaded to ~100 MB and ~1 GB of raw snapshot bytes (~20 MB and ~100 MB
   with ``--quick``); before each sample 1000 fresh updates (so the write buffer is not empty), then
   ``backend.snapshot()`` is timed and the snapshot released. Median of 15 samples (9 with
   ``--quick``) after 2 warm-up snapshots. Baseline: opening a bare read transaction
   (``env.begin()``) on the same LMDB environment, sampled in the same loop after its own 1000
   updates (so both see the caches as processing leaves them). Snapshot state values are unique: 32
   random bytes then a JSON-ish record, so the state file compresses about 2.3x.
4. snapshot write: at the larger size, the buffer is flushed, 10,000 fresh updates are made, and
   ``snap.write(writer, hint)`` into a local ``CheckpointStorage`` (fsync on) is timed; MB/s of raw
   snapshot bytes. It runs alone here; in a job it runs on another thread while processing goes on.
   Its zstd blocks are compressed on one helper thread (``StreamOptions.compression_threads``, set
   with ``--compression-threads``; 0 compresses inline). Baseline: the same raw bytes compressed with
   zstd level 1 in 1 MiB chunks (one thread), written to one plain file and fsynced.
5. restore: ``restore()`` of that checkpoint into a fresh LMDB backend owning every key group (MB/s
   of raw snapshot bytes; baseline: ``StateFileReader.read_all()`` of the same file, i.e. pure read,
   verify and decompress), and into one owning ``key_group_range_for_subtask(128, 2, 0)`` (rescale
   1 -> 2; baseline: half the full restore's time, so a ratio near 1 means it reads only its half).

Latency lines (unit ``ms``) invert the ratio, ``baseline / value``, so that higher is still better.
Every measurement except the pause is the best of 3 (2 with ``--quick``) after a warm-up, ours and the
baseline alternating; everything runs in temp directories removed afterwards.

Run from the repository root: ``python benchmarks/state.py [--quick] [--json]`` (or ``-m benchmarks.state``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is benchmarks/ and benchmarks/storage.py would shadow the `storage` package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import cProfile
import os
import pstats
import tempfile
import time

from benchmarks._common import print_json
from benchmarks._state_access import collection_cases, value_cases
from benchmarks._state_fixtures import ENTRIES_PER_KEY, FULL, QUICK, Config, StateResult
from benchmarks._state_snapshots import snapshot_cases
from keystate.storage import StreamOptions

# --- output -------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"


def render_table(results: list[StateResult], cfg: Config, info: str, elapsed: float, quick: bool) -> str:
    lines = [
        f"keystate state-backend benchmark ({'quick' if quick else 'full'}): value RMW over {cfg.rmw_keys:,} keys, "
        f"map/list over {cfg.collection_keys:,} keys x {ENTRIES_PER_KEY}; best of {cfg.repeats} after a warm-up",
        info,
        "",
        f"{'benchmark':<42} {'value':>12} {'unit':<6} {'baseline':>12} {'ratio':>7}  baseline",
    ]
    for r in results:
        lines.append(f"{r.name:<42} {_fmt(r.value):>12} {r.unit:<6} {_fmt(r.baseline):>12} {r.ratio:>7.3f}  {r.detail}")
    lines += [
        "",
        "ratio = value / baseline; for latencies (ms) ratio = baseline / value, so higher is better everywhere",
        f"finished in {elapsed:.1f} s",
    ]
    return "\n".join(lines)


def run(cfg: Config, parent: str | None, options: StreamOptions | None = None) -> tuple[list[StateResult], str]:
    """Every case in a temp directory (removed afterwards); returns the results and a line about the state."""
    clock = time.perf_counter
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="keystate-state-bench-", dir=parent) as tmp:
        root = Path(tmp)
        started = clock()
        results = value_cases(cfg, root)
        value_done = clock()
        results += collection_cases(cfg, root)
        collections_done = clock()
        snapshot_results, info = snapshot_cases(cfg, root, options or StreamOptions())
        timings = (
            f"sections: value {value_done - started:.1f} s, map/list {collections_done - value_done:.1f} s, "
            f"snapshots {clock() - collections_done:.1f} s; load average {load_before} -> {_load()}"
        )
        return results + snapshot_results, f"{info}\n{timings}"


def _load() -> str:
    """The 1-minute load average (the machine may be shared: rates swing with it)."""
    return f"{os.getloadavg()[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keystate state backend vs raw py-lmdb / dict / zstd baselines.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, best of 2 (under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--dir", default=None, help="parent directory for the temp files (default: the temp dir)")
    parser.add_argument("--profile", metavar="FILE", default=None, help="run under cProfile and dump stats to FILE")
    parser.add_argument(
        "--compression-threads",
        type=int,
        default=StreamOptions().compression_threads,
        help="StreamOptions.compression_threads for the snapshot writes (0: compress in the writing thread)",
    )
    args = parser.parse_args(argv)
    options = StreamOptions(compression_threads=args.compression_threads)

    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    if args.profile:
        profiler = cProfile.Profile()
        results, info = profiler.runcall(run, cfg, args.dir, options)
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    else:
        results, info = run(cfg, args.dir, options)
    elapsed = time.perf_counter() - started

    if args.json:
        print_json(results)
    else:
        print(render_table(results, cfg, info, elapsed, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
