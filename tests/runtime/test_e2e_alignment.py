"""End to end: aligned barriers on a two-input operator whose inputs run at very different speeds.

The barrier on the slow input is held back on purpose, so the fast input is blocked (and backpressured)
while the operator aligns. The checkpoint is consistent only if the keyed state holds exactly the records
before the barrier on each input: restoring from it and running to the end must then commit every record
exactly once with gap-free running counts per key.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, JobStatus, KeyedProcessOperator, Operator, submit
from keystate.storage.checkpoints import CompletedCheckpoint
from tests.runtime.e2e_support import (
    BACKENDS,
    Completed,
    EventLog,
    Flag,
    MixedSource,
    RecordingFileSink,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    committed,
    expected_mixed,
    job_config,
    run,
)

FAST = [1200]
SLOW = [300]


class HoldBarrier(Operator):
    """Forwards records; holds every barrier back for ``delay`` seconds (counted in ``held``)."""

    def __init__(self, delay: float, held: Flag) -> None:
        self.delay = delay
        self.held = held

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)

    async def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> None:
        self.held.value += 1
        await asyncio.sleep(self.delay)


def _key(record: list[int]) -> int:
    return record[0] * 100 + record[1] % 5


def _job(out: Path, held: Flag, *, speed: float = 1.0) -> JobGraph:
    """Rates are not state: the resumed run goes ``speed`` times faster, keeping the ratio of the inputs."""
    job = JobGraph("alignment")
    fast = job.source(MixedSource(FAST, rates=[1500.0 * speed]), uid="fast", parallelism=1)
    slow = job.source(MixedSource(SLOW, rates=[300.0 * speed], first_split=10), uid="slow", parallelism=1)
    held_back = slow.transform(HoldBarrier(0.04, held), uid="hold", parallelism=1)
    counts = job.operator(
        KeyedProcessOperator(RunningCount()),
        uid="count",
        inputs=[fast.key_by(_key), held_back.key_by(_key)],
        parallelism=2,
    )
    counts.sink(RecordingFileSink(str(out), EventLog()), uid="sink")
    return job


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_input_alignment_with_a_slow_input_is_consistent(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "out"
    held = Flag()
    completed = Completed()

    async def first_run() -> CompletedCheckpoint:
        client = submit(_job(out, held), job_config(tmp_path, interval=0.03, backend=backend))
        completed.watch(client)
        await completed.until(lambda c: c.checkpoint_id >= 3)
        await client.cancel()
        latest = client.coordinator.latest
        assert latest is not None
        return latest

    checkpoint = run(first_run())
    assert held.value >= 3, "the slow input's barriers were held back"
    first = committed(out)
    assert 0 < len(first) < sum(FAST) + sum(SLOW), "the first run must stop part way"

    async def resume() -> JobStatus:
        client = submit(
            _job(out, Flag(), speed=4.0),
            job_config(tmp_path, interval=0.03, backend=backend),
            restore_from=checkpoint.location,
        )
        return (await client.wait()).status

    assert run(resume()) is JobStatus.FINISHED
    output = committed(out)
    assert_exactly([r[:2] for r in output], expected_mixed(FAST) + expected_mixed(SLOW, first_split=10))
    assert_counts_continue(output, _key)
