"""Sources: bounded or unbounded, split into replayable splits with checkpointed positions.

A :class:`Source` has named splits; a :class:`SplitReader` reads one split from a position and
reports its current position. The :class:`SourceOperator` keeps ``(split, position, done)`` in
split-distributed operator list state, so a restore (even at another parallelism) resumes every
split exactly where the checkpoint saw it, and replayed records are identical.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from keystate.runtime.operators import Operator
from keystate.statebackend.serializers import JsonSerializer
from keystate.statebackend.state import ListStateDescriptor

__all__ = ["GeneratorSource", "SequenceSource", "Source", "SourceOperator", "SplitReader"]


class SplitReader(ABC):
    """Reads one split."""

    @abstractmethod
    async def read(self, max_records: int) -> list[Any] | None:
        """Up to ``max_records`` records (may be empty while waiting), or ``None`` when the split ended."""

    @abstractmethod
    def position(self) -> Any:
        """The position to resume from (JSON-serializable)."""


class Source(ABC):
    """A source of records made of splits."""

    bounded: bool = True

    @abstractmethod
    def splits(self) -> list[str]:
        """The split ids (stable across runs)."""

    @abstractmethod
    def reader(self, split: str, position: Any | None) -> SplitReader:
        """A reader of ``split`` from ``position`` (``None``: the beginning)."""


class _Pacer:
    """Holds a reader to ``rate`` records per second (``None``: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._start = time.monotonic()
        self._emitted = 0

    async def allowance(self, want: int) -> int:
        if self._rate is None:
            return want
        due = (time.monotonic() - self._start) * self._rate - self._emitted
        if due < 1:
            await asyncio.sleep(min(0.05, (1 - due) / self._rate))
            due = (time.monotonic() - self._start) * self._rate - self._emitted
        n = max(0, min(want, int(due)))
        self._emitted += n
        return n


class _SequenceReader(SplitReader):
    def __init__(self, make: Callable[[int], Any], index: int, step: int, end: int | None, rate: float | None):
        self._make = make
        self._next = index
        self._step = step
        self._end = end
        self._pacer = _Pacer(rate)

    async def read(self, max_records: int) -> list[Any] | None:
        if self._end is not None and self._next >= self._end:
            return None
        n = await self._pacer.allowance(max_records)
        out: list[Any] = []
        make, step, end = self._make, self._step, self._end
        for _ in range(n):
            if end is not None and self._next >= end:
                break
            out.append(make(self._next))
            self._next += step
        return out

    def position(self) -> Any:
        return self._next


class SequenceSource(Source):
    """The numbers ``0 .. count-1`` (or forever if ``count`` is ``None``), mapped through ``make``.

    Split ``i`` of ``splits`` holds the numbers ``n`` with ``n % splits == i``; its position is the
    next number. Records are a pure function of the number, so a replay yields identical records.

    Args:
        count: how many numbers (``None``: unbounded).
        splits: how many splits.
        make: number -> record (default: the number itself).
        rate: records per second per split (``None``: as fast as possible).
    """

    def __init__(
        self,
        count: int | None,
        *,
        splits: int = 4,
        make: Callable[[int], Any] | None = None,
        rate: float | None = None,
    ) -> None:
        if splits < 1:
            raise ValueError("a source needs at least one split")
        self.count = count
        self._splits = splits
        self._make: Callable[[int], Any] = make or (lambda n: n)
        self._rate = rate
        self.bounded = count is not None

    def splits(self) -> list[str]:
        return [f"split-{i}" for i in range(self._splits)]

    def reader(self, split: str, position: Any | None) -> SplitReader:
        index = int(split.rsplit("-", 1)[1])
        start = index if position is None else int(position)
        return _SequenceReader(self._make, start, self._splits, self.count, self._rate)


class GeneratorSource(SequenceSource):
    """An unbounded source: ``make(n)`` for n = 0, 1, 2, ... at ``rate`` records per second per split."""

    def __init__(self, make: Callable[[int], Any], *, splits: int = 1, rate: float | None = None) -> None:
        super().__init__(None, splits=splits, make=make, rate=rate)


_SPLITS = ListStateDescriptor[Any](name="source-splits", serializer=JsonSerializer())


class SourceOperator(Operator):
    """Runs a :class:`Source` in a source task: reads its assigned splits round robin."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._readers: list[tuple[str, SplitReader]] = []
        self._done: list[tuple[str, Any]] = []
        self._next = 0

    async def initialize_state(self) -> None:
        ctx = self.ctx
        state = ctx.get_list_state(_SPLITS)
        entries = state.get()
        if not ctx.restored and not entries:
            names = self.source.splits()
            entries = [
                {"split": s, "position": None, "done": False}
                for i, s in enumerate(names)
                if i % ctx.parallelism == ctx.subtask_index
            ]
        for e in entries:
            if e["done"]:
                self._done.append((e["split"], e["position"]))
            else:
                self._readers.append((e["split"], self.source.reader(e["split"], e["position"])))

    @property
    def exhausted(self) -> bool:
        return not self._readers

    async def poll(self, max_records: int) -> list[Any] | None:
        """The next records from one split (round robin); ``None`` once every split has ended."""
        for _ in range(len(self._readers)):
            i = self._next % len(self._readers)
            name, reader = self._readers[i]
            records = await reader.read(max_records)
            if records is None:
                self._done.append((name, reader.position()))
                del self._readers[i]
                if not self._readers:
                    return None
                continue
            self._next = i + 1
            if records:
                return records
        return None if not self._readers else []

    async def snapshot_state(self, checkpoint_id: int) -> None:
        entries = [{"split": n, "position": r.position(), "done": False} for n, r in self._readers]
        entries += [{"split": n, "position": p, "done": True} for n, p in self._done]
        self.ctx.get_list_state(_SPLITS).update(entries)
