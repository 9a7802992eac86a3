"""Key -> key group: a deterministic, versioned hash of the serialized key.

``key_group = xxh3_64(serialized_key, seed=0) % max_parallelism`` (hash version ``xxh3-64-v1``).
xxh3 is specified byte-exactly and implemented in C, so the mapping is the same on every machine,
process and Python version (Python's ``hash()`` is randomised per process and must never be used).
Subtask assignment and ranges are Flink's formulas (``keystate.storage.format.keygroups``).
"""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from keystate.storage.format.keygroups import (
    KeyGroupRange,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)

__all__ = [
    "KEY_GROUP_DIGEST",
    "KEY_GROUP_HASH",
    "KeyGroupRange",
    "assign_key_group",
    "default_max_parallelism",
    "key_group_range_for_subtask",
    "operator_index_for_key_group",
]

KEY_GROUP_HASH = "xxh3-64-v1"
"""Identifies the key-group hash; recorded in keyed snapshots and checked on restore."""

KEY_GROUP_DIGEST: Callable[[bytes], int] = xxhash.xxh3_64_intdigest
"""The hash :data:`KEY_GROUP_HASH` names. A key's group is ``KEY_GROUP_DIGEST(serialized key) %
max_parallelism`` (:func:`assign_key_group`); the two per-record paths, ``set_current_key`` of the keyed
backends and hash routing in ``keystate.runtime.output``, write that expression out around this constant
instead of calling the function, whose Python call would add about a quarter to ``set_current_key``."""


def assign_key_group(serialized_key: bytes, max_parallelism: int) -> int:
    """The key group of a serialized key: ``xxh3_64(key) % max_parallelism``."""
    return KEY_GROUP_DIGEST(serialized_key) % max_parallelism
