"""Redistributing state when parallelism changes (Flink's ``StateAssignmentOperation`` rules;
the ids F3-F5 are those of docs/flink-rules.md).

* Keyed state (F3): same parallelism -> subtask i keeps old subtask i's handles; otherwise each new
  subtask gets every old handle whose key-group range intersects its own. Handles stay whole: the
  backend reads only the key groups it owns, seeking by the handle's offsets.
* Operator list state (F4, F5): Flink's ``RoundRobinOperatorStateRepartitioner``. Split state is
  concatenated in old-subtask order and dealt out in contiguous chunks (``total // p`` each, the
  first ``total % p`` get one more, the start rotating between names); union state goes to every
  subtask whole; broadcast state gives new subtask i the copy of reporter ``i % reporters``.
  Deviation: Flink iterates state names in ``HashMap`` order; keystate uses sorted names, so the
  result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from keystate.storage.format.keygroups import key_group_range_for_subtask
from keystate.storage.format.metadata import (
    DistributionMode,
    KeyedStateHandle,
    OperatorStateEntry,
    OperatorStateHandle,
    StreamHandle,
)

__all__ = ["assign_keyed_handles", "repartition_operator_state"]


def assign_keyed_handles(
    previous: Sequence[Sequence[KeyedStateHandle]], new_parallelism: int, max_parallelism: int
) -> list[list[KeyedStateHandle]]:
    """Keyed handles per new subtask (``previous`` has one list per old subtask)."""
    if new_parallelism == len(previous):
        return [list(handles) for handles in previous]
    result: list[list[KeyedStateHandle]] = []
    for index in range(new_parallelism):
        mine = key_group_range_for_subtask(max_parallelism, new_parallelism, index)
        result.append([h for handles in previous for h in handles if h.key_groups.intersection(mine)])
    return result


@dataclass
class _Merge:
    """The entries one new subtask reads from one stream (Flink's merge map value)."""

    stream: StreamHandle
    entries: dict[str, OperatorStateEntry] = field(default_factory=dict)


class _Assignment:
    def __init__(self, parallelism: int) -> None:
        self._per_subtask: list[dict[int, _Merge]] = [{} for _ in range(parallelism)]

    def add(self, subtask: int, stream: StreamHandle, entry: OperatorStateEntry) -> None:
        merge = self._per_subtask[subtask].setdefault(id(stream), _Merge(stream))
        merge.entries[entry.name] = entry

    def keep(self, subtask: int, handle: OperatorStateHandle, skip: set[str]) -> None:
        for entry in handle.states:
            if entry.name not in skip:
                self.add(subtask, handle.stream, entry)

    def result(self) -> list[list[OperatorStateHandle]]:
        return [
            [
                OperatorStateHandle(tuple(sorted(m.entries.values(), key=lambda e: e.name)), m.stream)
                for m in merges.values()
            ]
            for merges in self._per_subtask
        ]


def _by_name(
    previous: Sequence[Sequence[OperatorStateHandle]], mode: DistributionMode
) -> dict[str, list[tuple[StreamHandle, OperatorStateEntry]]]:
    grouped: dict[str, list[tuple[StreamHandle, OperatorStateEntry]]] = {}
    for handles in previous:
        for handle in handles:
            for entry in handle.states:
                if entry.mode is mode:
                    grouped.setdefault(entry.name, []).append((handle.stream, entry))
    return dict(sorted(grouped.items()))


def _partly_reported_broadcast(previous: Sequence[Sequence[OperatorStateHandle]]) -> set[str]:
    """Broadcast names that some subtasks reported and others (e.g. finished ones) did not (F5)."""
    reporters: dict[str, int] = {}
    for handles in previous:
        names = {e.name for h in handles for e in h.states if e.mode is DistributionMode.BROADCAST}
        for name in names:
            reporters[name] = reporters.get(name, 0) + 1
    return {name for name, count in reporters.items() if count != len(previous)}


def repartition_operator_state(
    previous: Sequence[Sequence[OperatorStateHandle]], new_parallelism: int
) -> list[list[OperatorStateHandle]]:
    """Operator-state handles per new subtask (``previous`` has one list per old subtask; a finished
    or stateless subtask contributes an empty list).
    """
    if new_parallelism < 1:
        raise ValueError(f"new parallelism must be positive, found {new_parallelism}")
    union = _by_name(previous, DistributionMode.UNION)
    partial_broadcast = _partly_reported_broadcast(previous)
    out = _Assignment(new_parallelism)
    if new_parallelism == len(previous):
        if not union and not partial_broadcast:
            return [list(handles) for handles in previous]
        # Each subtask keeps its own split (and fully reported broadcast) entries.
        for index, handles in enumerate(previous):
            for handle in handles:
                out.keep(index, handle, set(union) | partial_broadcast)
        _union(union, out, new_parallelism)
        broadcast = _by_name(previous, DistributionMode.BROADCAST)
        _broadcast({n: broadcast[n] for n in partial_broadcast}, out, new_parallelism)
        return out.result()
    _split(_by_name(previous, DistributionMode.SPLIT), out, new_parallelism)
    _union(union, out, new_parallelism)
    _broadcast(_by_name(previous, DistributionMode.BROADCAST), out, new_parallelism)
    return out.result()


def _split(
    by_name: dict[str, list[tuple[StreamHandle, OperatorStateEntry]]], out: _Assignment, parallelism: int
) -> None:
    start = 0
    for name, located in by_name.items():
        total = sum(len(entry.offsets) for _, entry in located)
        base, remainder = divmod(total, parallelism)
        next_start = start
        lst, off = 0, 0
        for i in range(parallelism):
            target = (i + start) % parallelism
            count = base
            if remainder > 0:
                count += 1
                remainder -= 1
            elif remainder == 0:
                next_start = target  # out of odd partitions: the next name starts here (balance)
                remainder -= 1
            while count > 0 and lst < len(located):
                stream, entry = located[lst]
                left = len(entry.offsets) - off
                if left > count:
                    taken = entry.offsets[off : off + count]
                    off += count
                else:
                    taken = entry.offsets[off:]
                    off = 0
                    lst += 1
                count -= left
                out.add(target, stream, OperatorStateEntry(name, DistributionMode.SPLIT, taken, entry.serializer))
        start = next_start


def _union(
    by_name: dict[str, list[tuple[StreamHandle, OperatorStateEntry]]], out: _Assignment, parallelism: int
) -> None:
    for index in range(parallelism):
        for located in by_name.values():
            for stream, entry in located:
                out.add(index, stream, entry)


def _broadcast(
    by_name: dict[str, list[tuple[StreamHandle, OperatorStateEntry]]], out: _Assignment, parallelism: int
) -> None:
    for index in range(parallelism):
        for located in by_name.values():
            stream, entry = located[index % len(located)]
            out.add(index, stream, entry)
