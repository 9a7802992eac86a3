"""Incremental checkpoints of the LMDB backend vs full snapshots of the same state, measured in the same run.

Workload (issue 12): an ``LmdbKeyedStateBackend`` (``BytesSerializer`` keys and values, max parallelism 128,
one subtask owning every key group) with one value state of random 16-byte keys and unique 100-byte
values, grown to 10 MB, 100 MB and 1 GB of raw snapshot bytes (``--quick``: 10 MB and 100 MB). At each
size a new base is materialized, then 1 % of the keys (random existing keys, new values) is updated and
one checkpoint taken. Checkpoints go to a local ``CheckpointStorage`` (fsync on); a checkpoint's duration
is ``backend.snapshot(checkpoint_id, SnapshotOptions(incremental=True))`` plus ``snap.write(writer, hint)``
(the synchronous and the asynchronous part; the ``_metadata`` commit is not timed), its bytes are those of
the files it wrote (``StreamHandle.written_in``). The full baseline is ``backend.snapshot()`` +
``snap.write`` of the same state right before (a savepoint's path: it leaves the chain alone).

Lines (at the largest size; ratio higher is better everywhere):

- ``incremental checkpoint bytes (1% changed)``: median bytes of the 10 delta checkpoints of the chain
  (value) vs a full snapshot's bytes (baseline); ratio = full / incremental.
- ``incremental checkpoint duration (1% changed)``: median duration of those checkpoints vs the median
  of full snapshots (2 with ``--quick``, 3 otherwise) taken right before some of them; ratio = full /
  incremental.
- ``incremental restore (chain of 10)``: ``restore()`` of the last checkpoint (its base plus 10 deltas)
  into a fresh backend vs ``restore()`` of a full checkpoint of the same state; ratio = full / chain.
- ``incremental rescale restore (half the key groups)``: the chain restored into a backend owning key
  groups 0..63 vs half the full restore's time; ratio = (full / 2) / this.
- ``write-back flush: loop blocked p99 (N MB state)``: a task writing toward the largest size (``--quick``:
  30 MB) in an asyncio loop (``benchmarks/_loop_lag.py``): the p99 of how late a 1 ms probe wakes up, with
  the write-back flush on the backend's flusher thread (value) vs waiting for every flush on the loop
  (baseline, the engine before); ratio = baseline / value; the target is a p99 under 10 ms at 1 GB.
- ``incremental checkpoint that materializes (after 10 deltas)``: the chain's next checkpoint, which reaches
  ``max_chain_length`` and writes a new base (a full snapshot of the state plus the changes) vs the full
  snapshots above; a ratio near 1: one checkpoint in 11 costs a full snapshot (off the task's thread).
- ``incremental bytes per checkpoint (1% changed): N MB state``: at each size, the bytes one checkpoint
  wrote vs the raw bytes of the entries changed (1 % of them); ratio = changed raw bytes / bytes written,
  so a flat ratio across sizes means the checkpoint costs what changed, not the size of the state.

Restores are the median of 3 (2 with ``--quick``) after a warm-up, full and chain alternating; the chain's
restored state is checked entry for entry against the full checkpoint's. Everything runs in a temp
directory removed afterwards.

Run from the repository root: ``python benchmarks/incremental.py [--quick] [--json] [--dir PARENT]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is benchmarks/ and benchmarks/storage.py would shadow the `storage` package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import xxhash

from benchmarks._common import keyed_checkpoint_metadata, print_json
from benchmarks._loop_lag import loop_lag
from benchmarks._state_fixtures import (
    ALL_KEY_GROUPS,
    MAX_PARALLELISM,
    MB,
    OPERATOR,
    SEED,
    StateResult,
    lmdb_backend,
    lmdb_kv,
    make_keys,
    stored_entries,
    unique_values,
    value_descriptor,
)
from benchmarks._state_snapshots import ENTRY_RAW_BYTES, HALF_KEY_GROUPS, HINT, JOB_ID, restore_once
from keystate.statebackend import LmdbKeyedStateBackend, ValueState
from keystate.statebackend.state import SnapshotOptions
from keystate.storage import (
    CheckpointStorage,
    CompletedCheckpoint,
    KeyedStateHandle,
    open_storage,
)

CHANGED = 0.01
"""The fraction of the keys updated before each measured checkpoint."""
CHAIN = 10
"""Deltas in the chain that is restored."""
OPTIONS = SnapshotOptions(incremental=True, max_chain_length=CHAIN, max_delta_ratio=1.0)
MATERIALIZE = SnapshotOptions(incremental=True, max_chain_length=1, max_delta_ratio=1.0)
"""Used after the state grew: materializes a new base (at most one delta before it)."""
FULL_SIZES_MB = (10, 100, 1000)
QUICK_SIZES_MB = (10, 100)
QUICK_LAG_MB = 30
"""``--quick`` measures the loop's blocked time while writing this much (the full run: toward the largest size)."""
POOL_EVERY = 10
"""One key of every POOL_EVERY inserted is kept for the updates (10 % of the keys: 1 % is drawn each time)."""
BATCH = 100_000


