"""Ray with checkpoint storage on S3 (moto's threaded server: real HTTP), and ``keystate demo --executor ray``.

On S3 every worker writes its own state files straight to the bucket and the driver commits ``_metadata``
(docs/ray.md#running-on-an-existing-cluster); a savepoint taken on Ray restores on the embedded executor, and the
job continues exactly where it stopped. The demo runs as a user runs it: the console command, in a fresh
process that starts a local Ray cluster of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from keystate.runtime import JobConfig, JobGraph, JobStatus, TransactionalFileSink, load_checkpoint, submit
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import CheckpointKind, OperatorStatus
from tests.runtime.e2e_support import (
    Completed,
    MixedSource,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    expected_mixed,
    run,
    wait_for,
)
from tests.runtime.ray.conftest import ROOT
from tests.runtime.ray.support import config_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # Ray starts worker processes per attempt

LENGTHS = [800, 800]
WITHIN = 90.0


def _key(record: list[int]) -> int:
    return record[1] % 5


def _job(out: str, endpoint: str, rate: float | None) -> JobGraph:
    job = JobGraph("on-s3")
    source = job.source(MixedSource(LENGTHS, rates=[rate, rate]), uid="source", parallelism=2)
    counts = source.key_by(_key).process(RunningCount(), uid="counts", parallelism=2)
    counts.sink(TransactionalFileSink(out, endpoint_url=endpoint), uid="sink", parallelism=1)
    return job


def _committed_s3(client: Any, bucket: str, prefix: str) -> list[Any]:
    records: list[Any] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith(".jsonl") and "/_staging/" not in key:
                body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
                records.extend(json.loads(line) for line in body.splitlines())
    return records


def test_workers_write_state_to_s3_and_a_ray_savepoint_restores_in_process(
    tmp_path: Path, ray_cluster: str, moto_endpoint: str, server_bucket: str
) -> None:
    from keystate.runtime.ray import RayExecutor

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    root, out = f"s3://{server_bucket}/ckpt", f"s3://{server_bucket}/out"
    completed = Completed()

    def config(executor: Any) -> JobConfig:
        base = config_on(executor, tmp_path, interval=0.1)
        return replace(base, checkpoint=replace(base.checkpoint, storage=root, endpoint_url=moto_endpoint))

    async def on_ray() -> CompletedCheckpoint:
        client = submit(_job(out, moto_endpoint, rate=300.0), config(RayExecutor()))
        completed.watch(client)
        await completed.until(lambda c: c.checkpoint_id >= 3, within=WITHIN)
        await wait_for(lambda: bool(_committed_s3(s3, server_bucket, "out/")), within=WITHIN, what="output")
        savepoint = await client.stop_with_savepoint(drain=False)
        assert (await client.wait()).status is JobStatus.FINISHED
        return savepoint

    savepoint = run(on_ray())
    assert savepoint.location.startswith(f"s3://{server_bucket}/ckpt/savepoints/")
    loaded = load_checkpoint(savepoint.location, endpoint_url=moto_endpoint)
    assert loaded.kind is CheckpointKind.SAVEPOINT
    counts = loaded.metadata.operator("counts")
    assert counts is not None
    assert counts.has_keyed_state
    assert {s.index for s in counts.subtasks} == {0, 1}, "both workers wrote their key-group ranges"
    for checkpoint in completed.checkpoints:
        assert checkpoint.location.startswith(f"s3://{server_bucket}/ckpt/")
    stopped_at = _committed_s3(s3, server_bucket, "out/")
    assert 0 < len(stopped_at) < sum(LENGTHS)

    async def in_process() -> JobStatus:
        client = submit(_job(out, moto_endpoint, rate=None), config(None), restore_from=savepoint.location)
        return (await client.wait()).status

    assert run(in_process()) is JobStatus.FINISHED
    output = _committed_s3(s3, server_bucket, "out/")
    assert_exactly([r[:2] for r in output], expected_mixed(LENGTHS))
    assert_counts_continue(output, _key)


def test_keystate_demo_executor_ray_end_to_end(tmp_path: Path) -> None:
    location = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "keystate.tools.cli", "demo", "--executor", "ray", "--duration", "20"]
    done = subprocess.run(
        [*argv, "--checkpoints", str(location)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert any("orders: finished" in line for line in lines), "the bounded branch finished while checkpoints go on"
    (savepoint_line,) = [line for line in lines if line.startswith("savepoint: ")]
    savepoint = load_checkpoint(savepoint_line.removeprefix("savepoint: "))
    assert savepoint.metadata.properties.drain
    assert Path(savepoint.location).parent == location / "savepoints"
    for uid in ("orders", "order-totals"):
        op = savepoint.metadata.operator(uid)
        assert op is not None
        assert op.status is OperatorStatus.FULLY_FINISHED, uid
    output = location / "output"
    records = [line for path in sorted(output.glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert not list((output / "_staging").glob("*.jsonl")), "everything staged was committed"
    assert len(records) == len(set(records)), "a committed record appears twice"
    orders = [json.loads(r) for r in records if '"user"' in r]
    assert sorted(o["order"] for o in orders) == list(range(12_000)), "every order committed exactly once"
    per_page: dict[str, list[int]] = defaultdict(list)
    for click in (json.loads(r) for r in records if '"page"' in r):
        per_page[click["page"]].append(click["clicks"])
    assert per_page, "the unbounded branch produced committed output"
    for page, counts in per_page.items():
        assert sorted(counts) == list(range(1, len(counts) + 1)), f"{page}: click counts not 1..n"
