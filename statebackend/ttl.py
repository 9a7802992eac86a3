"""State time-to-live, after Flink's ``StateTtlConfig``.

A state with TTL stores, in front of every value (and of every list element, and every map entry),
the time it was last updated: ``>q`` milliseconds. A value is expired when ``now >= ts + ttl``.
Expired values are never returned (with ``NEVER_RETURN_EXPIRED``), are removed when read, are left
out of snapshots (``cleanup_in_snapshot``, on by default) and are removed by
``KeyedStateBackend.purge_expired()`` (the compaction-style cleanup).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["TTL_HEADER", "StateVisibility", "TtlConfig", "TtlUpdate", "system_clock_ms"]

TTL_HEADER = struct.Struct(">q")  # >q last-update time in ms, in front of the serialized value


class TtlUpdate(StrEnum):
    """When the last-update time is refreshed (Flink ``StateTtlConfig.UpdateType``)."""

    ON_CREATE_AND_WRITE = "on_create_and_write"
    ON_READ_AND_WRITE = "on_read_and_write"


class StateVisibility(StrEnum):
    """Whether an expired value that was not cleaned up yet may still be returned."""

    NEVER_RETURN_EXPIRED = "never_return_expired"
    RETURN_EXPIRED_IF_NOT_CLEANED_UP = "return_expired_if_not_cleaned_up"


@dataclass(frozen=True, slots=True)
class TtlConfig:
    """Time-to-live of a state's values.

    Attributes:
        ttl_ms: how long a value lives after its last update, in milliseconds (> 0).
        update: when the last-update time is refreshed.
        visibility: whether expired values may be returned before cleanup.
        cleanup_in_snapshot: leave expired values out of snapshots (Flink ``cleanupFullSnapshot``).
    """

    ttl_ms: int
    update: TtlUpdate = TtlUpdate.ON_CREATE_AND_WRITE
    visibility: StateVisibility = StateVisibility.NEVER_RETURN_EXPIRED
    cleanup_in_snapshot: bool = True

    def __post_init__(self) -> None:
        if self.ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, found {self.ttl_ms}")

    def to_dict(self) -> dict[str, object]:
        return {
            "ttl_ms": self.ttl_ms,
            "update": self.update.value,
            "visibility": self.visibility.value,
            "cleanup_in_snapshot": self.cleanup_in_snapshot,
        }


def system_clock_ms() -> int:
    """Processing time in milliseconds since the epoch (the default TTL clock)."""
    return time.time_ns() // 1_000_000


Clock = Callable[[], int]
