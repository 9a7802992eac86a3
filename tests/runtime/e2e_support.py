"""Shared parts of the runtime end-to-end tests: configs, recording and failing operators, output readers.

Operators are deep-copied once per subtask, so anything a test wants to observe across subtasks lives in
objects that survive ``copy.deepcopy`` (:class:`EventLog`, :class:`Flag`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from keystate.runtime import (
    CheckpointConfig,
    CheckpointFailureReason,
    JobClient,
    JobConfig,
    KeyedProcessFunction,
    Operator,
    OperatorContext,
    RestartStrategy,
    Source,
    SplitReader,
    TransactionalFileSink,
    Watermark,
)
from keystate.runtime.sources import SequenceSource
from keystate.statebackend.serializers import IntSerializer
from keystate.statebackend.state import ValueState, ValueStateDescriptor
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import OperatorStatus

T = TypeVar("T")

BACKENDS = ["lmdb", "heap"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop in asyncio debug mode (every asyncio test does)."""
    return asyncio.run(coro, debug=True)


def job_config(
    tmp_path: Path,
    *,
    interval: float | None = 0.05,
    backend: str = "lmdb",
    restarts: int = 3,
    **checkpoint: Any,
) -> JobConfig:
    """A small, fast job configuration with checkpoints under ``tmp_path / "checkpoints"``."""
    return JobConfig(
        state_backend=backend,
        checkpoint=CheckpointConfig(interval=interval, storage=str(tmp_path / "checkpoints"), **checkpoint),
        restart=RestartStrategy(max_attempts=restarts, delay=0.05),
        channel_capacity=4,
        batch_size=16,
    )


def committed(location: Path) -> list[Any]:
    """Every record a :class:`TransactionalFileSink` committed under ``location`` (staging excluded)."""
    records: list[Any] = []
    for path in sorted(location.glob("*.jsonl")):
        records.extend(json.loads(line) for line in path.read_text().splitlines())
    return records


def staged(location: Path) -> list[Path]:
    """Transactions pre-committed but never committed nor aborted."""
    return sorted((location / "_staging").glob("*.jsonl"))


def assert_exactly(records: list[Any], expected: list[Any]) -> None:
    """``records`` holds every expected record exactly once (order ignored), naming what differs."""
    got, want = Counter(map(_freeze, records)), Counter(map(_freeze, expected))
    duplicates = sorted((r for r, n in got.items() if n > 1), key=repr)[:5]
    missing = sorted(want - got, key=repr)[:5]
    extra = sorted(got - want, key=repr)[:5]
    assert got == want, f"duplicates {duplicates}, missing {missing}, unexpected {extra} (of {len(want)} expected)"


def _freeze(record: Any) -> Any:
    if isinstance(record, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in record.items()))
    if isinstance(record, list):
        return tuple(_freeze(v) for v in record)
    return record


