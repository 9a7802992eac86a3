"""Building a job graph: sources, operators, sinks and the edges between them.

::

    job = JobGraph("orders")
    orders = job.source(SequenceSource(10_000), uid="orders", parallelism=2)
    totals = orders.key_by(lambda o: o["user"]).process(Totals(), uid="totals", parallelism=2)
    totals.sink(TransactionalFileSink("./out"), uid="sink")
    job.topology()      # the topology file (docs/architecture.md#the-topology-file)

Every operator has an explicit, stable ``uid``: state is matched to operators by uid on restore.
An edge is ``forward`` by default when both sides have the same parallelism, else ``rebalance``;
``key_by`` makes a ``hash`` edge and the consumer a keyed operator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keystate.runtime.errors import JobGraphError
from keystate.runtime.operators import (
    FilterOperator,
    FlatMapOperator,
    KeyedProcessFunction,
    KeyedProcessOperator,
    MapOperator,
    Operator,
)
from keystate.runtime.sources import Source, SourceOperator
from keystate.statebackend.serializers import Serializer
from keystate.storage.errors import TopologyError
from keystate.storage.format.keygroups import default_max_parallelism
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator

__all__ = ["DataStream", "InputSpec", "JobGraph", "KeyedStream", "OperatorSpec"]

KeySelector = Callable[[Any], Any]


@dataclass(frozen=True)
class InputSpec:
    """One input edge of an operator."""

    source: str
    partitioning: Partitioning
    key_selector: KeySelector | None = None


@dataclass
class OperatorSpec:
    """One operator of the graph; ``prototype`` is copied for each subtask."""

    uid: str
    parallelism: int
    prototype: Operator
    inputs: list[InputSpec] = field(default_factory=list)
    max_parallelism: int | None = None
    key_serializer: Serializer[Any] | None = None
    source: Source | None = None

    @property
    def is_source(self) -> bool:
        return self.source is not None

    @property
    def keyed(self) -> bool:
        return any(i.partitioning is Partitioning.HASH for i in self.inputs)

    @property
    def effective_max_parallelism(self) -> int:
        return self.max_parallelism or default_max_parallelism(self.parallelism)

    def create_operator(self) -> Operator:
        """A fresh operator instance for one subtask."""
        return copy.deepcopy(self.prototype)


class JobGraph:
    """A job's operators and edges. See the module docstring."""

    def __init__(self, name: str = "job", *, default_parallelism: int = 1) -> None:
        self.name = name
        self.default_parallelism = default_parallelism
        self.operators: dict[str, OperatorSpec] = {}

    def _add(self, spec: OperatorSpec) -> DataStream:
        if spec.uid in self.operators:
            raise JobGraphError(f"operator uid {spec.uid!r} is used twice; every operator needs a unique uid")
        if not spec.uid:
            raise JobGraphError("an operator uid must not be empty")
        for inp in spec.inputs:
            if inp.source not in self.operators:
                raise JobGraphError(f"operator {spec.uid!r} reads from unknown operator {inp.source!r}")
            if inp.partitioning is Partitioning.HASH and inp.key_selector is None:
                raise JobGraphError(f"operator {spec.uid!r}: a hash input needs a key selector (use key_by)")
        self.operators[spec.uid] = spec
        try:
            self.topology()
        except TopologyError as exc:
            del self.operators[spec.uid]
            raise JobGraphError(str(exc)) from exc
        return DataStream(self, spec.uid)

    def source(self, source: Source, *, uid: str, parallelism: int | None = None) -> DataStream:
        """Add a source operator."""
        p = parallelism or self.default_parallelism
        return self._add(OperatorSpec(uid, p, SourceOperator(source), source=source))

    def operator(
        self,
        operator: Operator,
        *,
        uid: str,
        inputs: Iterable[DataStream],
        parallelism: int | None = None,
        max_parallelism: int | None = None,
        key_serializer: Serializer[Any] | None = None,
    ) -> DataStream:
        """Add an operator with any number of inputs (each a stream with its partitioning)."""
        p = parallelism or self.default_parallelism
        specs = [s.input_spec(p) for s in inputs]
        if not specs:
            raise JobGraphError(f"operator {uid!r} has no inputs; use source() for sources")
        return self._add(OperatorSpec(uid, p, operator, specs, max_parallelism, key_serializer))

    def topology(self) -> Topology:
        """The topology (as in the topology file, docs/format.md section 7), validated: no cycles, forward edges of
        equal parallelism."""
        return Topology(
            tuple(
                TopologyOperator(
                    s.uid,
                    s.parallelism,
                    s.max_parallelism,
                    tuple(InputEdge(i.source, i.partitioning) for i in s.inputs),
                )
                for s in self.operators.values()
            )
        )


