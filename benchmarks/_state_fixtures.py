"""Fixtures of the state-backend benchmark (``benchmarks/state.py``): sizes, generated keys and values,
the backends and raw py-lmdb environments under test, and its result line."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from benchmarks._common import Result
from keystate.statebackend import (
    BytesSerializer,
    HeapKeyedStateBackend,
    KVKeyedStateBackend,
    LmdbKeyedStateBackend,
    ValueStateDescriptor,
)
from keystate.statebackend._lmdb import LmdbKV
from keystate.storage import KeyGroupRange

MB = 1_000_000
KEY_BYTES = 16
VALUE_BYTES = 100
ENTRIES_PER_KEY = 10
"""Map entries and list appends per key (case 2)."""
MAX_PARALLELISM = 128
ALL_KEY_GROUPS = KeyGroupRange(0, MAX_PARALLELISM - 1)
MAP_SIZE = 16 << 30
"""LMDB map size for every environment: sparse, large enough that no map growth happens in a run."""
OPERATOR = "bench"
SEED = 20240611


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
class StateResult(Result):
    detail: str = ""
    """What the baseline is (shown in the table only)."""


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