@dataclass(frozen=True, slots=True)
class Checkpoint:
    checkpoint_id: int
    seconds: float
    written: int
    """Bytes of the files this checkpoint wrote."""
    handle: KeyedStateHandle
    completed: CompletedCheckpoint | None


@dataclass(slots=True)
class Workload:
    """The backend under test, its storage, and the keys its updates go to."""

    backend: LmdbKeyedStateBackend
    state: ValueState[bytes]
    storage: CheckpointStorage
    rng: random.Random
    pool: list[bytes] = field(default_factory=list)
    entries: int = 0
    next_id: int = 1

    def grow_to(self, entries: int) -> None:
        set_key, update = self.backend.set_current_key, self.state.update
        while self.entries < entries:
            n = min(BATCH, entries - self.entries)
            keys = make_keys(n, self.rng.randrange(1 << 62))
            self.pool.extend(keys[::POOL_EVERY])
            for key, value in zip(keys, unique_values(n, self.rng), strict=True):
                set_key(key)
                update(value)
            self.entries += n

    def change(self) -> int:
        """Update ``CHANGED`` of the keys (distinct keys drawn from the pool) with new values."""
        count = max(1, round(self.entries * CHANGED))
        set_key, update = self.backend.set_current_key, self.state.update
        for key, value in zip(self.rng.sample(self.pool, count), unique_values(count, self.rng), strict=True):
            set_key(key)
            update(value)
        return count

    def checkpoint(self, options: SnapshotOptions | None, *, commit: bool = True) -> Checkpoint:
        """One timed snapshot + write; committed (and confirmed to the backend) unless ``commit`` is false."""
        cid = self.next_id
        self.next_id += 1
        writer = self.storage.begin_checkpoint(JOB_ID, cid)
        try:
            started = time.perf_counter()
            snapshot = self.backend.snapshot(cid, options)
            handle = snapshot.write(writer, HINT)
            took = time.perf_counter() - started
            handle = _wrote_state(handle, cid)
            written = sum(s.size for s in handle.streams() if s.written_in(cid))
            if not commit:
                writer.abort()
                return Checkpoint(cid, took, written, handle, None)
            completed = writer.commit(keyed_checkpoint_metadata(JOB_ID, cid, OPERATOR, MAX_PARALLELISM, handle))
        except BaseException:
            writer.abort()
            if options is not None:
                self.backend.notify_checkpoint_aborted(cid)
            raise
        if options is not None:
            self.backend.notify_checkpoint_complete(cid)
        return Checkpoint(cid, took, written, handle, completed)

    def new_base(self) -> Checkpoint:
        """Checkpoints until one is a fresh base (no deltas): the chain then starts at this size."""
        for _ in range(3):
            taken = self.checkpoint(MATERIALIZE)
            if not taken.handle.deltas:
                return taken
        raise RuntimeError("the backend did not materialize a new base within 3 checkpoints (max_chain_length=1)")


