"""Key-group arithmetic: ranges, subtask assignment and the default max parallelism (Flink's formulas).

These are pure functions of (max_parallelism, parallelism, index) and are shared by the checkpoint
format (keyed handles carry a key-group range), the state backends and the restore logic. Mapping a
*key* to its key group needs a hash and lives in ``keystate.statebackend.keygroups``.

Reference: Flink ``KeyGroupRangeAssignment`` (rules F1, F2 of docs/flink-rules.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LOWER_BOUND_MAX_PARALLELISM",
    "UPPER_BOUND_MAX_PARALLELISM",
    "KeyGroupRange",
    "check_max_parallelism",
    "default_max_parallelism",
    "key_group_range_for_subtask",
    "operator_index_for_key_group",
]

DEFAULT_LOWER_BOUND_MAX_PARALLELISM = 128
UPPER_BOUND_MAX_PARALLELISM = 1 << 15  # 32768; Flink's bound, beyond it its int arithmetic overflows


@dataclass(frozen=True, slots=True)
class KeyGroupRange:
    """The key groups ``start..end``, both inclusive. ``start == end + 1`` is the empty range."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start - 1 or self.end >= UPPER_BOUND_MAX_PARALLELISM:
            raise ValueError(f"invalid key-group range {self.start}..{self.end}")

    @classmethod
    def empty(cls) -> KeyGroupRange:
        return cls(0, -1)

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __bool__(self) -> bool:
        return self.end >= self.start

    def __contains__(self, key_group: object) -> bool:
        return isinstance(key_group, int) and self.start <= key_group <= self.end

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end + 1))

    def intersection(self, other: KeyGroupRange) -> KeyGroupRange:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return KeyGroupRange(start, end) if start <= end else KeyGroupRange.empty()

    def __str__(self) -> str:
        return f"{self.start}..{self.end}" if self else "(empty)"


def check_max_parallelism(max_parallelism: int) -> int:
    """Raise ``ValueError`` unless ``1 <= max_parallelism <= 32768`` (Flink's bounds)."""
    if not 1 <= max_parallelism <= UPPER_BOUND_MAX_PARALLELISM:
        raise ValueError(
            f"max_parallelism is not in valid bounds (1..{UPPER_BOUND_MAX_PARALLELISM}), found: {max_parallelism}"
        )
    return max_parallelism


def default_max_parallelism(parallelism: int) -> int:
    """Flink's default: ``min(max(roundUpToPowerOfTwo(p + p/2), 128), 32768)``.

    p <= 85 gives 128, p = 86..170 gives 256, p = 1000 gives 2048.
    """
    n = parallelism + parallelism // 2
    power = 1 << (n - 1).bit_length() if n > 1 else 1
    return min(max(power, DEFAULT_LOWER_BOUND_MAX_PARALLELISM), UPPER_BOUND_MAX_PARALLELISM)


def key_group_range_for_subtask(max_parallelism: int, parallelism: int, index: int) -> KeyGroupRange:
    """The key groups subtask ``index`` of ``parallelism`` owns (Flink's
    ``computeKeyGroupRangeForOperatorIndex``): ``[ceil(i*maxP/p), floor(((i+1)*maxP - 1)/p)]``.
    """
    if not 0 < parallelism <= max_parallelism:
        raise ValueError(f"parallelism {parallelism} is not in 1..max_parallelism ({max_parallelism})")
    if not 0 <= index < parallelism:
        raise ValueError(f"subtask index {index} is not in 0..{parallelism - 1}")
    start = (index * max_parallelism + parallelism - 1) // parallelism
    end = ((index + 1) * max_parallelism - 1) // parallelism
    return KeyGroupRange(start, end)


def operator_index_for_key_group(max_parallelism: int, parallelism: int, key_group: int) -> int:
    """The subtask that owns ``key_group``: ``key_group * parallelism // max_parallelism``."""
    return key_group * parallelism // max_parallelism
