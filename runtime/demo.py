"""The demo job (docs/architecture.md#the-demo-job): a bounded and an unbounded source, keyed state, a 2PC sink.

::

    orders (bounded, p=2) --hash--> order-totals (keyed, p=2) --\\
                                                                  +--> sink (2PC files, p=1)
    clicks (unbounded, p=1) --hash--> click-counts (keyed, p=2) --/

It checkpoints every 300 ms. The orders branch ends after a few seconds and is recorded as finished
in every later checkpoint while the clicks branch goes on; the run ends with stop-with-savepoint
--drain (after ``duration`` seconds or on Ctrl-C). Everything goes under one location: checkpoints in
``<location>/<job_id>/``, the savepoint in ``<location>/savepoints/``, committed output in
``<location>/output/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keystate.runtime.config import CheckpointConfig, JobConfig
from keystate.runtime.execution import submit
from keystate.runtime.graph import JobGraph
from keystate.runtime.operators import KeyedProcessFunction, OperatorContext
from keystate.runtime.sinks import TransactionalFileSink
from keystate.runtime.sources import GeneratorSource, SequenceSource
from keystate.statebackend.serializers import IntSerializer
from keystate.statebackend.state import ValueState, ValueStateDescriptor
from keystate.storage.base import ObjectStore, join_key
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import OperatorStatus
from keystate.storage.uri import open_storage

if TYPE_CHECKING:
    from keystate.runtime.executor import Executor

__all__ = ["build_demo_job", "run_demo"]

USERS = 50
PAGES = 20


def _order(n: int) -> dict[str, Any]:
    return {"order": n, "user": f"user-{n * 7919 % USERS:02d}", "amount": n * 31 % 97 + 1}


def _click(n: int) -> dict[str, Any]:
    return {"click": n, "page": f"/page/{n * 104729 % PAGES}"}


class OrderTotals(KeyedProcessFunction):
    """Running order total per user (keyed value state, readable with ``keystate dump``)."""

    total: ValueState[int]

    def open(self, ctx: OperatorContext) -> None:
        self.total = ctx.get_state(ValueStateDescriptor[int](name="total", serializer=IntSerializer(), default=0))

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        total = (self.total.value() or 0) + value["amount"]
        self.total.update(total)
        ctx.emit({"user": value["user"], "total": total, "order": value["order"]})


class ClickCounts(KeyedProcessFunction):
    """Clicks per page."""

    count: ValueState[int]

    def open(self, ctx: OperatorContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0))

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        count = (self.count.value() or 0) + 1
        self.count.update(count)
        ctx.emit({"page": value["page"], "clicks": count})


def build_demo_job(
    output: str, *, orders: int = 12_000, order_rate: float = 1_500.0, click_rate: float = 400.0
) -> JobGraph:
    """The demo job graph; committed output goes to ``output``."""
    job = JobGraph("keystate-demo")
    order_stream = job.source(
        SequenceSource(orders, splits=4, make=_order, rate=order_rate), uid="orders", parallelism=2
    )
    click_stream = job.source(GeneratorSource(_click, splits=1, rate=click_rate), uid="clicks", parallelism=1)
    totals = order_stream.key_by(lambda o: o["user"]).process(OrderTotals(), uid="order-totals", parallelism=2)
    counts = click_stream.key_by(lambda c: c["page"]).process(ClickCounts(), uid="click-counts", parallelism=2)
    job.operator(
        TransactionalFileSink(output), uid="sink", inputs=[totals.rebalance(), counts.rebalance()], parallelism=1
    )
    return job


def _describe(checkpoint: CompletedCheckpoint) -> str:
    parts = []
    for op in checkpoint.metadata.operators:
        if op.status is OperatorStatus.FULLY_FINISHED:
            parts.append(f"{op.uid}: finished")
        elif op.status is OperatorStatus.PARTIALLY_FINISHED:
            parts.append(f"{op.uid}: finished {op.finished_subtasks}")
    metadata = checkpoint.metadata
    written, full = metadata.incremental_state_bytes, metadata.full_state_bytes
    took = f" in {metadata.statistics.duration_ms} ms" if metadata.statistics is not None else ""
    finished = "; ".join(parts) if parts else "all running"
    return (
        f"{checkpoint.kind} {checkpoint.checkpoint_id} complete{took}, wrote {written:,} of "
        f"{_count(full, 'state byte')}{' (incremental)' if metadata.is_incremental else ''}, {finished}"
    )


def _count(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless ``n`` is 1 (as ``keystate.tools.render.plural``, which is above)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _committed(store: ObjectStore, prefix: str) -> tuple[int, int]:
    """Committed output objects (staging excluded) and the records (lines) in them."""
    files = records = 0
    for info in store.list_objects(prefix):
        if "/_staging/" not in info.key and info.key.endswith(".jsonl"):
            files += 1
            records += store.get(info.key).count(b"\n")
    return files, records


async def run_demo(
    location: str,
    *,
    duration: float | None,
    out: Callable[[str], None] = print,
    interval: float = 0.3,
    executor: Executor | None = None,
) -> CompletedCheckpoint:
    """Run the demo until ``duration`` seconds passed (``None``: until Ctrl-C), then stop it with a
    drained savepoint. Returns the savepoint.

    Checkpoints are incremental (LMDB keyed state: each writes only the keys changed since the last
    one, under ``<job_id>/shared/``); the savepoint is full and self-contained.

    Args:
        executor: where the tasks run (``None``: in this process; ``keystate.runtime.ray.RayExecutor``: on Ray).
    """
    storage = open_storage(location)
    output = f"{storage.location.rstrip('/')}/output"
    checkpoints = CheckpointConfig(interval=interval, storage=location, num_retained=2, incremental=True)
    config = JobConfig(checkpoint=checkpoints, executor=executor)
    client = submit(build_demo_job(output), config)
    out(f"keystate demo: job {client.job_id}")
    out(f"  checkpoints every {interval * 1000:.0f} ms to {storage.location}/{client.job_id}/")
    out(f"  output (committed by a two-phase-commit sink) in {output}/")
    out("  press Ctrl-C to stop with a savepoint" if duration is None else f"  running for {duration:g} s")
    client.coordinator.listeners.append(lambda c: out(f"  {_describe(c)}"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or no signals
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        waiter = asyncio.ensure_future(client.wait())
        stopper = asyncio.ensure_future(stop.wait())
        # The duration counts from deployment: on Ray, starting the cluster and the actors takes seconds.
        deployed = asyncio.ensure_future(client.wait_deployed())
        await asyncio.wait({deployed, stopper}, return_when=asyncio.FIRST_COMPLETED)
        deployed.cancel()
        started = time.monotonic()
        if not stopper.done():
            await asyncio.wait({waiter, stopper}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if waiter.done():
            result = waiter.result()
            raise RuntimeError(f"the demo job ended on its own ({result.status}): {result.error}")
        out(f"stopping with a drained savepoint after {time.monotonic() - started:.1f} s ...")
        savepoint = await client.stop_with_savepoint(drain=True)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    files, records = await asyncio.to_thread(_committed, storage.store, join_key(storage.base, "output"))
    out(f"committed output: {_count(records, 'record')} in {_count(files, 'file')} under {output}/")
    out(f"savepoint: {savepoint.location}")
    out(f"inspect it:  keystate inspect {savepoint.location}")
    out(f"list all:    keystate list {storage.location}")
    return savepoint
