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
import json
import math
import os
import pstats
import random
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import lmdb
import zstandard

from statebackend import (
    BytesSerializer,
    HeapKeyedStateBackend,
    KVKeyedStateBackend,
    ListState,
    ListStateDescriptor,
    LmdbKeyedStateBackend,
    MapState,
    MapStateDescriptor,
    ValueState,
    ValueStateDescriptor,
    key_group_range_for_subtask,
)
from statebackend._lmdb import LmdbKV
from storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CompletedCheckpoint,
    KeyedStateHandle,
    KeyGroupRange,
    OperatorState,
    StreamOptions,
    SubtaskState,
    open_storage,
)

T = TypeVar("T")

MB = 1_000_000
KEY_BYTES = 16
VALUE_BYTES = 100
ELEMENT_BYTES = 40
ENTRIES_PER_KEY = 10
"""Map entries and list appends per key (case 2)."""
MAX_PARALLELISM = 128
ALL_KEY_GROUPS = KeyGroupRange(0, MAX_PARALLELISM - 1)
HALF_KEY_GROUPS = key_group_range_for_subtask(MAX_PARALLELISM, 2, 0)
BATCH = 1000
"""Operations per py-lmdb transaction in the baselines."""
MAP_SIZE = 16 << 30
"""LMDB map size for every environment: sparse, large enough that no map growth happens in a run."""
FRESH_UPDATES = 1_000
"""Updates before each snapshot-pause sample."""
WRITE_FRESH_UPDATES = 10_000
"""Updates buffered before each timed snapshot write."""
WARMUP_SNAPSHOTS = 2
# One value-state entry in a keyed snapshot: >H key length | composite key | >I value length | value, where
# the composite key is >H key group | >H state id | >H key length | key | >H namespace length (empty).
ENTRY_RAW_BYTES = 2 + (2 + 2 + 2 + KEY_BYTES + 2) + 4 + VALUE_BYTES
OPERATOR = "bench"
HINT = f"{OPERATOR}/0/keyed"
JOB_ID = "57a7e0b5" * 4
SEED = 20240611
LEVEL = StreamOptions().compression_level
CHUNK = 1 << 20
_FRAME = struct.Struct(">I")  # >I element length | element: one list-state frame (no TTL)


@dataclass(frozen=True, slots=True)
class Config:
    """Sizes of one run (full or ``--quick``)."""

    rmw_keys: int
    collection_keys: int
    snapshot_sizes_mb: tuple[int, ...]
    repeats: int
    pause_samples: int


