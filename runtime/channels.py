"""Bounded channels between subtasks, and the input gate a task reads them through.

One channel connects one producer subtask to one consumer subtask. Like anyio's memory streams it has
a sender end and a receiver end, each closed on its own: closing the receiver (its task failed) makes
the sender's next ``send`` raise, closing the sender is separate from the in-band
``EndOfData``/``END_OF_PARTITION`` events. Capacity counts items (record batches or events); a full
channel makes ``send`` wait, which is how backpressure travels upstream.

Every channel of a consumer wakes the same ``asyncio.Event``, so a task waits on all its inputs and
its mailbox with a single ``await``, without a future per channel.

:class:`Sender` and :class:`Receiver` are the two ends as a task sees them; the in-process channel here
is one implementation, the Ray executor's credit-based channels between worker processes
(``keystate.runtime.ray``) are another, so the same :class:`~keystate.runtime.task.Task` runs on both.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from keystate.runtime.errors import ChannelClosedError
from keystate.runtime.events import EndOfData, EndOfPartition

__all__ = ["ChannelReceiver", "ChannelSender", "InputGate", "Receiver", "Sender", "open_channel"]


class Sender(Protocol):
    """The producer's end of a channel, as a task's output uses it."""

    @property
    def name(self) -> str: ...

    async def send(self, item: Any) -> None:
        """Append an item (a record batch or an event), waiting while the channel has no room."""

    @property
    def end_of_data_consumed(self) -> bool:
        """Whether the consumer has read this channel's ``EndOfData``."""

    def on_end_of_data_consumed(self, callback: Callable[[], None]) -> None: ...

    def close(self) -> None: ...


class Receiver(Protocol):
    """The consumer's end of a channel, as an input gate reads it."""

    @property
    def name(self) -> str: ...

    def poll(self) -> Any:
        """The next item, or ``None`` if the channel is empty right now."""

    def close(self) -> None: ...


class _Channel:
    __slots__ = (
        "buffer",
        "capacity",
        "eod_consumed",
        "name",
        "on_eod_consumed",
        "receiver_closed",
        "sender_closed",
        "space",
        "wakeup",
    )

    def __init__(self, capacity: int, wakeup: asyncio.Event, name: str) -> None:
        self.buffer: deque[Any] = deque()
        self.capacity = capacity
        self.space = asyncio.Event()
        self.space.set()
        self.wakeup = wakeup
        self.sender_closed = False
        self.receiver_closed = False
        self.eod_consumed = False
        self.on_eod_consumed: Callable[[], None] | None = None
        self.name = name


class ChannelSender:
    """The producer's end of a channel."""

    __slots__ = ("_ch",)

    def __init__(self, channel: _Channel) -> None:
        self._ch = channel

    @property
    def name(self) -> str:
        return self._ch.name

    async def send(self, item: Any) -> None:
        """Append an item, waiting while the channel is full.

        Raises:
            ChannelClosedError: the receiver was closed, or this sender was.
        """
        ch = self._ch
        if ch.sender_closed:
            raise ChannelClosedError(f"channel {ch.name}: send after the sender was closed")
        while len(ch.buffer) >= ch.capacity:
            if ch.receiver_closed:
                break
            ch.space.clear()
            await ch.space.wait()
        if ch.receiver_closed:
            raise ChannelClosedError(f"channel {ch.name}: the consumer is gone")
        ch.buffer.append(item)
        ch.wakeup.set()

    @property
    def end_of_data_consumed(self) -> bool:
        """Whether the consumer has read this channel's ``EndOfData`` (Flink's EndOfData ack)."""
        return self._ch.eod_consumed

    def on_end_of_data_consumed(self, callback: Callable[[], None]) -> None:
        self._ch.on_eod_consumed = callback

    def close(self) -> None:
        self._ch.sender_closed = True
        self._ch.wakeup.set()


class ChannelReceiver:
    """The consumer's end of a channel."""

    __slots__ = ("_ch",)

    def __init__(self, channel: _Channel) -> None:
        self._ch = channel

    @property
    def name(self) -> str:
        return self._ch.name

    def poll(self) -> Any:
        """The next item, or ``None`` if the channel is empty right now."""
        ch = self._ch
        if not ch.buffer:
            return None
        item = ch.buffer.popleft()
        if len(ch.buffer) < ch.capacity and not ch.space.is_set():
            ch.space.set()
        if item.__class__ is EndOfData:
            ch.eod_consumed = True
            if ch.on_eod_consumed is not None:
                ch.on_eod_consumed()
        return item

    def close(self) -> None:
        """Stop receiving: the sender's next ``send`` raises; waiting senders wake up."""
        ch = self._ch
        ch.receiver_closed = True
        ch.buffer.clear()
        ch.space.set()


def open_channel(capacity: int, consumer_wakeup: asyncio.Event, name: str) -> tuple[ChannelSender, ChannelReceiver]:
    """A new channel whose items wake ``consumer_wakeup``."""
    channel = _Channel(capacity, consumer_wakeup, name)
    return ChannelSender(channel), ChannelReceiver(channel)


class InputGate:
    """All input channels of one task, with per-channel blocking for barrier alignment.

    Args:
        receivers: the channels.
        inputs: for each channel, the index of the logical input (edge) it belongs to.
    """

    def __init__(self, receivers: Sequence[Receiver], inputs: list[int]) -> None:
        self.receivers = list(receivers)
        self.inputs = inputs
        self.blocked = [False] * len(receivers)
        self.end_of_partition = [False] * len(receivers)
        self.end_of_data: list[EndOfData | None] = [None] * len(receivers)
        self._next = 0
        self._open = len(receivers)

    @property
    def all_end_of_partition(self) -> bool:
        return self._open == 0

    def poll(self) -> tuple[int, Any] | None:
        """The next item from an unblocked channel (round robin), or ``None`` if none has one."""
        n = len(self.receivers)
        start = self._next
        for step in range(n):
            i = (start + step) % n
            if self.blocked[i] or self.end_of_partition[i]:
                continue
            item = self.receivers[i].poll()
            if item is not None:
                self._next = (i + 1) % n
                if item.__class__ is EndOfPartition:
                    self.end_of_partition[i] = True
                    self._open -= 1
                elif item.__class__ is EndOfData:
                    self.end_of_data[i] = item
                return i, item
        return None

    def live(self, channel: int) -> bool:
        """A channel that may still carry records (no EndOfData or EndOfPartition yet)."""
        return self.end_of_data[channel] is None and not self.end_of_partition[channel]

    def channels_of(self, input_index: int) -> list[int]:
        return [i for i, inp in enumerate(self.inputs) if inp == input_index]

    def unblock_all(self) -> None:
        self.blocked = [False] * len(self.receivers)

    def close(self) -> None:
        for r in self.receivers:
            r.close()
