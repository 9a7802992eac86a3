"""Cases 3 to 5 of the state-backend benchmark (``benchmarks/state.py``): the snapshot pause, the snapshot
write into local checkpoint storage and restore (full and rescaled), against py-lmdb, zstd and file baselines."""

from __future__ import annotations

import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from benchmarks._common import (
    LEVEL,
    baseline_compressor,
    compress_blocks,
    keyed_checkpoint_metadata,
    timed,
    write_blocks,
)
from benchmarks._state_fixtures import (
    ALL_KEY_GROUPS,
    KEY_BYTES,
    MAX_PARALLELISM,
    MB,
    OPERATOR,
    SEED,
    VALUE_BYTES,
    VALUES,
    Config,
    StateResult,
    lmdb_backend,
    lmdb_kv,
    make_keys,
    settle,
    stored_entries,
    unique_values,
    value_descriptor,
)
from keystate.statebackend import LmdbKeyedStateBackend, ValueState, key_group_range_for_subtask
from keystate.storage import (
    CheckpointStorage,
    CompletedCheckpoint,
    KeyedStateHandle,
    KeyGroupRange,
    StreamOptions,
    open_storage,
)

HALF_KEY_GROUPS = key_group_range_for_subtask(MAX_PARALLELISM, 2, 0)
FRESH_UPDATES = 1_000
"""Updates before each snapshot-pause sample."""
WRITE_FRESH_UPDATES = 10_000
"""Updates buffered before each timed snapshot write."""
WARMUP_SNAPSHOTS = 2
# One value-state entry in a keyed snapshot: >H key length | composite key | >I value length | value, where
# the composite key is >H key group | >H state id | >H key length | key | >H namespace length (empty).
ENTRY_RAW_BYTES = 2 + (2 + 2 + 2 + KEY_BYTES + 2) + 4 + VALUE_BYTES
HINT = f"{OPERATOR}/0/keyed"
JOB_ID = "57a7e0b5" * 4


@dataclass(slots=True)
class SnapshotState:
    """A value-state LMDB backend being filled, and the keys fresh updates go to."""

    backend: LmdbKeyedStateBackend
    state: ValueState[bytes]
    rng: random.Random
    hot: list[bytes]
    entries: int = 0

    def grow_to(self, entries: int) -> None:
        set_key, update = self.backend.set_current_key, self.state.update
        while self.entries < entries:
            n = min(100_000, entries - self.entries)
            keys = make_keys(n, self.rng.randrange(1 << 62))
            if len(self.hot) < 100_000:
                self.hot.extend(keys[: 100_000 - len(self.hot)])
            for key, value in zip(keys, unique_values(n, self.rng), strict=True):
                set_key(key)
                update(value)
            self.entries += n

    def fresh_updates(self, count: int) -> None:
        set_key, update = self.backend.set_current_key, self.state.update
        for key in self.rng.choices(self.hot, k=count):
            set_key(key)
            update(VALUES[key[0]])


def pause_case(snap_state: SnapshotState, size_mb: int, samples: int) -> StateResult:
    backend = snap_state.backend
    env = lmdb_kv(backend)._env
    ours: list[float] = []
    bare: list[float] = []
    clock = time.perf_counter
    for i in range(WARMUP_SNAPSHOTS + samples):
        snap_state.fresh_updates(FRESH_UPDATES)
        started = clock()
        snapshot = backend.snapshot()
        took = clock() - started
        snapshot.release()
        snap_state.fresh_updates(FRESH_UPDATES)  # the same (cold-cache) conditions for the baseline
        started = clock()
        txn = env.begin()
        bare_took = clock() - started
        txn.abort()
        if i >= WARMUP_SNAPSHOTS:
            ours.append(took)
            bare.append(bare_took)
    return StateResult(
        f"snapshot pause: {size_mb} MB state",
        statistics.median(ours) * 1e3,
        statistics.median(bare) * 1e3,
        "ms",
        inverted=True,
        detail=f"env.begin(); median of {samples}, max {max(ours) * 1e3:.3f} ms",
    )


def write_checkpoint(
    snap_state: SnapshotState, storage: CheckpointStorage, checkpoint_id: int
) -> tuple[float, CompletedCheckpoint, KeyedStateHandle]:
    """Flush, buffer fresh updates, snapshot; time ``snap.write`` and commit (untimed)."""
    settle(snap_state.backend)
    snap_state.fresh_updates(WRITE_FRESH_UPDATES)
    snapshot = snap_state.backend.snapshot()
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    try:
        took, handle = timed(partial(snapshot.write, writer, HINT))
        completed = (
            None
            if handle is None
            else writer.commit(keyed_checkpoint_metadata(JOB_ID, checkpoint_id, OPERATOR, MAX_PARALLELISM, handle))
        )
    except BaseException:
        snapshot.release()
        writer.abort()
        raise
    if handle is None or completed is None:
        writer.abort()
        raise RuntimeError("the snapshot wrote no state")
    return took, completed, handle