FULL = Config(rmw_keys=1_000_000, collection_keys=100_000, snapshot_sizes_mb=(100, 1000), repeats=3, pause_samples=15)
QUICK = Config(rmw_keys=200_000, collection_keys=10_000, snapshot_sizes_mb=(20, 100), repeats=2, pause_samples=9)


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark line: our figure next to the raw baseline measured in the same run."""

    name: str
    value: float
    baseline: float
    unit: str
    lower_is_better: bool = False
    """Latencies: the ratio is ``baseline / value`` so that higher is still better."""
    detail: str = ""
    """Shown in the table only."""

    @property
    def ratio(self) -> float:
        if self.lower_is_better:
            return self.baseline / self.value if self.value else 0.0
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


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


# --- data ---------------------------------------------------------------------------------------------


NOISE_BYTES = 32
"""Random bytes at the start of every value; the rest is a JSON-ish record (a snapshot compresses ~2.3x)."""


def make_records(count: int = 256, seed: int = SEED) -> list[bytes]:
    """``count`` small JSON-ish records, space-padded to ``VALUE_BYTES - NOISE_BYTES``."""
    rng = random.Random(seed)
    words = [b"user", b"session", b"click", b"view", b"cart", b"order", b"pay", b"ship", b"refund", b"login"]
    width = VALUE_BYTES - NOISE_BYTES
    out: list[bytes] = []
    for _ in range(count):
        record = b'{"ev":"%s","n":%d,"ok":%s,"src":"%s"}' % (
            rng.choice(words),
            rng.randrange(100_000),
            rng.choice([b"true", b"false"]),
            rng.choice(words),
        )
        out.append(record.ljust(width, b" ")[:width])
    return out


RECORDS = make_records()
VALUES = [random.Random(SEED + i).randbytes(NOISE_BYTES) + record for i, record in enumerate(RECORDS)]
"""256 ready values for the timed loops (what a value looks like does not matter to their speed)."""


def unique_values(n: int, rng: random.Random) -> list[bytes]:
    """``n`` values, each with its own random bytes (snapshot state, so compression sees realistic data)."""
    noise = rng.randbytes(NOISE_BYTES * n)
    return [noise[i * NOISE_BYTES : (i + 1) * NOISE_BYTES] + RECORDS[i & 255] for i in range(n)]


def make_keys(n: int, seed: int) -> list[bytes]:
    """``n`` random ``KEY_BYTES``-byte keys (distinct with overwhelming probability)."""
    blob = random.Random(seed).randbytes(KEY_BYTES * n)
    return [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]


def shuffled(keys: Sequence[bytes], seed: int) -> list[bytes]:
    out = list(keys)
    random.Random(seed).shuffle(out)
    return out


def rotate(value: bytes, by: int) -> bytes:
    by %= len(value)
    return value[by:] + value[:by]


# --- stores -------------------------------------------------------------------------------------------


def lmdb_backend(directory: Path, key_groups: KeyGroupRange = ALL_KEY_GROUPS) -> LmdbKeyedStateBackend:
    return LmdbKeyedStateBackend(
        directory=directory,
        map_size=MAP_SIZE,
        operator_uid=OPERATOR,
        subtask_index=0,
        max_parallelism=MAX_PARALLELISM,
        key_groups=key_groups,
        key_serializer=BytesSerializer(),
    )


def heap_backend() -> HeapKeyedStateBackend:
    return HeapKeyedStateBackend(
        operator_uid=OPERATOR,
        subtask_index=0,
        max_parallelism=MAX_PARALLELISM,
        key_groups=ALL_KEY_GROUPS,
        key_serializer=BytesSerializer(),
    )


def raw_env(directory: Path) -> lmdb.Environment:
    """A bare py-lmdb environment with the flags keystate uses (no fsync, no readahead, no meminit)."""
    directory.mkdir(parents=True, exist_ok=True)
    return lmdb.open(
        str(directory),
        map_size=MAP_SIZE,
        subdir=True,
        sync=False,
        metasync=False,
        readahead=False,
        meminit=False,
        max_dbs=2,
    )


def lmdb_kv(backend: KVKeyedStateBackend) -> LmdbKV:
    kv = backend.kv
    if not isinstance(kv, LmdbKV):
        raise TypeError(f"{backend!r} is not an LMDB backend")
    return kv


def settle(backend: KVKeyedStateBackend) -> None:
    """Write the LMDB backend's buffered changes into LMDB, so a timed pass leaves no work behind."""
    if isinstance(backend.kv, LmdbKV):
        backend.kv.flush()


def stored_entries(backend: LmdbKeyedStateBackend) -> int:
    kv = lmdb_kv(backend)
    kv.flush()
    with kv._env.begin() as txn:
        return int(txn.stat(kv.db)["entries"])


def value_descriptor() -> ValueStateDescriptor[bytes]:
    return ValueStateDescriptor[bytes](name="value", serializer=BytesSerializer())


# --- 1. value state read-modify-write ---------------------------------------------------------------


def ours_load(backend: KVKeyedStateBackend, state: ValueState[bytes], keys: Sequence[bytes]) -> None:
    set_key, update = backend.set_current_key, state.update
    for i, key in enumerate(keys):
        set_key(key)
        update(VALUES[i & 255])
    settle(backend)


def ours_rmw(backend: KVKeyedStateBackend, state: ValueState[bytes], order: Sequence[bytes]) -> None:
    set_key, value, update = backend.set_current_key, state.value, state.update
    for key in order:
        set_key(key)
        v = value() or b""
        update(v[1:] + v[:1])
    settle(backend)


def raw_load(env: lmdb.Environment, keys: Sequence[bytes]) -> None:
    for start in range(0, len(keys), BATCH):
        with env.begin(write=True) as txn:
            put = txn.put
            for i, key in enumerate(keys[start : start + BATCH], start):
                put(key, VALUES[i & 255])


def raw_rmw(env: lmdb.Environment, order: Sequence[bytes]) -> None:
    for start in range(0, len(order), BATCH):
        with env.begin(write=True) as txn:
            get, put = txn.get, txn.put
            for key in order[start : start + BATCH]:
                v = get(key) or b""
                put(key, v[1:] + v[:1])


def dict_load(d: dict[bytes, bytes], keys: Sequence[bytes]) -> None:
    for i, key in enumerate(keys):
        d[key] = VALUES[i & 255]


def dict_rmw(d: dict[bytes, bytes], order: Sequence[bytes]) -> None:
    get = d.get
    for key in order:
        v = get(key) or b""
        d[key] = v[1:] + v[:1]


