"""Operators: the user logic a task runs, with Flink's lifecycle (rules J1, J2 of docs/flink-rules.md).

Order per subtask: ``setup`` -> ``initialize_state`` -> ``open`` -> ``process`` ... ->
``end_input`` (drain only) -> ``finish`` (drain only) -> ``snapshot_state`` for the final checkpoint
-> ``notify_checkpoint_complete`` -> ``close``. ``close`` always runs (also on failure and cancel);
``finish`` may emit records, ``close`` must not. ``process`` is synchronous (it runs per record); the
lifecycle hooks are coroutines so an operator can do blocking I/O with ``asyncio.to_thread``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from keystate.runtime.errors import JobError
from keystate.runtime.events import Watermark
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.statebackend.state import (
    AggregatingState,
    AggregatingStateDescriptor,
    KeyedStateBackend,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    State,
    StateDescriptor,
    ValueState,
    ValueStateDescriptor,
)

__all__ = [
    "FilterOperator",
    "FlatMapOperator",
    "KeyedProcessFunction",
    "KeyedProcessOperator",
    "MapOperator",
    "Operator",
    "OperatorContext",
]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
IN = TypeVar("IN")
ACC = TypeVar("ACC")
OUT = TypeVar("OUT")


class OperatorContext:
    """What an operator sees of its subtask: identity, state, and its output."""

    def __init__(
        self,
        *,
        uid: str,
        subtask_index: int,
        parallelism: int,
        max_parallelism: int,
        attempt: int,
        keyed_backend: KeyedStateBackend | None,
        operator_backend: OperatorStateBackend,
        emit: Callable[[Any], None],
        restored: bool,
        checkpointing: bool = True,
    ) -> None:
        self.uid = uid
        self.subtask_index = subtask_index
        self.parallelism = parallelism
        self.max_parallelism = max_parallelism
        self.attempt = attempt
        self.keyed_backend = keyed_backend
        self.operator_backend = operator_backend
        self.emit = emit
        """Send a record downstream (to every output edge)."""
        self.restored = restored
        """Whether this subtask started from a checkpoint or savepoint."""
        self.checkpointing = checkpointing
        """Whether the job takes checkpoints; if not, no checkpoint follows ``finish()`` (nothing to commit on)."""

    @property
    def name(self) -> str:
        return f"{self.uid}[{self.subtask_index}]"

    @property
    def current_key(self) -> Any:
        return self._keyed().current_key

    def _keyed(self) -> KeyedStateBackend:
        if self.keyed_backend is None:
            raise JobError(f"operator {self.name} is not keyed: keyed state needs a key_by() (hash) input")
        return self.keyed_backend

    @overload
    def get_state(self, descriptor: ValueStateDescriptor[T]) -> ValueState[T]: ...
    @overload
    def get_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]: ...
    @overload
    def get_state(self, descriptor: MapStateDescriptor[K, V]) -> MapState[K, V]: ...
    @overload
    def get_state(self, descriptor: ReducingStateDescriptor[T]) -> ReducingState[T]: ...
    @overload
    def get_state(self, descriptor: AggregatingStateDescriptor[IN, ACC, OUT]) -> AggregatingState[IN, OUT]: ...

    def get_state(self, descriptor: StateDescriptor[Any]) -> State:
        """Keyed state, scoped to the key of the record being processed."""
        return self._keyed().get_state(descriptor)  # type: ignore[call-overload, no-any-return]

    def get_list_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]:
        """Operator list state, split among subtasks on rescale."""
        return self.operator_backend.get_list_state(descriptor)

    def get_union_list_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]:
        """Operator list state every subtask receives whole on restore."""
        return self.operator_backend.get_union_list_state(descriptor)

    def get_broadcast_list_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]:
        return self.operator_backend.get_broadcast_list_state(descriptor)


class Operator:
    """Base class of every operator; override what you need. One instance runs per subtask."""

    ctx: OperatorContext

    def setup(self, ctx: OperatorContext) -> None:
        self.ctx = ctx

    async def initialize_state(self) -> None:
        """Register or read state (the backends are restored already)."""

    async def open(self) -> None:
        """Prepare for processing."""

    def process(self, record: Any, input_index: int) -> None:
        """Handle one record of input ``input_index``; emit with ``self.ctx.emit``."""
        raise NotImplementedError(f"{type(self).__name__} does not process records")

    def on_watermark(self, watermark: Watermark) -> None:
        """Event time advanced on all inputs (keystate only emits MAX_WATERMARK, on drain)."""

    async def end_input(self, input_index: int) -> None:
        """Input ``input_index`` ended (drain only)."""

    async def finish(self) -> None:
        """The end of the operator's data (drain only): flush; may emit."""

    async def close(self) -> None:
        """Release resources; always called; must not emit."""

    async def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> None:
        """Just before the barrier goes downstream; may emit (e.g. pre-committed work)."""

    async def snapshot_state(self, checkpoint_id: int) -> None:
        """Put everything the checkpoint must hold into state (the synchronous part)."""

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed; it subsumes every earlier one (commit up to it)."""

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` was aborted (its data is covered by the next success)."""


class MapOperator(Operator):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self._fn = fn

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(self._fn(record))


class FlatMapOperator(Operator):
    def __init__(self, fn: Callable[[Any], Iterable[Any]]) -> None:
        self._fn = fn

    def process(self, record: Any, input_index: int) -> None:
        emit = self.ctx.emit
        for out in self._fn(record):
            emit(out)


class FilterOperator(Operator):
    def __init__(self, fn: Callable[[Any], bool]) -> None:
        self._fn = fn

    def process(self, record: Any, input_index: int) -> None:
        if self._fn(record):
            self.ctx.emit(record)


class KeyedProcessFunction(ABC):
    """Per-record logic with keyed state, run by :class:`KeyedProcessOperator`."""

    def open(self, ctx: OperatorContext) -> None:  # noqa: B027 - optional hook
        """Create state objects here (``ctx.get_state``)."""

    @abstractmethod
    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        """Handle one record; the state is scoped to its key; emit with ``ctx.emit``."""

    def finish(self, ctx: OperatorContext) -> None:  # noqa: B027 - optional hook
        """End of data (drain only); may emit."""


class KeyedProcessOperator(Operator):
    def __init__(self, function: KeyedProcessFunction) -> None:
        self.function = function

    async def open(self) -> None:
        self.function.open(self.ctx)

    def process(self, record: Any, input_index: int) -> None:
        self.function.process_element(record, self.ctx)

    async def finish(self) -> None:
        self.function.finish(self.ctx)
