"""The fault-point registry (``keystate.runtime.faults``): arming, n-th hit, filters, actions, and every point
is reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, JobStatus, SequenceSource, faults, submit
from tests.runtime.e2e_support import (
    EventLog,
    RecordingFileSink,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    committed,
    job_config,
    run,
)


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    faults.disarm()
    yield
    faults.disarm()


def test_unarmed_points_do_nothing_and_count_nothing() -> None:
    faults.point("metadata.commit.before", checkpoint_id=1)
    assert faults.hits() == {}


def test_arm_acts_on_the_nth_matching_hit_and_times() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    arming = faults.arm(
        "sink.commit.before", faults.call(lambda n, c: seen.append((n, c))), nth=2, times=2, when=lambda c: c["ok"]
    )
    for i in range(6):
        faults.point("sink.commit.before", ok=i != 1, i=i)
    assert [c["i"] for _, c in seen] == [2, 3], "hit 1 is filtered out; act on the 2nd and 3rd matching hits"
    assert arming.fired == 2
    assert [c["i"] for c in arming.contexts] == [2, 3]
    assert faults.hits() == {"sink.commit.before": 6}


def test_default_action_raises_an_injected_fault_naming_the_point() -> None:
    with faults.armed("task.close"), pytest.raises(faults.InjectedFaultError, match=r"task\.close \(uid=a"):
        faults.point("task.close", uid="a", index=0)
    faults.point("task.close", uid="a", index=0)  # disarmed when the block ended


def test_raise_a_given_error_and_disarm() -> None:
    arming = faults.arm("snapshot.sync", faults.raise_(OSError("disk gone")), times=None)
    for _ in range(2):
        with pytest.raises(OSError, match="disk gone"):
            faults.point("snapshot.sync")
    faults.disarm(arming)
    faults.point("snapshot.sync")
    faults.arm("snapshot.sync")
    faults.disarm("snapshot.sync")
    faults.point("snapshot.sync")


def test_unknown_points_and_bad_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm("metadata.comit.before")
    with pytest.raises(ValueError, match="at least 1"):
        faults.arm("task.close", nth=0)


def test_every_point_is_reached_by_a_checkpointing_job(tmp_path: Path) -> None:
    hits: dict[str, list[dict[str, Any]]] = {name: [] for name in faults.POINTS}
    for name in faults.POINTS:
        faults.arm(name, faults.call(lambda n, c: hits[n].append(c)), times=None)
    job = JobGraph("points")
    numbers = job.source(
        SequenceSource(400, splits=2, make=lambda n: [n % 5, n], rate=2000.0), uid="src", parallelism=2
    )
    numbers.key_by(lambda r: r[0]).process(RunningCount(), uid="count", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out"), EventLog()), uid="sink"
    )

    async def scenario() -> JobStatus:
        return (await submit(job, job_config(tmp_path, interval=0.03)).wait()).status

    assert run(scenario()) is JobStatus.FINISHED
    assert {name for name, contexts in hits.items() if not contexts} == set(), "every point was reached"
    assert {c["uid"] for c in hits["snapshot.async"]} == {"src", "count", "sink"}
    assert all(c["uid"] == "sink" for c in hits["sink.commit.before"])
    assert [c["checkpoint_id"] for c in hits["metadata.commit.after"]] == sorted(
        c["checkpoint_id"] for c in hits["metadata.commit.before"]
    )


def test_failure_right_after_a_commit_fails_over_to_that_checkpoint(tmp_path: Path) -> None:
    # As if the coordinator died the moment _metadata was written: nobody was notified, so the sink
    # commits that checkpoint's transactions when the job restores from it.
    arming = faults.arm("metadata.commit.after", nth=2)
    job = JobGraph("after-commit")
    source = SequenceSource(300, splits=2, make=lambda n: [n % 5, n], rate=1500.0)
    counts = job.source(source, uid="src", parallelism=2).key_by(lambda r: r[0])
    counts.process(RunningCount(), uid="count", parallelism=2).sink(
        RecordingFileSink(str(tmp_path / "out"), EventLog()), uid="sink"
    )

    async def scenario() -> tuple[JobStatus, int]:
        client = submit(job, job_config(tmp_path, interval=0.03))
        result = await client.wait()
        return result.status, result.attempts

    status, attempts = run(scenario())
    assert status is JobStatus.FINISHED
    assert attempts == 2, "one failover, then the job finished"
    assert [c["checkpoint_id"] for c in arming.contexts] == [2]
    records = committed(tmp_path / "out")
    assert_exactly([r[:2] for r in records], [[n % 5, n] for n in range(300)])
    assert_counts_continue(records, key=lambda r: r[0])
