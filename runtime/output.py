"""A task's output: routing records to channels by partitioning, batching, and broadcasting events.

Routing is decided once per edge, not per record: an edge to a single channel appends straight to
that channel's buffer, a ``hash`` edge looks the key group up in a table of buffers, round robin
cycles through the buffers' ``append`` methods. ``Output.collect`` is the composition of those
routers (just one ``list.append`` for the common single-target case).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

from keystate.runtime.channels import Sender
from keystate.statebackend.keygroups import KEY_GROUP_DIGEST, assign_key_group
from keystate.statebackend.serializers import KeySerializer, Serializer
from keystate.storage.format.keygroups import operator_index_for_key_group
from keystate.storage.format.topology import Partitioning

__all__ = ["Output", "OutputEdge"]

Router = Callable[[Any], None]


class OutputEdge:
    """One edge from this subtask to the subtasks of one downstream operator.

    Args:
        senders: channel per downstream subtask index this subtask is connected to.
        partitioning: the edge's partitioning.
        producer_index: this subtask's index (round robin starts after it).
        key_selector: for ``hash`` edges.
        key_serializer: for ``hash`` edges (must match the consumer's keyed backend).
        downstream_parallelism: consumer parallelism (``hash``).
        downstream_max_parallelism: consumer max parallelism (``hash``).
    """

    def __init__(
        self,
        senders: Mapping[int, Sender],
        partitioning: Partitioning,
        producer_index: int,
        *,
        key_selector: Callable[[Any], Any] | None = None,
        key_serializer: Serializer[Any] | None = None,
        downstream_parallelism: int = 1,
        downstream_max_parallelism: int = 128,
    ) -> None:
        self.senders = senders
        self.partitioning = partitioning
        self.targets = sorted(senders)
        self.producer_index = producer_index
        self.key_selector = key_selector
        self.key_serializer = key_serializer or KeySerializer()
        self.downstream_parallelism = downstream_parallelism
        self.downstream_max_parallelism = downstream_max_parallelism

    def route(self, record: Any) -> list[int]:
        """The downstream subtask index(es) a record goes to (for inspection and tests)."""
        if self.partitioning is Partitioning.HASH:
            assert self.key_selector is not None
            maxp = self.downstream_max_parallelism
            kg = assign_key_group(self.key_serializer.serialize(self.key_selector(record)), maxp)
            return [operator_index_for_key_group(maxp, self.downstream_parallelism, kg)]
        if self.partitioning is Partitioning.BROADCAST:
            return list(self.targets)
        return [self.targets[0]] if len(self.targets) == 1 else list(self.targets)

    def router(self, buffers: dict[int, list[Any]]) -> Router:
        """A function that appends a record to the buffer(s) of its target channel(s)."""
        appends = {i: buffers[i].append for i in self.targets}
        if self.partitioning is Partitioning.BROADCAST:
            targets = [appends[i] for i in self.targets]

            def broadcast(record: Any) -> None:
                for append in targets:
                    append(record)

            return broadcast
        if self.partitioning is Partitioning.HASH and self.downstream_parallelism > 1:
            assert self.key_selector is not None
            maxp, p = self.downstream_max_parallelism, self.downstream_parallelism
            table = [appends[operator_index_for_key_group(maxp, p, kg)] for kg in range(maxp)]
            select, serialize, digest = self.key_selector, self.key_serializer.serialize, KEY_GROUP_DIGEST

            def by_key(record: Any) -> None:
                table[digest(serialize(select(record))) % maxp](record)  # assign_key_group(), inlined

            return by_key
        if len(self.targets) == 1:
            return appends[self.targets[0]]  # forward, or any edge with a single target: no routing at all
        # rebalance / rescale: round robin, starting after this producer's index (like Flink's
        # RebalancePartitioner starting at a per-producer position).
        order = [appends[i] for i in self.targets]
        start = (self.producer_index + 1) % len(order)
        next_append = itertools.cycle(order[start:] + order[:start]).__next__

        def round_robin(record: Any) -> None:
            next_append()(record)

        return round_robin


class Output:
    """Buffers records per channel and sends them as batches of ``batch_size``."""

    def __init__(self, edges: list[OutputEdge], batch_size: int) -> None:
        self.edges = edges
        self._batch_size = batch_size
        self._channels: list[Sender] = [s for e in edges for s in e.senders.values()]
        self._buffers: list[tuple[Sender, list[Any]]] = []
        routers: list[Router] = []
        for edge in edges:
            buffers: dict[int, list[Any]] = {i: [] for i in edge.targets}
            self._buffers.extend((edge.senders[i], buffers[i]) for i in edge.targets)
            routers.append(edge.router(buffers))
        self.collect: Router
        if not routers:
            self.collect = _discard
        elif len(routers) == 1:
            self.collect = routers[0]
        else:

            def collect_all(record: Any) -> None:
                for route in routers:
                    route(record)

            self.collect = collect_all

    @property
    def channels(self) -> list[Sender]:
        return self._channels

    @property
    def has_pending(self) -> bool:
        return any(buf for _, buf in self._buffers)

    async def flush(self, *, only_full: bool = False) -> None:
        """Send buffered records; with ``only_full``, only channels holding a full batch."""
        size = self._batch_size
        for sender, buf in self._buffers:
            if buf and (not only_full or len(buf) >= size):
                batch = buf[:]  # the routers hold ``buf.append``: keep the same list, send a copy
                buf.clear()
                for start in range(0, len(batch), size):
                    await sender.send(batch[start : start + size] if len(batch) > size else batch)

    async def broadcast(self, event: Any) -> None:
        """Flush every buffer, then send ``event`` on every channel (barriers, EndOfData, ...)."""
        await self.flush()
        for sender in self._channels:
            await sender.send(event)

    def all_end_of_data_consumed(self) -> bool:
        return all(s.end_of_data_consumed for s in self._channels)

    def close(self) -> None:
        for sender in self._channels:
            sender.close()


def _discard(record: Any) -> None:
    """The output of a sink: nobody reads it."""
