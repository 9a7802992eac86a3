"""A task's output: routing records to channels by partitioning, batching, and broadcasting events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import xxhash

from runtime.channels import ChannelSender
from statebackend.serializers import KeySerializer, Serializer
from storage.keygroups import operator_index_for_key_group
from storage.topology import Partitioning

__all__ = ["Output", "OutputEdge"]


class OutputEdge:
    """One edge from this subtask to the subtasks of one downstream operator.

    Args:
        senders: channel per downstream subtask index this subtask is connected to.
        partitioning: the edge's partitioning.
        producer_index: this subtask's index (rebalance starts at it).
        key_selector: for ``hash`` edges.
        key_serializer: for ``hash`` edges (must match the consumer's keyed backend).
        downstream_parallelism: consumer parallelism (``hash``).
        downstream_max_parallelism: consumer max parallelism (``hash``).
    """

    def __init__(
        self,
        senders: dict[int, ChannelSender],
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
        self._rr = producer_index % len(self.targets)
        self._key_selector = key_selector
        self._serialize = (key_serializer or KeySerializer()).serialize
        self._p = downstream_parallelism
        self._maxp = downstream_max_parallelism

    def route(self, record: Any) -> list[int] | int:
        """The downstream subtask index(es) for one record."""
        part = self.partitioning
        if part is Partitioning.HASH:
            assert self._key_selector is not None
            kg = xxhash.xxh3_64_intdigest(self._serialize(self._key_selector(record))) % self._maxp
            return operator_index_for_key_group(self._maxp, self._p, kg)
        if part is Partitioning.BROADCAST:
            return self.targets
        if len(self.targets) == 1:
            return self.targets[0]
        self._rr = (self._rr + 1) % len(self.targets)
        return self.targets[self._rr]


class Output:
    """Buffers records per channel and sends them as batches of ``batch_size``."""

    def __init__(self, edges: list[OutputEdge], batch_size: int) -> None:
        self.edges = edges
        self._batch_size = batch_size
        self._channels: list[ChannelSender] = [s for e in edges for s in e.senders.values()]
        self._buffers: dict[ChannelSender, list[Any]] = {s: [] for s in self._channels}
        self._pending = 0

    @property
    def channels(self) -> list[ChannelSender]:
        return self._channels

    def collect(self, record: Any) -> None:
        for edge in self.edges:
            target = edge.route(record)
            if target.__class__ is int:
                self._buffers[edge.senders[target]].append(record)
                self._pending += 1
            else:
                for t in target:  # type: ignore[union-attr]
                    self._buffers[edge.senders[t]].append(record)
                    self._pending += 1

    @property
    def has_pending(self) -> bool:
        return self._pending > 0

    async def flush(self, *, only_full: bool = False) -> None:
        """Send buffered records; with ``only_full``, only channels holding a full batch."""
        if not self._pending:
            return
        size = self._batch_size
        for sender, buf in self._buffers.items():
            if buf and (not only_full or len(buf) >= size):
                self._buffers[sender] = []
                self._pending -= len(buf)
                for start in range(0, len(buf), size):
                    await sender.send(buf[start : start + size])

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