async def wait_for(condition: Callable[[], bool], *, within: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` every few milliseconds until it holds (``AssertionError`` after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.005)


def status_of(checkpoint: CompletedCheckpoint, uid: str) -> OperatorStatus:
    op = checkpoint.metadata.operator(uid)
    assert op is not None, f"{checkpoint} has no operator {uid!r}"
    return op.status


class Completed:
    """Collects the checkpoints a job's coordinator completes (attach with :meth:`watch`)."""

    def __init__(self) -> None:
        self.checkpoints: list[CompletedCheckpoint] = []
        self.failures: list[tuple[int, CheckpointFailureReason, str]] = []

    def watch(self, client: JobClient) -> Completed:
        client.coordinator.listeners.append(self.checkpoints.append)
        client.coordinator.failure_listeners.append(lambda i, reason, msg: self.failures.append((i, reason, msg)))
        return self

    def first(self, predicate: Callable[[CompletedCheckpoint], bool]) -> CompletedCheckpoint | None:
        return next((c for c in self.checkpoints if predicate(c)), None)

    async def until(
        self, predicate: Callable[[CompletedCheckpoint], bool], *, within: float = 10.0
    ) -> CompletedCheckpoint:
        await wait_for(lambda: self.first(predicate) is not None, within=within, what="a matching checkpoint")
        found = self.first(predicate)
        assert found is not None
        return found


# --- objects shared by all subtasks --------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    uid: str
    index: int
    attempt: int
    name: str
    arg: Any = None


class EventLog:
    """An append-only log shared by every subtask (``deepcopy`` returns the same log)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> EventLog:
        return self

    def add(self, event: Event) -> None:
        self.events.append(event)

    def of(self, uid: str, index: int | None = None, *, attempt: int | None = None) -> list[Event]:
        return [
            e
            for e in self.events
            if e.uid == uid and (index is None or e.index == index) and (attempt is None or e.attempt == attempt)
        ]

    def names(self, uid: str, index: int, *, attempt: int | None = None) -> list[str]:
        return [e.name for e in self.of(uid, index, attempt=attempt)]

    def position(self, uid: str, index: int, name: str) -> int:
        """Where in the global order subtask ``uid[index]`` first logged ``name``."""
        for i, e in enumerate(self.events):
            if (e.uid, e.index, e.name) == (uid, index, name):
                return i
        raise AssertionError(f"{uid}[{index}] never logged {name!r}")


class Flag:
    """A mutable value shared by every subtask (``deepcopy`` returns the same object)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> Flag:
        return self


# --- operators -----------------------------------------------------------------------------------------


class Recorder(Operator):
    """Forwards records and logs every lifecycle call (docs/flink-rules.md#j2) into a shared :class:`EventLog`."""

    def __init__(self, log: EventLog, *, forward: bool = True) -> None:
        self.log = log
        self.forward = forward

    def _log(self, name: str, arg: Any = None) -> None:
        ctx = self.ctx
        self.log.add(Event(ctx.uid, ctx.subtask_index, ctx.attempt, name, arg))

    async def initialize_state(self) -> None:
        self._log("initialize_state")

    async def open(self) -> None:
        self._log("open")

    def process(self, record: Any, input_index: int) -> None:
        self._log("process", record)
        if self.forward:
            self.ctx.emit(record)

    def on_watermark(self, watermark: Watermark) -> None:
        self._log("watermark", watermark.timestamp)

    async def end_input(self, input_index: int) -> None:
        self._log("end_input", input_index)

    async def finish(self) -> None:
        self._log("finish")

    async def snapshot_state(self, checkpoint_id: int) -> None:
        self._log("snapshot_state", checkpoint_id)

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        self._log("notify_checkpoint_complete", checkpoint_id)

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        self._log("notify_checkpoint_aborted", checkpoint_id)

    async def close(self) -> None:
        self._log("close")


class RecordingFileSink(TransactionalFileSink):
    """A :class:`TransactionalFileSink` that also logs its lifecycle calls."""

    def __init__(self, location: str, log: EventLog) -> None:
        super().__init__(location)
        self.log = log

    def _log(self, name: str, arg: Any = None) -> None:
        ctx = self.ctx
        self.log.add(Event(ctx.uid, ctx.subtask_index, ctx.attempt, name, arg))

    async def initialize_state(self) -> None:
        self._log("initialize_state")
        await super().initialize_state()

    async def open(self) -> None:
        self._log("open")

    def process(self, record: Any, input_index: int) -> None:
        self._log("process", record)
        super().process(record, input_index)

    def on_watermark(self, watermark: Watermark) -> None:
        self._log("watermark", watermark.timestamp)

    async def end_input(self, input_index: int) -> None:
        self._log("end_input", input_index)

    async def finish(self) -> None:
        self._log("finish")
        await super().finish()

    async def snapshot_state(self, checkpoint_id: int) -> None:
        self._log("snapshot_state", checkpoint_id)
        await super().snapshot_state(checkpoint_id)

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        self._log("notify_checkpoint_complete", checkpoint_id)
        await super().notify_checkpoint_complete(checkpoint_id)

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        self._log("notify_checkpoint_aborted", checkpoint_id)
        await super().notify_checkpoint_aborted(checkpoint_id)

    async def close(self) -> None:
        self._log("close")
        await super().close()


class FailAt(Operator):
    """Forwards records; raises ``RuntimeError`` when the job-wide record count reaches ``at`` (once)."""

    def __init__(self, at: int, *, seen: Flag | None = None, fired: Flag | None = None) -> None:
        self.at = at
        self.seen = seen or Flag()
        self.fired = fired or Flag()

    def process(self, record: Any, input_index: int) -> None:
        self.seen.value += 1
        if not self.fired.value and self.seen.value >= self.at:
            self.fired.value = 1
            raise RuntimeError(f"injected failure at record {self.seen.value}")
        self.ctx.emit(record)


class FailWhen(Operator):
    """Forwards records; raises ``RuntimeError`` on the first record after ``armed`` became non-zero (once)."""

    def __init__(self, armed: Flag, fired: Flag) -> None:
        self.armed = armed
        self.fired = fired

    def process(self, record: Any, input_index: int) -> None:
        if self.armed.value and not self.fired.value:
            self.fired.value = 1
            raise RuntimeError("injected failure")
        self.ctx.emit(record)


# --- sources -------------------------------------------------------------------------------------------


_COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0)


class KeyedCounter(Operator):
    """Counts records of input 0 per key in value state ``count`` (input 1 only keeps the subtask alive),
    logging event ``counted`` with the key; on open logs every ``[key, count]`` it restored, as ``restored``
    (a list, so the event survives a JSON log such as the Ray tests' ``FileLog``)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def _log(self, name: str, arg: Any) -> None:
        self.log.add(Event(self.ctx.uid, self.ctx.subtask_index, self.ctx.attempt, name, arg))

    async def open(self) -> None:
        backend = self.ctx.keyed_backend
        assert backend is not None
        self.count = self.ctx.get_state(_COUNT)
        for key in list(backend.keys("count")):
            backend.set_current_key(key)
            self._log("restored", [key, self.count.value()])
        self._log("open", None)

    def process(self, record: Any, input_index: int) -> None:
        if input_index == 0:
            self.count.update((self.count.value() or 0) + 1)
            self._log("counted", self.ctx.current_key)


class MixedSource(Source):
    """Splits with their own lengths (``None``: unbounded) and rates (records per second, ``None``: no limit;
    by default unbounded splits run at 200/s). Split ``i`` yields ``[first_split + i, n]`` for n = 0, 1, ...
    """

    def __init__(
        self, lengths: Sequence[int | None], *, rates: Sequence[float | None] | None = None, first_split: int = 0
    ) -> None:
        self.lengths = list(lengths)
        self.first_split = first_split
        self.rates = list(rates) if rates is not None else [None if n is not None else 200.0 for n in lengths]
        self.bounded = all(n is not None for n in lengths)

    def splits(self) -> list[str]:
        return [f"split-{i}" for i in range(len(self.lengths))]

    def reader(self, split: str, position: Any | None) -> SplitReader:
        index = int(split.rsplit("-", 1)[1])
        tag = self.first_split + index
        inner = SequenceSource(self.lengths[index], splits=1, make=lambda n: [tag, n], rate=self.rates[index])
        return inner.reader("split-0", position)


class HeldSource(MixedSource):
    """A :class:`MixedSource` whose splits, once read to their end, wait until ``release`` is set to finish.

    Tests that need a bounded job to live through a number of checkpoints hold its end this way: a
    paced source alone catches up after a stall of the event loop (a loaded CI machine), and the job can
    then finish before the checkpoint a test is about.
    """

    def __init__(self, lengths: Sequence[int], release: Flag, **kwargs: Any) -> None:
        super().__init__(lengths, **kwargs)
        self.release = release

    def reader(self, split: str, position: Any | None) -> SplitReader:
        return _HeldReader(super().reader(split, position), self.release)


class _HeldReader(SplitReader):
    def __init__(self, inner: SplitReader, release: Flag) -> None:
        self._inner = inner
        self._release = release

    async def read(self, max_records: int) -> list[Any] | None:
        records = await self._inner.read(max_records)
        if records is None and not self._release.value:
            await asyncio.sleep(0.005)
            return []
        return records

    def position(self) -> Any:
        return self._inner.position()


class EndedSource(MixedSource):
    """A :class:`MixedSource` of unbounded splits that end (at whatever position they reached) once ``end``
    is set: for a test that needs records to keep coming until it saw something, then the source to finish.
    """

    def __init__(self, splits: int, end: Flag, **kwargs: Any) -> None:
        super().__init__([None] * splits, **kwargs)
        self.end = end

    def reader(self, split: str, position: Any | None) -> SplitReader:
        return _EndedReader(super().reader(split, position), self.end)


class _EndedReader(SplitReader):
    def __init__(self, inner: SplitReader, end: Flag) -> None:
        self._inner = inner
        self._end = end

    async def read(self, max_records: int) -> list[Any] | None:
        if self._end.value:
            return None
        return await self._inner.read(max_records)

    def position(self) -> Any:
        return self._inner.position()


def expected_mixed(lengths: Sequence[int], first_split: int = 0) -> list[list[int]]:
    return [[first_split + i, n] for i, length in enumerate(lengths) for n in range(length)]


class CountingSource(MixedSource):
    """A :class:`MixedSource` that counts the split readers it creates, per split, in a shared :class:`EventLog`."""

    def __init__(self, lengths: Sequence[int | None], readers: EventLog, **kwargs: Any) -> None:
        super().__init__(lengths, **kwargs)
        self.readers = readers

    def reader(self, split: str, position: Any | None) -> SplitReader:
        self.readers.add(Event("reader", int(split.rsplit("-", 1)[1]), 0, split, position))
        return super().reader(split, position)


class RunningCount(KeyedProcessFunction):
    """Emits ``[*record, c]`` where ``c`` counts the records of the key so far (keyed value state)."""

    count: ValueState[int]

    def open(self, ctx: OperatorContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0))

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        count = (self.count.value() or 0) + 1
        self.count.update(count)
        ctx.emit([*value, count])


def assert_counts_continue(output: list[list[Any]], key: Callable[[list[Any]], Any]) -> None:
    """Per key, the running counts (last field) are exactly 1, 2, 3, ...: keyed state was never lost or reset."""
    per_key: dict[Any, list[int]] = {}
    for record in output:
        per_key.setdefault(key(record), []).append(record[-1])
    for k, counts in per_key.items():
        assert sorted(counts) == list(range(1, len(counts) + 1)), f"key {k!r}: counts {sorted(counts)[:12]}..."


class Tally(KeyedProcessFunction):
    """Counts records per key in keyed value state ``count`` and forwards each record unchanged."""

    count: ValueState[int]

    def open(self, ctx: OperatorContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0))

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        self.count.update((self.count.value() or 0) + 1)
        ctx.emit(value)


def assert_prefixes(records: list[Any], splits: list[int]) -> dict[int, int]:
    """``records`` (``[split, n]`` pairs) hold, per split, exactly ``0 .. k-1`` once; returns each ``k``."""
    seen: dict[int, list[int]] = {s: [] for s in splits}
    for split, n in records:
        seen[split].append(n)
    lengths = {}
    for split, numbers in seen.items():
        assert sorted(numbers) == list(range(len(numbers))), (
            f"split {split}: not a gap-free, duplicate-free prefix: {len(numbers)} records, "
            f"{len(set(numbers))} distinct, max {max(numbers, default=None)}"
        )
        lengths[split] = len(numbers)
    return lengths