def value_cases(cfg: Config, root: Path) -> list[Result]:
    keys = make_keys(cfg.rmw_keys, SEED)
    orders = [shuffled(keys, SEED + 1 + rep) for rep in range(cfg.repeats)]
    probe = (keys[0], keys[-1])
    expected = (rotate(VALUES[0], cfg.repeats), rotate(VALUES[(len(keys) - 1) & 255], cfg.repeats))
    results: list[Result] = []

    backend = lmdb_backend(root / "rmw-ours")
    env = raw_env(root / "rmw-raw")
    try:
        state = backend.get_state(value_descriptor())
        ours_load(backend, state, keys)  # the warm-up: every key inserted once, in random order
        raw_load(env, keys)
        best_ours = best_raw = math.inf
        for order in orders:
            best_ours = min(best_ours, _timed(partial(ours_rmw, backend, state, order))[0])
            best_raw = min(best_raw, _timed(partial(raw_rmw, env, order))[0])
        found: list[bytes | None] = []
        for key in probe:
            backend.set_current_key(key)
            found.append(state.value())
        with env.begin() as txn:
            raw_found = tuple(txn.get(key) for key in probe)
        if tuple(found) != expected or raw_found != expected:
            raise RuntimeError("value RMW: values read back differ from the values written")
        n = len(keys)
        results.append(
            Result("value rmw: lmdb backend", n / best_ours, n / best_raw, "ops/s", detail="py-lmdb get+put")
        )
    finally:
        backend.close()
        env.close()
        shutil.rmtree(root / "rmw-ours", ignore_errors=True)
        shutil.rmtree(root / "rmw-raw", ignore_errors=True)

    heap = heap_backend()
    try:
        d: dict[bytes, bytes] = {}
        heap_state = heap.get_state(value_descriptor())
        ours_load(heap, heap_state, keys)
        dict_load(d, keys)
        best_ours = best_raw = math.inf
        for order in orders:
            best_ours = min(best_ours, _timed(partial(ours_rmw, heap, heap_state, order))[0])
            best_raw = min(best_raw, _timed(partial(dict_rmw, d, order))[0])
        heap.set_current_key(probe[0])
        if heap_state.value() != expected[0] or d[probe[0]] != expected[0]:
            raise RuntimeError("value RMW (heap): values read back differ from the values written")
        n = len(keys)
        results.append(Result("value rmw: heap backend", n / best_ours, n / best_raw, "ops/s", detail="dict get+set"))
    finally:
        heap.close()
    return results


# --- 2. map and list state ------------------------------------------------------------------------------

USER_KEYS = [b"field-%02d" % i for i in range(ENTRIES_PER_KEY)]
ELEMENTS = [v[:ELEMENT_BYTES] for v in VALUES[:ENTRIES_PER_KEY]]


def ours_map_put(backend: KVKeyedStateBackend, state: MapState[bytes, bytes], order: Sequence[bytes]) -> int:
    set_key, put = backend.set_current_key, state.put
    for i, user_key in enumerate(USER_KEYS):
        value = VALUES[i]
        for key in order:
            set_key(key)
            put(user_key, value)
    settle(backend)
    return len(order) * len(USER_KEYS)


def ours_map_get(backend: KVKeyedStateBackend, state: MapState[bytes, bytes], order: Sequence[bytes]) -> int:
    set_key, get = backend.set_current_key, state.get
    found = 0
    for key in order:
        set_key(key)
        for user_key in USER_KEYS:
            if get(user_key) is not None:
                found += 1
    return found


def ours_list_add(backend: KVKeyedStateBackend, state: ListState[bytes], order: Sequence[bytes]) -> int:
    set_key, add = backend.set_current_key, state.add
    for element in ELEMENTS:
        for key in order:
            set_key(key)
            add(element)
    settle(backend)
    return len(order) * len(ELEMENTS)


def ours_list_get(backend: KVKeyedStateBackend, state: ListState[bytes], order: Sequence[bytes]) -> int:
    set_key, get = backend.set_current_key, state.get
    found = 0
    for key in order:
        set_key(key)
        found += len(get())
    return found


def raw_map_put(env: lmdb.Environment, db: lmdb._Database, order: Sequence[bytes]) -> int:
    for i, user_key in enumerate(USER_KEYS):
        value = VALUES[i]
        for start in range(0, len(order), BATCH):
            with env.begin(write=True, db=db) as txn:
                put = txn.put
                for key in order[start : start + BATCH]:
                    put(key + user_key, value)
    return len(order) * len(USER_KEYS)