class DataStream:
    """The output of an operator, with the partitioning the next operator will read it with."""

    def __init__(
        self,
        graph: JobGraph,
        uid: str,
        partitioning: Partitioning | None = None,
        key_selector: KeySelector | None = None,
    ) -> None:
        self.graph = graph
        self.uid = uid
        self.partitioning = partitioning
        self.key_selector = key_selector

    def input_spec(self, consumer_parallelism: int) -> InputSpec:
        partitioning = self.partitioning
        if partitioning is None:
            same = self.graph.operators[self.uid].parallelism == consumer_parallelism
            partitioning = Partitioning.FORWARD if same else Partitioning.REBALANCE
        return InputSpec(self.uid, partitioning, self.key_selector)

    def _with(self, partitioning: Partitioning) -> DataStream:
        return DataStream(self.graph, self.uid, partitioning)

    def forward(self) -> DataStream:
        return self._with(Partitioning.FORWARD)

    def rescale(self) -> DataStream:
        return self._with(Partitioning.RESCALE)

    def rebalance(self) -> DataStream:
        return self._with(Partitioning.REBALANCE)

    def broadcast(self) -> DataStream:
        return self._with(Partitioning.BROADCAST)

    def key_by(self, key_selector: KeySelector) -> KeyedStream:
        """Partition by key: the next operator is keyed and can use keyed state."""
        return KeyedStream(self.graph, self.uid, Partitioning.HASH, key_selector)

    def transform(
        self, operator: Operator, *, uid: str, parallelism: int | None = None, max_parallelism: int | None = None
    ) -> DataStream:
        return self.graph.operator(
            operator, uid=uid, inputs=[self], parallelism=parallelism, max_parallelism=max_parallelism
        )

    def map(self, fn: Callable[[Any], Any], *, uid: str, parallelism: int | None = None) -> DataStream:
        return self.transform(MapOperator(fn), uid=uid, parallelism=parallelism)

    def flat_map(self, fn: Callable[[Any], Iterable[Any]], *, uid: str, parallelism: int | None = None) -> DataStream:
        return self.transform(FlatMapOperator(fn), uid=uid, parallelism=parallelism)

    def filter(self, fn: Callable[[Any], bool], *, uid: str, parallelism: int | None = None) -> DataStream:
        return self.transform(FilterOperator(fn), uid=uid, parallelism=parallelism)

    def sink(self, sink: Operator, *, uid: str, parallelism: int | None = None) -> DataStream:
        """Add a sink (an operator whose output nobody reads)."""
        return self.transform(sink, uid=uid, parallelism=parallelism)


class KeyedStream(DataStream):
    """A stream partitioned by key."""

    def process(
        self,
        function: KeyedProcessFunction | Operator,
        *,
        uid: str,
        parallelism: int | None = None,
        max_parallelism: int | None = None,
        key_serializer: Serializer[Any] | None = None,
    ) -> DataStream:
        operator = function if isinstance(function, Operator) else KeyedProcessOperator(function)
        return self.graph.operator(
            operator,
            uid=uid,
            inputs=[self],
            parallelism=parallelism,
            max_parallelism=max_parallelism,
            key_serializer=key_serializer,
        )
