"""The Ray executor's channels without Ray: credit-based flow control, order, EndOfData acks, failures.

The two ends are wired to each other through plain callables (what the worker binds to actor calls), with
a delivery that hops through the event loop like a remote call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keystate.runtime.errors import ChannelClosedError
from keystate.runtime.events import END_OF_PARTITION, Barrier, CheckpointOptions, EndOfData, StopMode, Watermark
from keystate.runtime.ray._channels import RemoteReceiver, RemoteSender
from tests.runtime.e2e_support import run


class Link:
    """A sender and a receiver joined like two actors: deliveries and credits hop through the loop."""

    def __init__(self, capacity: int, *, delay: float = 0.0) -> None:
        self.wakeup = asyncio.Event()
        self.deliveries: list[int] = []
        self.eod_acks = 0
        self.delay = delay
        self.sender = RemoteSender("a->b", self._deliver, capacity)
        self.receiver = RemoteReceiver("a->b", capacity, self.wakeup, self._grant, self._eod)

    async def _deliver(self, seq: int, items: list[Any]) -> None:
        await asyncio.sleep(self.delay)
        self.deliveries.append(len(items))
        self.receiver.deliver(seq, items)

    def _grant(self, credits: int) -> None:
        asyncio.get_running_loop().call_soon(self.sender.grant, credits)

    def _eod(self) -> None:
        self.eod_acks += 1
        asyncio.get_running_loop().call_soon(self.sender.end_of_data_was_consumed)

    async def receive(self) -> Any:
        while True:
            self.wakeup.clear()
            item = self.receiver.poll()
            if item is not None:
                return item
            await self.wakeup.wait()


def test_items_and_events_arrive_in_order() -> None:
    async def scenario() -> list[Any]:
        link = Link(capacity=4)
        options = CheckpointOptions()
        sent: list[Any] = []
        for n in range(50):
            sent.append([n, n + 1])
            if n % 7 == 0:
                sent.append(Barrier(n, options))
            if n % 11 == 0:
                sent.append(Watermark(n))
        sent += [EndOfData(StopMode.DRAIN), Barrier(99, options), END_OF_PARTITION]

        async def produce() -> None:
            for item in sent:
                await link.sender.send(item)
            await link.sender.flushed()

        producer = asyncio.ensure_future(produce())
        received = [await link.receive() for _ in sent]
        await producer
        assert received == sent
        return received

    assert run(scenario())[-1] is END_OF_PARTITION


def test_a_slow_consumer_stops_the_producer_after_capacity_items() -> None:
    async def scenario() -> None:
        capacity = 3
        link = Link(capacity)
        sent = 0

        async def produce() -> None:
            nonlocal sent
            for n in range(100):
                await link.sender.send([n])
                sent += 1

        producer = asyncio.ensure_future(produce())
        await asyncio.sleep(0.05)
        # Nobody reads: the producer holds no credit after `capacity` items, the receiver holds them all.
        assert sent == capacity
        assert link.receiver.buffered == capacity
        assert link.sender.credits == 0
        # Reading frees credits in bulk (half the capacity, at least one), and the producer goes on.
        for _ in range(10):
            await link.receive()
            await asyncio.sleep(0.01)
            assert link.receiver.buffered <= capacity
        assert capacity + 8 <= sent <= capacity + 10
        for _ in range(100 - 10):
            await link.receive()
        await producer
        assert sent == 100

    run(scenario())


def test_a_burst_is_delivered_in_few_calls() -> None:
    async def scenario() -> None:
        link = Link(capacity=8, delay=0.01)  # each delivery takes a while, like a remote call
        for n in range(8):
            await link.sender.send([n])
        await link.sender.flushed()
        # A few calls under way at once, each carrying everything queued meanwhile.
        assert sum(link.deliveries) == 8
        assert len(link.deliveries) <= 5

    run(scenario())


def test_items_sent_one_by_one_gather_while_a_delivery_is_under_way() -> None:
    async def scenario() -> list[int]:
        link = Link(capacity=8, delay=0.01)
        for n in range(9):
            await link.sender.send([n])
            await asyncio.sleep(0)  # as a source does between batches
            if n == 7:
                for _ in range(8):  # the consumer reads (and grants) what arrived so far
                    await link.receive()
        await link.sender.flushed()
        assert await link.receive() == [8]
        return link.deliveries

    deliveries = run(scenario())
    assert sum(deliveries) == 9
    assert deliveries[0] == 1  # nothing under way: the first item leaves at once
    assert len(deliveries) <= 4  # then they gather (four at a time) instead of one call each


def test_end_of_data_is_acknowledged_when_read() -> None:
    async def scenario() -> None:
        link = Link(capacity=2)
        woke: list[bool] = []
        link.sender.on_end_of_data_consumed(lambda: woke.append(True))
        await link.sender.send(EndOfData(StopMode.DRAIN))
        await link.sender.flushed()
        before = link.sender.end_of_data_consumed
        assert isinstance(await link.receive(), EndOfData)
        await asyncio.sleep(0)
        assert (before, link.sender.end_of_data_consumed, woke) == (False, True, [True])

    run(scenario())


def test_a_failed_delivery_breaks_the_channel() -> None:
    async def scenario() -> None:
        async def gone(seq: int, items: list[Any]) -> None:
            raise ConnectionError("actor died")

        sender = RemoteSender("a->b", gone, 1)
        await sender.send([1])
        await sender.flushed()
        with pytest.raises(ChannelClosedError, match="the consumer is gone"):
            await sender.send([2])

    run(scenario())


def test_a_sender_waiting_for_credits_fails_when_delivery_fails() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def slow_then_gone(seq: int, items: list[Any]) -> None:
            await release.wait()
            raise ConnectionError("actor died")

        sender = RemoteSender("a->b", slow_then_gone, 1)
        await sender.send([1])
        waiting = asyncio.ensure_future(sender.send([2]))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        release.set()
        with pytest.raises(ChannelClosedError):
            await asyncio.wait_for(waiting, 1)

    run(scenario())


def test_the_receiver_puts_deliveries_back_in_order() -> None:
    async def scenario() -> list[Any]:
        receiver = RemoteReceiver("a->b", 4, asyncio.Event(), lambda n: None, lambda: None)
        receiver.deliver(2, [[3], [4]])
        held_back = receiver.poll()
        receiver.deliver(0, [[1], [2]])
        assert held_back is None
        return [receiver.poll() for _ in range(4)]

    assert run(scenario()) == [[1], [2], [3], [4]]


def test_the_receiver_refuses_duplicates_and_overflow() -> None:
    async def scenario() -> None:
        receiver = RemoteReceiver("a->b", 2, asyncio.Event(), lambda n: None, lambda: None)
        receiver.deliver(0, [[1]])
        with pytest.raises(ChannelClosedError, match="item 0 was delivered twice"):
            receiver.deliver(0, [[1]])
        with pytest.raises(ChannelClosedError, match="exceed the capacity 2"):
            receiver.deliver(1, [[2], [3]])

    run(scenario())


def test_send_after_close_raises() -> None:
    async def scenario() -> None:
        link = Link(capacity=2)
        link.sender.close()
        with pytest.raises(ChannelClosedError, match="after the sender was closed"):
            await link.sender.send([1])

    run(scenario())