def raw_map_get(env: lmdb.Environment, db: lmdb._Database, order: Sequence[bytes]) -> int:
    per_txn = BATCH // len(USER_KEYS)  # 1000 gets per read transaction
    found = 0
    for start in range(0, len(order), per_txn):
        with env.begin(db=db) as txn:
            get = txn.get
            for key in order[start : start + per_txn]:
                for user_key in USER_KEYS:
                    if get(key + user_key) is not None:
                        found += 1
    return found


def raw_list_add(env: lmdb.Environment, db: lmdb._Database, order: Sequence[bytes]) -> int:
    pack = _FRAME.pack
    for element in ELEMENTS:
        for start in range(0, len(order), BATCH):
            with env.begin(write=True, db=db) as txn:
                get, put = txn.get, txn.put
                for key in order[start : start + BATCH]:
                    frame = pack(len(element)) + element
                    old = get(key)
                    put(key, frame if old is None else old + frame)
    return len(order) * len(ELEMENTS)


def split_frames(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos, end = 0, len(raw)
    unpack = _FRAME.unpack_from
    while pos < end:
        (n,) = unpack(raw, pos)
        pos += 4
        out.append(raw[pos : pos + n])
        pos += n
    return out


def raw_list_get(env: lmdb.Environment, db: lmdb._Database, order: Sequence[bytes]) -> int:
    found = 0
    for start in range(0, len(order), BATCH):
        with env.begin(db=db) as txn:
            get = txn.get
            for key in order[start : start + BATCH]:
                raw = get(key)
                if raw is not None:
                    found += len(split_frames(raw))
    return found


COLLECTION_PHASES = ("map put", "map get", "list append", "list get")


def collection_round(keys: Sequence[bytes], directory: Path, seed: int) -> dict[str, tuple[float, float]]:
    """One repetition from empty stores: ``{phase: (our seconds, baseline seconds)}``."""
    write_order = shuffled(keys, seed)
    read_order = shuffled(keys, seed + 1)
    expected = len(keys) * ENTRIES_PER_KEY
    times: dict[str, tuple[float, float]] = {}
    backend = lmdb_backend(directory / "ours")
    env = raw_env(directory / "raw")
    try:
        mstate = backend.get_state(
            MapStateDescriptor[bytes, bytes](name="map", serializer=BytesSerializer(), key_serializer=BytesSerializer())
        )
        lstate = backend.get_state(ListStateDescriptor[bytes](name="list", serializer=BytesSerializer()))
        map_db = env.open_db(b"map")
        list_db = env.open_db(b"list")
        w, r = write_order, read_order
        runs: list[tuple[str, Callable[[], int], Callable[[], int]]] = [
            ("map put", partial(ours_map_put, backend, mstate, w), partial(raw_map_put, env, map_db, w)),
            ("map get", partial(ours_map_get, backend, mstate, r), partial(raw_map_get, env, map_db, r)),
            ("list append", partial(ours_list_add, backend, lstate, w), partial(raw_list_add, env, list_db, w)),
            ("list get", partial(ours_list_get, backend, lstate, r), partial(raw_list_get, env, list_db, r)),
        ]
        for phase, ours, raw in runs:
            ours_time, ours_count = _timed(ours)
            raw_time, raw_count = _timed(raw)
            if ours_count != expected or raw_count != expected:
                raise RuntimeError(f"{phase}: counted {ours_count} (ours) / {raw_count} (raw), expected {expected}")
            times[phase] = (ours_time, raw_time)
    finally:
        backend.close()
        env.close()
        shutil.rmtree(directory, ignore_errors=True)
    return times


def collection_cases(cfg: Config, root: Path) -> list[Result]:
    keys = make_keys(cfg.collection_keys, SEED + 100)
    collection_round(keys[: max(len(keys) // 10, BATCH)], root / "collections-warmup", SEED + 200)
    best = dict.fromkeys(COLLECTION_PHASES, (math.inf, math.inf))
    for rep in range(cfg.repeats):
        for phase, (ours, raw) in collection_round(keys, root / f"collections-{rep}", SEED + 300 + rep).items():
            best[phase] = (min(best[phase][0], ours), min(best[phase][1], raw))
    ops = len(keys) * ENTRIES_PER_KEY
    per_phase = {"map put": ops, "map get": ops, "list append": ops, "list get": len(keys)}
    return [
        Result(f"{phase}: lmdb backend", per_phase[phase] / ours, per_phase[phase] / raw, "ops/s", detail="py-lmdb")
        for phase, (ours, raw) in best.items()
    ]


# --- 3.-5. snapshots and restore --------------------------------------------------------------------------


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


def pause_case(snap_state: SnapshotState, size_mb: int, samples: int) -> Result:
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
    return Result(
        f"snapshot pause: {size_mb} MB state",
        statistics.median(ours) * 1e3,
        statistics.median(bare) * 1e3,
        "ms",
        lower_is_better=True,
        detail=f"env.begin(); median of {samples}, max {max(ours) * 1e3:.3f} ms",
    )


def checkpoint_metadata(checkpoint_id: int, handle: KeyedStateHandle) -> CheckpointMetadata:
    subtask = SubtaskState(0, keyed=(handle,))
    operator = OperatorState(OPERATOR, 1, MAX_PARALLELISM, subtasks=(subtask,))
    return CheckpointMetadata(checkpoint_id, JOB_ID, CheckpointKind.CHECKPOINT, int(time.time() * 1000), (operator,))


def write_checkpoint(
    snap_state: SnapshotState, storage: CheckpointStorage, checkpoint_id: int
) -> tuple[float, CompletedCheckpoint, KeyedStateHandle]:
    """Flush, buffer fresh updates, snapshot; time ``snap.write`` and commit (untimed)."""
    settle(snap_state.backend)
    snap_state.fresh_updates(WRITE_FRESH_UPDATES)
    snapshot = snap_state.backend.snapshot()
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    try:
        took, handle = _timed(partial(snapshot.write, writer, HINT))
        completed = None if handle is None else writer.commit(checkpoint_metadata(checkpoint_id, handle))
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
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)
    view = memoryview(payload)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        for start in range(0, len(payload), CHUNK):
            f.write(compressor.compress(view[start : start + CHUNK]))
        f.flush()
        os.fsync(f.fileno())


def write_case(
    snap_state: SnapshotState, storage: CheckpointStorage, repeats: int, root: Path
) -> tuple[Result, CompletedCheckpoint, KeyedStateHandle]:
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
        base_took, _ = _timed(partial(baseline_write, payload, root / "baseline.zst"))
        if rep:
            best_ours = min(best_ours, took)
            best_base = min(best_base, base_took)
    assert latest is not None
    (root / "baseline.zst").unlink(missing_ok=True)
    completed, handle = latest
    raw = handle.stream.raw_size
    if abs(raw - len(payload)) > len(payload) // 100:
        raise RuntimeError(f"snapshot sizes drifted between repetitions: {raw} vs {len(payload)}")
    result = Result(
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
        took, _ = _timed(partial(backend.restore, [(completed, handle)]))
        return took, stored_entries(backend)
    finally:
        backend.close()
        shutil.rmtree(path, ignore_errors=True)


def read_state_file(completed: CompletedCheckpoint, handle: KeyedStateHandle) -> int:
    return len(completed.open_state(handle.stream).read_all())


def restore_cases(
    completed: CompletedCheckpoint, handle: KeyedStateHandle, entries: int, repeats: int, root: Path
) -> list[Result]:
    best_full = best_half = best_read = math.inf
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        full, full_entries = restore_once(completed, handle, ALL_KEY_GROUPS, root / "restore-full")
        half, half_entries = restore_once(completed, handle, HALF_KEY_GROUPS, root / "restore-half")
        read, _ = _timed(partial(read_state_file, completed, handle))
        if full_entries != entries or not 0.4 * entries < half_entries < 0.6 * entries:
            raise RuntimeError(f"restored {full_entries} / {half_entries} (half) entries, expected {entries}")
        if rep:
            best_full, best_half, best_read = min(best_full, full), min(best_half, half), min(best_read, read)
    raw = handle.stream.raw_size
    return [
        Result(
            f"restore: {raw / MB:.0f} MB state", raw / best_full / MB, raw / best_read / MB, "MB/s", detail="read_all()"
        ),
        Result(
            f"restore half (rescale 1->2): {raw / MB:.0f} MB state",
            best_half * 1e3,
            best_full / 2 * 1e3,
            "ms",
            lower_is_better=True,
            detail=f"full restore / 2; key groups {HALF_KEY_GROUPS}",
        ),
    ]


def snapshot_cases(cfg: Config, root: Path, options: StreamOptions) -> tuple[list[Result], str]:
    backend = lmdb_backend(root / "snapshot-ours")
    try:
        state = backend.get_state(value_descriptor())
        snap_state = SnapshotState(backend, state, random.Random(SEED + 7), [])
        results: list[Result] = []
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


# --- output -------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"


def render_table(results: list[Result], cfg: Config, info: str, elapsed: float, quick: bool) -> str:
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


def run(cfg: Config, parent: str | None, options: StreamOptions | None = None) -> tuple[list[Result], str]:
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
        print(json.dumps({"benchmarks": [r.to_dict() for r in results]}))
    else:
        print(render_table(results, cfg, info, elapsed, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
