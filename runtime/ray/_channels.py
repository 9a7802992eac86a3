"""Channels between worker processes, with credit-based flow control.

One channel connects one producer subtask to one consumer subtask, as in-process, but its two ends live in
different processes. The producer's :class:`RemoteSender` may have at most ``capacity`` items (record
batches or events) that the consumer has not read yet: each item takes one credit, and the consumer's
:class:`RemoteReceiver` grants credits back as its task reads items. A slow consumer therefore stops its
producers after ``capacity`` items per channel, and the memory a channel holds stays bounded in both
processes, exactly like the in-process channel's capacity (Flink's credit-based network stack works the
same way, with buffers instead of items).

Items travel in order: every delivery carries the sequence number of its first item, and the receiver
puts deliveries back in order before its task sees them (Ray runs one caller's calls to an actor in
order anyway; the numbers make order independent of that). A few deliveries may be under way at once,
each carrying everything queued when it left, so a burst of batches costs few calls and the round trip
of one call does not cap the throughput.

The ends know nothing of Ray: the sender is given a ``deliver`` coroutine function, the receiver a
``grant`` and an ``end_of_data_consumed`` callback; the Ray worker binds them to actor calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from keystate.runtime.errors import ChannelClosedError
from keystate.runtime.events import EndOfData

__all__ = ["RemoteReceiver", "RemoteSender"]

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT = 4
"""Deliveries of one channel under way at once (each carries every item queued when it left)."""

_GATHER = 4
"""Items a channel gathers for its next delivery while another is under way (at most half its capacity)."""

Deliver = Callable[[int, list[Any]], Awaitable[None]]
"""``deliver(first_sequence_number, items)``: hand items to the consumer's process (returns once it has them)."""


class RemoteSender:
    """The producer's end of a channel to another process (the ``channels.Sender`` protocol)."""

    def __init__(self, name: str, deliver: Deliver, capacity: int) -> None:
        self._name = name
        self._deliver = deliver
        self._credits = capacity
        self._capacity = capacity
        self._has_credit = asyncio.Event()
        self._has_credit.set()
        self._queue: list[Any] = []
        self._next_seq = 0
        self._pump: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._slot = asyncio.Event()
        self._idle = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._eod_consumed = False
        self._on_eod_consumed: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def credits(self) -> int:
        return self._credits

    async def send(self, item: Any) -> None:
        """Queue an item for delivery, waiting while the consumer has granted no credit.

        Raises:
            ChannelClosedError: this sender was closed, or a delivery failed (the consumer is gone).
        """
        while True:
            self._raise_if_broken()
            if self._credits > 0:
                break
            self._has_credit.clear()
            await self._has_credit.wait()
        self._credits -= 1
        self._queue.append(item)
        self._idle.clear()
        self._slot.set()
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump(), name=f"channel {self._name}")

    def _raise_if_broken(self) -> None:
        if self._closed:
            raise ChannelClosedError(f"channel {self._name}: send after the sender was closed")
        if self._error is not None:
            raise ChannelClosedError(f"channel {self._name}: the consumer is gone ({self._error})")

    async def _run_pump(self) -> None:
        try:
            while self._queue:
                # With a delivery under way, let a few items gather before the next call: a call costs far
                # more than an item, and the one under way keeps the consumer busy meanwhile.
                while self._error is None and (
                    self._in_flight >= _MAX_IN_FLIGHT
                    or (self._in_flight and len(self._queue) < min(_GATHER, self._capacity // 2))
                ):
                    self._slot.clear()
                    await self._slot.wait()
                if self._error is not None:
                    return
                items, self._queue = self._queue, []
                seq = self._next_seq
                self._next_seq += len(items)
                self._in_flight += 1
                delivery = asyncio.ensure_future(self._deliver(seq, items))
                delivery.add_done_callback(self._delivered)
                await asyncio.sleep(0)  # let more items queue up behind this delivery
        finally:
            self._pump = None
            if self._in_flight == 0:
                self._idle.set()

    def _delivered(self, delivery: asyncio.Future[None]) -> None:
        self._in_flight -= 1
        self._slot.set()
        error = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled():
            error = ChannelClosedError(f"channel {self._name}: a delivery was cancelled")
        if error is not None and self._error is None:
            self._error = error
            self._has_credit.set()  # a waiting send raises now
            log.debug("channel %s: delivery failed: %s", self._name, error)
        if self._in_flight == 0 and self._pump is None:
            self._idle.set()

    def grant(self, credits: int) -> None:
        """The consumer read ``credits`` more items."""
        self._credits += credits
        self._has_credit.set()

    async def flushed(self) -> None:
        """Wait until everything sent so far was delivered (or a delivery failed)."""
        while (self._pump is not None or self._in_flight) and self._error is None:
            self._idle.clear()
            await self._idle.wait()

    @property
    def end_of_data_consumed(self) -> bool:
        return self._eod_consumed

    def end_of_data_was_consumed(self) -> None:
        """The consumer read this channel's ``EndOfData``."""
        self._eod_consumed = True
        if self._on_eod_consumed is not None:
            self._on_eod_consumed()

    def on_end_of_data_consumed(self, callback: Callable[[], None]) -> None:
        self._on_eod_consumed = callback

    def close(self) -> None:
        self._closed = True


class RemoteReceiver:
    """The consumer's end of a channel from another process (the ``channels.Receiver`` protocol).

    Args:
        name: ``producer->consumer``.
        capacity: the producer's initial credits (the most items this end ever holds).
        wakeup: set when items arrive (the consumer task's wakeup).
        grant: returns credits to the producer.
        end_of_data_consumed: tells the producer its ``EndOfData`` was read.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        wakeup: asyncio.Event,
        grant: Callable[[int], None],
        end_of_data_consumed: Callable[[], None],
    ) -> None:
        self._name = name
        self._capacity = capacity
        self._wakeup = wakeup
        self._grant = grant
        self._eod = end_of_data_consumed
        self._buffer: deque[Any] = deque()
        self._expected = 0
        self._early: dict[int, list[Any]] = {}
        self._freed = 0
        self._threshold = max(1, capacity // 2)
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    def deliver(self, seq: int, items: list[Any]) -> None:
        """Items the producer sent, starting at sequence number ``seq`` (deliveries may come out of order).

        Raises:
            ChannelClosedError: a sequence number seen before, or more items than the producer had credits for.
        """
        if self._closed:
            return  # the consumer is going away; nothing it holds matters any more
        if seq < self._expected or seq in self._early:
            raise ChannelClosedError(f"channel {self._name}: item {seq} was delivered twice")
        held = len(self._buffer) + sum(len(v) for v in self._early.values()) + len(items)
        if held > self._capacity:
            raise ChannelClosedError(f"channel {self._name}: {held} items exceed the capacity {self._capacity}")
        self._early[seq] = items
        while self._expected in self._early:
            ready = self._early.pop(self._expected)
            self._expected += len(ready)
            self._buffer.extend(ready)
        if self._buffer:
            self._wakeup.set()

    def poll(self) -> Any:
        """The next item, or ``None`` if none arrived yet."""
        if not self._buffer:
            return None
        item = self._buffer.popleft()
        self._freed += 1
        if self._freed >= self._threshold:
            # Credits go back in bulk. The producer never starves: while fewer than half the capacity
            # are ungranted it still holds more than half of its credits.
            freed, self._freed = self._freed, 0
            self._grant(freed)
        if item.__class__ is EndOfData:
            self._eod()
        return item

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        self._closed = True
        self._buffer.clear()
