"""How long the asyncio event loop is blocked while a keyed task writes toward a large LMDB state (issue 12,
item 7): the ``write-back flush: loop blocked p99`` line of ``benchmarks/incremental.py``.

A task writes 16-byte keys with 100-byte values into a value state of an ``LmdbKeyedStateBackend``
(yielding to the loop every 200 records, as a task does between input batches) until the raw bytes reach
the given size; a probe sleeps 1 ms again and again and records how late it wakes up: the time the loop
was blocked. With the flusher thread, frozen write-back layers go to LMDB off the loop; the baseline
(``inline``) waits for every flush on the loop (``LmdbKV.flush``), which is what the engine did before.

The writer never waits for input, so the loop is never idle: py-lmdb needs the GIL for every put, and the
flusher writes mostly while the task lends it the GIL (loans of at most 2.5 ms, ``_lmdb.PACE_MAX_S``), which
the probe counts as blocked time, as it should. A real task that waits for input between batches leaves
the flusher those pauses and lends it less. The figures depend on the machine being otherwise idle: the
lag includes the time the OS keeps the loop's thread off a CPU, so run it with nothing else busy.

Run on its own, it prints the figures of one run as JSON::

    python -m benchmarks._loop_lag --mb 1024            # the write-back flush on the flusher thread
    python -m benchmarks._loop_lag --mb 1024 --inline   # each flush waited for on the loop (as before)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from keystate.statebackend import BytesSerializer, LmdbKeyedStateBackend, ValueStateDescriptor
from keystate.statebackend._lmdb import LmdbKV
from keystate.storage import KeyGroupRange

ENTRY = 116
"""Raw bytes of one record: a 16-byte key and a 100-byte value."""
PROBE_S = 0.001
YIELD_EVERY = 200


@dataclass(frozen=True, slots=True)
class LoopLag:
    entries: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float


async def _probe(lags: list[float], done: asyncio.Event) -> None:
    while not done.is_set():
        start = time.perf_counter()
        await asyncio.sleep(PROBE_S)
        lags.append(time.perf_counter() - start - PROBE_S)


async def _write(backend: LmdbKeyedStateBackend, entries: int, inline: bool, done: asyncio.Event) -> None:
    state = backend.get_state(ValueStateDescriptor[bytes](name="blob", serializer=BytesSerializer()))
    kv = backend.kv
    if not isinstance(kv, LmdbKV):
        raise TypeError(f"{backend!r} is not an LMDB backend")
    rng = random.Random(7)
    value = rng.randbytes(100)
    set_key, update = backend.set_current_key, state.update
    try:
        for i in range(entries):
            set_key(rng.randbytes(16))
            update(value)
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                if inline and kv._frozen:  # the engine before the flusher thread: the task waited for it
                    kv.flush()
                await asyncio.sleep(0)
    finally:
        done.set()


async def _run(mb: int, inline: bool, directory: Path) -> LoopLag:
    entries = mb * 1_000_000 // ENTRY
    backend = LmdbKeyedStateBackend(
        directory=directory,
        map_size=4 * mb * 1_000_000 + (256 << 20),
        operator_uid="lag",
        subtask_index=0,
        max_parallelism=128,
        key_groups=KeyGroupRange(0, 127),
    )
    lags: list[float] = []
    done = asyncio.Event()
    started = time.perf_counter()
    try:
        await asyncio.gather(_probe(lags, done), _write(backend, entries, inline, done))
        elapsed = time.perf_counter() - started
    finally:
        backend.close()
    lags.sort()

    def pct(p: float) -> float:
        return 1000 * lags[min(len(lags) - 1, int(p * len(lags)))]

    return LoopLag(entries, elapsed, pct(0.5), pct(0.99), 1000 * lags[-1])


def loop_lag(mb: int, *, inline: bool, directory: Path) -> LoopLag:
    """Write ``mb`` MB of raw records in a fresh environment under ``directory``; the loop's lag."""
    return asyncio.run(_run(mb, inline, directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="raw bytes of state to write, in MB")
    parser.add_argument("--inline", action="store_true", help="wait for every flush on the loop (the old engine)")
    parser.add_argument("--directory", type=Path, default=None, help="where the LMDB environment goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.directory) as scratch:
        lag = loop_lag(args.mb, inline=args.inline, directory=Path(scratch))
    print(json.dumps({"mode": "inline flush" if args.inline else "flusher thread", "raw_mb": args.mb, **asdict(lag)}))


if __name__ == "__main__":
    main()
