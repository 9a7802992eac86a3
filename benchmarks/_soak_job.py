"""The soak's job (``benchmarks/soak.py``): its settings and the demo-style graph, built from the demo's own
keyed functions, counting the records they process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks._common import SharedProbe
from keystate.runtime import GeneratorSource, JobGraph, OperatorContext, SequenceSource, TransactionalFileSink
from keystate.runtime.demo import ClickCounts, OrderTotals

USERS = 20_000
PAGES = 30_000
ORDER_SPLITS = 4
CLICK_SPLITS = 1


@dataclass(frozen=True)
class Settings:
    duration: float
    """Seconds the job runs before the drained stop."""
    sample_every: float
    interval: float
    """Checkpoint interval in seconds."""
    num_retained: int
    order_rate: float
    """Orders per second in all (spread over the splits) while the bounded branch runs."""
    order_seconds: float
    """How long the bounded branch runs: orders = order_rate * order_seconds."""
    click_rate: float
    """Clicks per second (unbounded)."""
    tracemalloc: int = 0
    """Frames per tracemalloc trace from the end of the warm-up on (0: off; a diagnostic, it slows the run)."""

    @property
    def warm_up(self) -> float:
        return min(60.0, self.duration / 3)

    @property
    def window(self) -> float:
        return min(60.0, self.duration / 4)

    @property
    def orders(self) -> int:
        return int(self.order_rate * self.order_seconds)


def make_order(n: int) -> dict[str, Any]:
    return {"order": n, "user": f"user-{n * 7919 % USERS:04d}", "amount": n * 31 % 97 + 1}


def make_click(n: int) -> dict[str, Any]:
    return {"click": n, "page": f"/page/{n * 104729 % PAGES}"}


def user_of(order: dict[str, Any]) -> Any:
    return order["user"]


def page_of(click: dict[str, Any]) -> Any:
    return click["page"]


class Probe(SharedProbe):
    """Records the keyed functions processed."""

    def __init__(self) -> None:
        self.orders = 0
        self.clicks = 0

    @property
    def total(self) -> int:
        return self.orders + self.clicks


class CountedOrderTotals(OrderTotals):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        super().process_element(value, ctx)
        self.probe.orders += 1


class CountedClickCounts(ClickCounts):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def process_element(self, value: Any, ctx: OperatorContext) -> None:
        super().process_element(value, ctx)
        self.probe.clicks += 1


def build_soak_job(settings: Settings, output: str, probe: Probe) -> JobGraph:
    job = JobGraph("keystate-soak")
    orders = job.source(
        SequenceSource(settings.orders, splits=ORDER_SPLITS, make=make_order, rate=settings.order_rate / ORDER_SPLITS),
        uid="orders",
        parallelism=2,
    )
    clicks = job.source(
        GeneratorSource(make_click, splits=CLICK_SPLITS, rate=settings.click_rate / CLICK_SPLITS),
        uid="clicks",
        parallelism=1,
    )
    totals = orders.key_by(user_of).process(CountedOrderTotals(probe), uid="order-totals", parallelism=2)
    counts = clicks.key_by(page_of).process(CountedClickCounts(probe), uid="click-counts", parallelism=2)
    job.operator(
        TransactionalFileSink(output), uid="sink", inputs=[totals.rebalance(), counts.rebalance()], parallelism=1
    )
    return job
