"""Key -> key group: a deterministic, versioned hash of the serialized key.

``key_group = xxh3_64(serialized_key, seed=0) % max_parallelism`` (hash version ``xxh3-64-v1``).
xxh3 is specified byte-exactly and implemented in C, so the mapping is the same on every machine,
process and Python version (Python's ``hash()`` is randomised per process and must never be used).
Subtask assignment and ranges are Flink's formulas (``keystate.storage.keygroups``).
"""

from __future__ import annotations

import xxhash

from keystate.storage.keygroups import (
    KeyGroupRange,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)

__all__ = [
    "KEY_GROUP_HASH",
    "KeyGroupRange",
    "assign_key_group",
    "default_max_parallelism",
    "key_group_range_for_subtask",
    "operator_index_for_key_group",
]

KEY_GROUP_HASH = "xxh3-64-v1"
"""Identifies the key-group hash; recorded in keyed snapshots and checked on restore."""

_hash = xxhash.xxh3_64_intdigest


def assign_key_group(serialized_key: bytes, max_parallelism: int) -> int:
    """The key group of a serialized key: ``xxh3_64(key) % max_parallelism``."""
    return _hash(serialized_key) % max_parallelism
