"""Cases 1 and 2 of the state-backend benchmark (``benchmarks/state.py``): value state read-modify-write on
the LMDB and heap backends, and map and list state on LMDB, each against py-lmdb or a dict used directly."""

from __future__ import annotations

import math
import shutil
import struct
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import lmdb

from benchmarks._common import timed
from benchmarks._state_fixtures import (
    ENTRIES_PER_KEY,
    SEED,
    VALUES,
    Config,
    StateResult,
    heap_backend,
    lmdb_backend,
    make_keys,
    raw_env,
    rotate,
    settle,
    shuffled,
    value_descriptor,
)
from keystate.statebackend import (
    BytesSerializer,
    KVKeyedStateBackend,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ValueState,
)

ELEMENT_BYTES = 40
BATCH = 1000
"""Operations per py-lmdb transaction in the baselines."""
_FRAME = struct.Struct(">I")  # >I element length | element: one list-state frame (no TTL)


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


def value_cases(cfg: Config, root: Path) -> list[StateResult]:
    keys = make_keys(cfg.rmw_keys, SEED)
    orders = [shuffled(keys, SEED + 1 + rep) for rep in range(cfg.repeats)]
    probe = (keys[0], keys[-1])
    expected = (rotate(VALUES[0], cfg.repeats), rotate(VALUES[(len(keys) - 1) & 255], cfg.repeats))
    results: list[StateResult] = []

    backend = lmdb_backend(root / "rmw-ours")
    env = raw_env(root / "rmw-raw")
    try:
        state = backend.get_state(value_descriptor())
        ours_load(backend, state, keys)  # the warm-up: every key inserted once, in random order
        raw_load(env, keys)
        best_ours = best_raw = math.inf
        for order in orders:
            best_ours = min(best_ours, timed(partial(ours_rmw, backend, state, order))[0])
            best_raw = min(best_raw, timed(partial(raw_rmw, env, order))[0])
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
            StateResult("value rmw: lmdb backend", n / best_ours, n / best_raw, "ops/s", detail="py-lmdb get+put")
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
            best_ours = min(best_ours, timed(partial(ours_rmw, heap, heap_state, order))[0])
            best_raw = min(best_raw, timed(partial(dict_rmw, d, order))[0])
        heap.set_current_key(probe[0])
        if heap_state.value() != expected[0] or d[probe[0]] != expected[0]:
            raise RuntimeError("value RMW (heap): values read back differ from the values written")
        n = len(keys)
        results.append(
            StateResult("value rmw: heap backend", n / best_ours, n / best_raw, "ops/s", detail="dict get+set")
        )
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
            ours_time, ours_count = timed(ours)
            raw_time, raw_count = timed(raw)
            if ours_count != expected or raw_count != expected:
                raise RuntimeError(f"{phase}: counted {ours_count} (ours) / {raw_count} (raw), expected {expected}")
            times[phase] = (ours_time, raw_time)
    finally:
        backend.close()
        env.close()
        shutil.rmtree(directory, ignore_errors=True)
    return times


def collection_cases(cfg: Config, root: Path) -> list[StateResult]:
    keys = make_keys(cfg.collection_keys, SEED + 100)
    collection_round(keys[: max(len(keys) // 10, BATCH)], root / "collections-warmup", SEED + 200)
    best = dict.fromkeys(COLLECTION_PHASES, (math.inf, math.inf))
    for rep in range(cfg.repeats):
        for phase, (ours, raw) in collection_round(keys, root / f"collections-{rep}", SEED + 300 + rep).items():
            best[phase] = (min(best[phase][0], ours), min(best[phase][1], raw))
    ops = len(keys) * ENTRIES_PER_KEY
    per_phase = {"map put": ops, "map get": ops, "list append": ops, "list get": len(keys)}
    return [
        StateResult(
            f"{phase}: lmdb backend", per_phase[phase] / ours, per_phase[phase] / raw, "ops/s", detail="py-lmdb"
        )
        for phase, (ours, raw) in best.items()
    ]
