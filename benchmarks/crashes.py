"""Crash campaigns for nightly runs: many more SIGKILLed job processes than the test suite runs.

Each campaign (``tests/reliability/campaign.py``) runs ``tests/reliability/job_child.py`` again and again
on one checkpoint root: every child restores from the latest completed checkpoint and is SIGKILLed at a
random time or dies at an armed kill point (the runtime's fault points of ``keystate.runtime.faults`` and the
storage points: in the middle of a ``_metadata`` write, of a state file, of the sink's commit, and on S3
with a PUT or an ``UploadPart`` of a multipart upload in flight); the last child runs until the job
completes. After every child every completed checkpoint must verify, discovery must list exactly the
complete ones and the next child must restore the latest; at the end the sink's committed output must
be exactly the expected one, with running counts per key of 1, 2, 3, ...

Campaigns are drawn from a seed (``--seed``, printed) until ``--runs`` child processes ran, a few at a
time (``--workers``). ``--s3`` adds campaigns against a moto S3 server started here. The summary gives
runs, kills (at points and at random times), the kill points hit, records checked, lost and duplicated
records, and every violation with its campaign's seed. Exit status 1 if anything was violated.

``--json`` prints ``{"benchmarks": [...], "summary": {...}}``: the figures are ``lost records`` and
``duplicated records`` (value 0, baseline 0, ratio 1.0 when clean, 0.0 otherwise) and ``child runs per
minute`` (baseline: the runs asked for per minute of the budget of one second per run; ratio = value /
baseline). ``--quick`` runs 40 children (under 60 s).

Run from the repository root: ``python benchmarks/crashes.py --runs 300 [--s3]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from benchmarks._common import Result, figure, moto_endpoint, print_json
from tests.reliability.campaign import LOCAL_STORE_POINTS, RUNTIME_POINTS, S3_POINTS, Outcome, Plan, run_campaign


def plan_for(rng: random.Random, index: int, s3: bool) -> Plan:
    """The campaign templates, in turn: local bounded / savepoint / flaky, and S3 ones with ``--s3``."""
    seed = rng.randrange(1 << 30)
    local = [
        Plan(seed, kills=6),
        Plan(seed, kills=6, mode="savepoint"),
        Plan(seed, kills=6, flaky=0.03),
        Plan(seed, kills=6, forced=(rng.choice(LOCAL_STORE_POINTS), rng.choice(RUNTIME_POINTS))),
    ]
    s3_points = RUNTIME_POINTS + S3_POINTS + ("store.metadata.mid-write", "store.state.mid-write")
    remote = [
        Plan(seed, kills=5, s3=True, inline=4096, points=s3_points, forced=(rng.choice(S3_POINTS),)),
        Plan(seed, kills=3, s3=True, mode="savepoint", ballast=6, points=s3_points, forced=("s3.multipart.in-flight",)),
    ]
    templates = local + remote if s3 else local
    return templates[index % len(templates)]


def campaign_runs(runs: int, workers: int, seed: int, s3: bool, workdir: Path) -> tuple[list[Outcome], float]:
    with ExitStack() as stack:
        endpoint = bucket = None
        if s3:
            import boto3

            endpoint, bucket = stack.enter_context(moto_endpoint()), "keystate-crashes"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        rng = random.Random(seed)
        outcomes: list[Outcome] = []
        started = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            running: list[Future[Outcome]] = []
            index = 0
            while True:
                done = [f for f in running if f.done()]
                for future in done:
                    outcomes.append(future.result())
                    running.remove(future)
                # Expected runs of the campaigns still going: about kills + 1 each.
                planned = sum(o.runs for o in outcomes) + 5 * len(running)
                if planned < runs and len(running) < workers:
                    plan = plan_for(rng, index, s3)
                    path = workdir / f"c{index}"
                    running.append(pool.submit(run_campaign, plan, path, endpoint=endpoint, bucket=bucket))
                    index += 1
                    continue
                if not running:
                    break
                time.sleep(0.05)
        return outcomes, time.monotonic() - started


def summarize(outcomes: list[Outcome], seconds: float, seed: int) -> dict[str, Any]:
    hit: Counter[str] = Counter()
    for o in outcomes:
        hit.update(o.points_hit)
    kills = sum(o.kills for o in outcomes)
    return {
        "seed": seed,
        "campaigns": len(outcomes),
        "runs": sum(o.runs for o in outcomes),
        "kills": kills,
        "kills_at_points": sum(hit.values()),
        "kills_at_random_times": kills - sum(hit.values()),
        "kill_points_hit": dict(sorted(hit.items())),
        "records_checked": sum(o.records for o in outcomes),
        "checkpoints_verified": sum(o.checkpoints_verified for o in outcomes),
        "lost": sum(o.lost for o in outcomes),
        "duplicates": sum(o.duplicates for o in outcomes),
        "completed": sum(o.completed for o in outcomes),
        "violations": [v for o in outcomes for v in o.violations],
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keystate crash campaigns: SIGKILL a checkpointing job, check it all.")
    parser.add_argument("--runs", type=int, default=300, help="child processes to run in all (default 300)")
    parser.add_argument("--s3", action="store_true", help="also run campaigns on a moto S3 server")
    parser.add_argument("--seed", type=int, default=None, help="the campaign seed (default: random, printed)")
    parser.add_argument("--workers", type=int, default=4, help="campaigns at once (default 4)")
    parser.add_argument("--quick", action="store_true", help="40 runs (under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--dir", default=None, help="parent directory for the temp files (default: the temp dir)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    runs = 40 if args.quick else args.runs
    if not args.json:
        print(f"crash campaigns: seed {seed}, {runs} runs, {args.workers} workers{', with S3' if args.s3 else ''}")
    with tempfile.TemporaryDirectory(prefix="keystate-crashes-", dir=args.dir) as tmp:
        outcomes, seconds = campaign_runs(runs, args.workers, seed, args.s3, Path(tmp))
    summary = summarize(outcomes, seconds, seed)
    clean = not summary["violations"]
    if args.json:
        rate = summary["runs"] / seconds * 60 if seconds else 0.0
        exact = 1.0 if clean else 0.0
        figures: list[Result | dict[str, Any]] = [
            figure("lost records", summary["lost"], "records", 0, exact),
            figure("duplicated records", summary["duplicates"], "records", 0, exact),
            Result("child runs per minute", rate, 60.0, "runs/min", decimals=1),
        ]
        print_json(figures, summary=summary)
        return 0 if clean else 1
    print(f"campaigns           {summary['campaigns']} ({summary['completed']} completed)")
    print(f"runs                {summary['runs']}")
    print(f"kills               {summary['kills']} ({summary['kills_at_points']} at kill points, "
          f"{summary['kills_at_random_times']} at random times)")  # fmt: skip
    print(f"kill points hit     {len(summary['kill_points_hit'])}: "
          + ", ".join(f"{k} {v}" for k, v in summary["kill_points_hit"].items()))  # fmt: skip
    print(f"checkpoints verified {summary['checkpoints_verified']}")
    print(f"records checked     {summary['records_checked']}")
    print(f"lost                {summary['lost']}")
    print(f"duplicates          {summary['duplicates']}")
    print(f"violations          {len(summary['violations'])}")
    for violation in summary["violations"]:
        print(f"  {violation}")
    print(f"time                {seconds:.0f} s")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
