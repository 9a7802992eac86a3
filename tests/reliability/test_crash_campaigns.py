"""Crash campaigns with real processes: a checkpointing job is SIGKILLed at random times and at armed
kill points, restarted from its latest completed checkpoint, until it completes (``campaign.py``).

After every kill: every completed checkpoint and savepoint verifies, discovery lists exactly the
complete ones, the restarted job restores the latest of them, and the committed output holds no
duplicate. At the end the two-phase-commit sink's output is exactly the expected one, with running
counts per key of 1, 2, 3, ... Campaigns run on local disk and on moto's S3 server, with kills in the
middle of a ``_metadata`` write and of a multipart upload among them. Checkpoints are incremental
(LMDB, chains of at most 3 deltas): kills also land while retention subsumes (before a subsumed
``_metadata`` is deleted, before the shared-state registry deletes shared files); no shared file a
completed checkpoint references may ever go missing, and at the end storage holds exactly the shared
files the completed checkpoints reference (orphans of killed runs are removed when the next run starts).

Reproduce a run from the seed printed at the start (shown on failure):
``KEYSTATE_CRASH_SEED=<seed> pytest tests/reliability/test_crash_campaigns.py``. The seed fixes the
kill points, hits and delays; where a timed kill lands still depends on the machine's speed.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.reliability.campaign import (
    LOCAL_STORE_POINTS,
    RUNTIME_POINTS,
    S3_POINTS,
    Outcome,
    Plan,
    run_campaign,
)

WORKERS = 5
MIN_RUNS = 52


def plans(seed: int) -> list[Plan]:
    rng = random.Random(seed)

    def s() -> int:
        return rng.randrange(1 << 30)

    s3_points = RUNTIME_POINTS + S3_POINTS + ("store.metadata.mid-write", "store.state.mid-write",
                                              "store.subsume.shared-delete")  # fmt: skip
    return [
        Plan(s(), kills=5, forced=("store.metadata.mid-write", "metadata.commit.after")),
        Plan(s(), kills=5, forced=("metadata.commit.before", "sink.commit.after")),
        Plan(s(), kills=5, forced=("store.sink.mid-commit", "snapshot.async")),
        Plan(s(), kills=5, forced=("store.subsume.metadata-delete", "store.subsume.shared-delete")),
        Plan(s(), kills=5, forced=("store.subsume.shared-delete", "snapshot.async.done")),
        Plan(s(), kills=5, flaky=0.03),
        Plan(s(), kills=5, mode="savepoint", forced=("notify.complete",)),
        Plan(s(), kills=5, mode="savepoint", forced=("store.metadata.mid-write",)),
        Plan(s(), kills=5, mode="savepoint", forced=("task.finish",)),
        Plan(
            s(),
            kills=4,
            s3=True,
            inline=4096,
            points=s3_points,
            forced=("s3.metadata.in-flight", "store.metadata.mid-write", "store.subsume.shared-delete"),
        ),
        Plan(
            s(),
            kills=2,
            s3=True,
            mode="savepoint",
            ballast=6,
            points=s3_points,
            forced=("s3.multipart.in-flight", "s3.multipart.in-flight"),
        ),
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)  # about 50 s on two cores; several child processes at a time
def test_crash_campaigns(tmp_path: Path, moto_endpoint: str, server_bucket: str) -> None:
    seed = int(os.environ.get("KEYSTATE_CRASH_SEED", random.SystemRandom().randrange(2**32)))
    print(f"KEYSTATE_CRASH_SEED={seed}")
    campaign_plans = plans(seed)

    def run(index_plan: tuple[int, Plan]) -> Outcome:
        index, plan = index_plan
        return run_campaign(plan, tmp_path / f"c{index}", endpoint=moto_endpoint, bucket=server_bucket)

    # The S3 ones first: they are the slowest, and the local ones fill in around them.
    order = sorted(enumerate(campaign_plans), key=lambda p: not p[1].s3)
    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(run, order))
        # A child that completes the job early ends its campaign: top up to the runs the suite promises.
        extra = random.Random(seed + 1)
        while sum(o.runs for o in outcomes) < MIN_RUNS:
            more = [(len(campaign_plans) + i, Plan(extra.randrange(1 << 30))) for i in range(2)]
            campaign_plans += [p for _, p in more]
            outcomes += list(pool.map(run, more))
    violations = [v for o in outcomes for v in o.violations]
    runs, kills = sum(o.runs for o in outcomes), sum(o.kills for o in outcomes)
    hit = sum((o.points_hit for o in outcomes), start=type(outcomes[0].points_hit)())
    summary = (
        f"seed {seed}: {len(outcomes)} campaigns, {runs} runs, {kills} kills, points hit {dict(hit)}, "
        f"{sum(o.records for o in outcomes)} records checked, lost {sum(o.lost for o in outcomes)}, "
        f"duplicates {sum(o.duplicates for o in outcomes)}"
    )
    print(summary)
    for o in outcomes:
        print(f"  {o.plan}: {o.seconds:.1f} s, {o.runs} runs, {o.kills} kills, points {dict(o.points_hit)}")
    assert violations == [], f"KEYSTATE_CRASH_SEED={seed}: {summary}\n" + "\n".join(violations)
    assert all(o.completed for o in outcomes)
    assert runs >= MIN_RUNS, summary
    assert kills >= 35, summary
    forced = {p for plan in campaign_plans for p in plan.forced}
    assert forced <= set(hit), f"every forced kill point was reached: missing {sorted(forced - set(hit))}"
    assert set(LOCAL_STORE_POINTS) & set(hit)