def baseline_write(payload: bytes, path: Path) -> None:
    """zstd level 1 in 1 MiB chunks, one plain file, fsync."""
    compressor = baseline_compressor()
    path.unlink(missing_ok=True)
    write_blocks(path, compress_blocks(payload, compressor), fsync=True)


def write_case(
    snap_state: SnapshotState, storage: CheckpointStorage, repeats: int, root: Path
) -> tuple[StateResult, CompletedCheckpoint, KeyedStateHandle]:
    best_ours = best_base = math.inf
    latest: tuple[CompletedCheckpoint, KeyedStateHandle] | None = None
    payload = b""
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        took, completed, handle = write_checkpoint(snap_state, storage, rep + 1)
        if latest is not None:
            storage.discard(latest[0])
        latest = completed, handle
        if not payload:
            payload = completed.open_state(handle.stream).read_all()
        base_took, _ = timed(partial(baseline_write, payload, root / "baseline.zst"))
        if rep:
            best_ours = min(best_ours, took)
            best_base = min(best_base, base_took)
    assert latest is not None
    (root / "baseline.zst").unlink(missing_ok=True)
    completed, handle = latest
    raw = handle.stream.raw_size
    if abs(raw - len(payload)) > len(payload) // 100:
        raise RuntimeError(f"snapshot sizes drifted between repetitions: {raw} vs {len(payload)}")
    result = StateResult(
        f"snapshot write: {raw / MB:.0f} MB state",
        raw / best_ours / MB,
        len(payload) / best_base / MB,
        "MB/s",
        detail=f"zstd -{LEVEL} 1 MiB chunks + file + fsync; {raw / handle.stream.size:.2f}x compression",
    )
    return result, completed, handle


def restore_once(
    completed: CompletedCheckpoint, handle: KeyedStateHandle, key_groups: KeyGroupRange, path: Path
) -> tuple[float, int]:
    backend = lmdb_backend(path, key_groups)
    try:
        took, _ = timed(partial(backend.restore, [(completed, handle)]))
        return took, stored_entries(backend)
    finally:
        backend.close()
        shutil.rmtree(path, ignore_errors=True)


def read_state_file(completed: CompletedCheckpoint, handle: KeyedStateHandle) -> int:
    return len(completed.open_state(handle.stream).read_all())


def restore_cases(
    completed: CompletedCheckpoint, handle: KeyedStateHandle, entries: int, repeats: int, root: Path
) -> list[StateResult]:
    best_full = best_half = best_read = math.inf
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        full, full_entries = restore_once(completed, handle, ALL_KEY_GROUPS, root / "restore-full")
        half, half_entries = restore_once(completed, handle, HALF_KEY_GROUPS, root / "restore-half")
        read, _ = timed(partial(read_state_file, completed, handle))
        if full_entries != entries or not 0.4 * entries < half_entries < 0.6 * entries:
            raise RuntimeError(f"restored {full_entries} / {half_entries} (half) entries, expected {entries}")
        if rep:
            best_full, best_half, best_read = min(best_full, full), min(best_half, half), min(best_read, read)
    raw = handle.stream.raw_size
    return [
        StateResult(
            f"restore: {raw / MB:.0f} MB state", raw / best_full / MB, raw / best_read / MB, "MB/s", detail="read_all()"
        ),
        StateResult(
            f"restore half (rescale 1->2): {raw / MB:.0f} MB state",
            best_half * 1e3,
            best_full / 2 * 1e3,
            "ms",
            inverted=True,
            detail=f"full restore / 2; key groups {HALF_KEY_GROUPS}",
        ),
    ]


def snapshot_cases(cfg: Config, root: Path, options: StreamOptions) -> tuple[list[StateResult], str]:
    backend = lmdb_backend(root / "snapshot-ours")
    try:
        state = backend.get_state(value_descriptor())
        snap_state = SnapshotState(backend, state, random.Random(SEED + 7), [])
        results: list[StateResult] = []
        for size_mb in cfg.snapshot_sizes_mb:
            snap_state.grow_to(size_mb * MB // ENTRY_RAW_BYTES)
            results.append(pause_case(snap_state, size_mb, cfg.pause_samples))
        storage = open_storage(str(root / "checkpoints"), options=options)
        write, completed, handle = write_case(snap_state, storage, cfg.repeats, root)
        results.append(write)
        entries = stored_entries(backend)
        data_file = (root / "snapshot-ours" / "data.mdb").stat().st_size
        results += restore_cases(completed, handle, entries, cfg.repeats, root)
        info = (
            f"snapshot state: {entries:,} entries, {handle.stream.raw_size / MB:.0f} MB raw snapshot, "
            f"{handle.stream.size / MB:.0f} MB state file, LMDB data file {data_file / MB:.0f} MB"
        )
    finally:
        backend.close()
        shutil.rmtree(root / "snapshot-ours", ignore_errors=True)
    return results, info