def _wrote_state(handle: KeyedStateHandle | None, cid: int) -> KeyedStateHandle:
    if handle is None:
        raise RuntimeError(f"checkpoint {cid} wrote no state")
    return handle


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def size_case(work: Workload, size_mb: int) -> tuple[StateResult, Checkpoint, int]:
    """At ``size_mb``: a new base, 1 % changed, one checkpoint; returns the growth line, that checkpoint
    and the base's bytes."""
    work.grow_to(size_mb * MB // ENTRY_RAW_BYTES)
    base = work.new_base()
    changed = work.change()
    taken = work.checkpoint(OPTIONS)
    if len(taken.handle.deltas) != 1:
        raise RuntimeError(f"expected one delta after the base, found {len(taken.handle.deltas)}")
    line = StateResult(
        f"incremental bytes per checkpoint (1% changed): {size_mb} MB state",
        taken.written / MB,
        changed * ENTRY_RAW_BYTES / MB,
        "MB",
        inverted=True,
        detail=f"raw bytes of the {changed:,} changed entries; full snapshot {base.written / MB:.1f} MB",
    )
    return line, taken, base.written


def chain_cases(work: Workload, first: Checkpoint, size_mb: int, repeats: int, root: Path) -> list[StateResult]:
    """The rest of the chain at the largest size (``first`` is its first delta), full snapshots beside the
    first ones, then the restores."""
    deltas = [first]
    fulls: list[Checkpoint] = []
    latest = first
    for i in range(1, CHAIN):
        work.change()
        if i <= repeats:
            fulls.append(work.checkpoint(None, commit=False))
        latest = work.checkpoint(OPTIONS)
        deltas.append(latest)
    assert latest is not None
    assert latest.completed is not None
    if len(latest.handle.deltas) != CHAIN:
        raise RuntimeError(f"expected a chain of {CHAIN} deltas, found {len(latest.handle.deltas)}")
    full = work.checkpoint(None)  # the same state as the chain's end, as one full checkpoint
    assert full.completed is not None
    results = [
        StateResult(
            "incremental checkpoint bytes (1% changed)",
            _median([d.written for d in deltas]) / MB,
            _median([f.written for f in fulls]) / MB,
            "MB",
            inverted=True,
            detail=f"a full snapshot; median of {len(deltas)} deltas at {size_mb} MB",
        ),
        StateResult(
            "incremental checkpoint duration (1% changed)",
            _median([d.seconds for d in deltas]) * 1e3,
            _median([f.seconds for f in fulls]) * 1e3,
            "ms",
            inverted=True,
            detail=f"full snapshot + write; median of {len(fulls)}",
        ),
    ]
    results += restore_cases(latest.completed, latest.handle, full.completed, full.handle, repeats, root)
    # The next checkpoint of the chain is the 11th: max_chain_length is reached, so it materializes a new
    # base (a full snapshot, in the checkpoint's asynchronous part: the task is not blocked, but this
    # checkpoint takes as long as a full one). Reported so that the chain's cost is not only its deltas.
    work.change()
    materialized = work.checkpoint(OPTIONS)
    if materialized.handle.deltas:
        raise RuntimeError(f"checkpoint {materialized.checkpoint_id} did not materialize after a chain of {CHAIN}")
    results.append(
        StateResult(
            f"incremental checkpoint that materializes (after {CHAIN} deltas)",
            materialized.seconds * 1e3,
            _median([f.seconds for f in fulls]) * 1e3,
            "ms",
            inverted=True,
            detail=f"full snapshot + write; one in {CHAIN + 1} checkpoints at max_chain_length={CHAIN}",
        )
    )
    return results


def restore_cases(
    chain: CompletedCheckpoint,
    chain_handle: KeyedStateHandle,
    full: CompletedCheckpoint,
    full_handle: KeyedStateHandle,
    repeats: int,
    root: Path,
) -> list[StateResult]:
    check_same_state(chain, chain_handle, full, full_handle, root / "check")
    full_times: list[float] = []
    chain_times: list[float] = []
    half_times: list[float] = []
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        took_full, n_full = restore_once(full, full_handle, ALL_KEY_GROUPS, root / "restore-full")
        took_chain, n_chain = restore_once(chain, chain_handle, ALL_KEY_GROUPS, root / "restore-chain")
        took_half, n_half = restore_once(chain, chain_handle, HALF_KEY_GROUPS, root / "restore-half")
        if n_chain != n_full or not 0.4 * n_full < n_half < 0.6 * n_full:
            raise RuntimeError(f"restored {n_chain} (chain) / {n_half} (half) entries, expected {n_full}")
        if rep:
            full_times.append(took_full)
            chain_times.append(took_chain)
            half_times.append(took_half)
    full_ms = _median(full_times) * 1e3
    return [
        StateResult(
            f"incremental restore (chain of {CHAIN})",
            _median(chain_times) * 1e3,
            full_ms,
            "ms",
            inverted=True,
            detail=f"restore of a full checkpoint of the same state; median of {repeats}",
        ),
        StateResult(
            "incremental rescale restore (half the key groups)",
            _median(half_times) * 1e3,
            full_ms / 2,
            "ms",
            inverted=True,
            detail=f"full restore / 2; key groups {HALF_KEY_GROUPS}",
        ),
    ]


def check_same_state(
    chain: CompletedCheckpoint,
    chain_handle: KeyedStateHandle,
    full: CompletedCheckpoint,
    full_handle: KeyedStateHandle,
    path: Path,
) -> None:
    """The chain restores exactly the state of the full checkpoint (every key and value)."""
    digests = []
    for completed, handle in ((chain, chain_handle), (full, full_handle)):
        backend = lmdb_backend(path, ALL_KEY_GROUPS)
        try:
            backend.restore([(completed, handle)])
            digests.append((stored_entries(backend), _digest(backend)))
        finally:
            backend.close()
            shutil.rmtree(path, ignore_errors=True)
    if digests[0] != digests[1]:
        raise RuntimeError(f"the chain restores another state than the full checkpoint: {digests}")


def _digest(backend: LmdbKeyedStateBackend) -> str:
    kv = lmdb_kv(backend)
    hasher = xxhash.xxh3_64()
    with kv._env.begin() as txn:
        for key, value in txn.cursor(db=kv.db):
            hasher.update(key)
            hasher.update(value)
    return hasher.hexdigest()


def loop_case(size_mb: int, root: Path) -> StateResult:
    """The event loop's blocked time while a task writes ``size_mb`` of state, flusher thread vs inline."""
    ours = loop_lag(size_mb, inline=False, directory=root / "lag-ours")
    shutil.rmtree(root / "lag-ours", ignore_errors=True)
    inline = loop_lag(size_mb, inline=True, directory=root / "lag-inline")
    shutil.rmtree(root / "lag-inline", ignore_errors=True)
    return StateResult(
        f"write-back flush: loop blocked p99 ({size_mb} MB state)",
        ours.p99_ms,
        inline.p99_ms,
        "ms",
        inverted=True,
        detail=(
            f"each flush waited for on the loop; 1 ms probe, p50 {ours.p50_ms:.2f} / max {ours.max_ms:.1f} ms "
            f"(inline: {inline.p50_ms:.2f} / {inline.max_ms:.1f} ms), {ours.entries / ours.seconds:,.0f} vs "
            f"{inline.entries / inline.seconds:,.0f} records/s"
        ),
    )


def run(sizes: tuple[int, ...], repeats: int, lag_mb: int, parent: str | None) -> tuple[list[StateResult], str]:
    with tempfile.TemporaryDirectory(prefix="keystate-incremental-bench-", dir=parent) as tmp:
        root = Path(tmp)
        backend = lmdb_backend(root / "ours")
        try:
            work = Workload(
                backend,
                backend.get_state(value_descriptor()),
                open_storage(str(root / "checkpoints")),
                random.Random(SEED + 12),
            )
            growth: list[StateResult] = []
            for size_mb in sizes:
                line, first, base_bytes = size_case(work, size_mb)
                growth.append(line)
            results = chain_cases(work, first, sizes[-1], repeats, root)
            info = (
                f"largest state: {work.entries:,} entries, {base_bytes / MB:.0f} MB full snapshot file, "
                f"{CHANGED:.0%} of the keys changed per checkpoint"
            )
        finally:
            backend.close()
            shutil.rmtree(root / "ours", ignore_errors=True)
        results.append(loop_case(lag_mb, root))
    return results + growth, info


def render_table(results: list[StateResult], info: str, elapsed: float, quick: bool) -> str:
    lines = [
        f"keystate incremental checkpoint benchmark ({'quick' if quick else 'full'})",
        info,
        "",
        f"{'benchmark':<58} {'value':>10} {'unit':<4} {'baseline':>10} {'ratio':>7}  baseline",
    ]
    for r in results:
        lines.append(f"{r.name:<58} {r.value:>10.4g} {r.unit:<4} {r.baseline:>10.4g} {r.ratio:>7.3f}  {r.detail}")
    lines += ["", "every ratio: baseline / value (bytes and durations), higher is better"]
    lines.append(f"finished in {elapsed:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keystate incremental checkpoints vs full snapshots (LMDB backend).")
    parser.add_argument("--quick", action="store_true", help="10 MB and 100 MB, medians of 2 (under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--dir", default=None, help="parent directory for the temp files (default: the temp dir)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    if args.quick:
        results, info = run(QUICK_SIZES_MB, 2, QUICK_LAG_MB, args.dir)
    else:
        results, info = run(FULL_SIZES_MB, 3, FULL_SIZES_MB[-1], args.dir)
    elapsed = time.perf_counter() - started
    if args.json:
        print_json(results)
    else:
        info += f"; load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
        print(render_table(results, info, elapsed, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
