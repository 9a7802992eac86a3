"""Failures of real worker processes on Ray (docs/ray.md#failures): the job restarts from the latest
completed checkpoint and its committed output is exactly once; a dead driver leaves its checkpoints
intact and restorable.

Every test here kills a real process: the actor's worker process with SIGKILL (its pid comes from the
operator itself), the actor with ``ray.kill``, or a driver running in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, JobStatus, TransactionalFileSink, submit
from keystate.storage.checkpoints import CompletedCheckpoint
from tests.runtime.e2e_support import (
    Completed,
    CountingSource,
    RunningCount,
    assert_counts_continue,
    assert_exactly,
    committed,
    expected_mixed,
    run,
)
from tests.runtime.ray.conftest import ROOT
from tests.runtime.ray.driver_job import LENGTHS as DRIVER_LENGTHS
from tests.runtime.ray.driver_job import key as driver_key
from tests.runtime.ray.driver_job import long_job
from tests.runtime.ray.support import FileLog, PidRecorder, config_on, recorded_pid, sigkill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # Ray starts worker processes per attempt

LENGTHS = [1200, 1200]
RATE = 300.0
WITHIN = 90.0


def _key(record: list[int]) -> int:
    return record[0] * 100 + record[1] % 5


def _job(tmp_path: Path, readers: FileLog) -> JobGraph:
    """Two paced bounded splits -> a pass-through that records its pid -> a running count -> a 2PC sink."""
    job = JobGraph("kill")
    source = job.source(CountingSource(LENGTHS, readers, rates=[RATE, RATE]), uid="source", parallelism=2)
    passed = source.transform(PidRecorder(tmp_path / "pids"), uid="pass", parallelism=2)
    counts = passed.key_by(_key).process(RunningCount(), uid="counts", parallelism=2)
    counts.sink(TransactionalFileSink(str(tmp_path / "out")), uid="sink", parallelism=1)
    return job


def _killed_mid_job(tmp_path: Path, executor: Any, kill: Callable[[Any, int], None]) -> None:
    """Run :func:`_job`, call ``kill(client, pid of pass[0])`` after two checkpoints, check the recovery."""
    (tmp_path / "pids").mkdir()
    readers = FileLog(tmp_path / "readers.jsonl")
    completed = Completed()

    async def scenario() -> tuple[CompletedCheckpoint, Any]:
        client = submit(_job(tmp_path, readers), config_on(executor, tmp_path, interval=0.1, num_retained=5))
        completed.watch(client)
        await completed.until(lambda c: c.checkpoint_id >= 2, within=WITHIN)
        latest = completed.checkpoints[-1]
        kill(client, recorded_pid(tmp_path / "pids", "pass", 0, 0))
        result = await client.wait()
        return latest, result

    before_kill, result = run(scenario())
    assert result.status is JobStatus.FINISHED, result.error
    assert result.attempts == 2, "the kill failed exactly one attempt"
    # The restarted attempt restored the sources from a checkpoint at least as new as the one seen before
    # the kill: every split reader of attempt 1 starts at a restored position.
    created = readers.events
    assert len(created) == 4, [e.arg for e in created]
    restored_positions = [e.arg for e in created[2:]]
    assert all(p is not None for p in restored_positions), restored_positions
    restored_from = [c for c in completed.checkpoints if c.checkpoint_id >= before_kill.checkpoint_id]
    assert restored_from, "no checkpoint as new as the latest before the kill"
    output = committed(tmp_path / "out")
    assert_exactly([r[:2] for r in output], expected_mixed(LENGTHS))
    assert_counts_continue(output, _key)


def test_sigkill_of_an_actor_process_restarts_from_latest_checkpoint_exactly_once(
    tmp_path: Path, ray_cluster: str
) -> None:
    from keystate.runtime.ray import RayExecutor

    def kill(client: Any, pid: int) -> None:
        assert pid != os.getpid(), "pass[0] must run in a worker process, not in the test's"
        sigkill(pid)

    _killed_mid_job(tmp_path, RayExecutor(), kill)


def test_ray_kill_of_an_actor_restarts_from_latest_checkpoint_exactly_once(tmp_path: Path, ray_cluster: str) -> None:
    import ray

    from keystate.runtime.plan import SubtaskId
    from keystate.runtime.ray import RayExecutor, actor_of

    def kill(client: Any, pid: int) -> None:
        ray.kill(actor_of(client, SubtaskId("counts", 1)))

    _killed_mid_job(tmp_path, RayExecutor(), kill)


def test_driver_death_leaves_checkpoints_intact_and_restorable(tmp_path: Path, ray_cluster: str) -> None:
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, "-m", "tests.runtime.ray.driver_job", ray_cluster, str(checkpoints), str(out)]
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + WITHIN
            while len(list(checkpoints.glob("*/chk-*/_metadata"))) < 2 or not committed(out):
                assert driver.poll() is None, f"the driver exited early: {log.read_text()}"
                assert time.monotonic() < deadline, f"the driver completed no two checkpoints: {log.read_text()}"
                time.sleep(0.05)
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == -signal.SIGKILL
    time.sleep(1.0)  # the dead driver's actors are torn down by Ray; nothing may touch completed checkpoints
    (job_dir,) = [p for p in checkpoints.iterdir() if p.name != "savepoints"]
    completed_dirs = sorted(job_dir.glob("chk-*/_metadata"))
    assert completed_dirs
    # Every completed checkpoint verifies (every handle read, sizes and checksums); the job directory
    # resolves to the latest of them.
    latest_id = max(int(p.parent.name.split("-")[1]) for p in completed_dirs)
    for location in [job_dir, *(p.parent for p in completed_dirs)]:
        verify = subprocess.run(
            [sys.executable, "-m", "keystate.tools.cli", "inspect", str(location), "--verify", "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert verify.returncode == 0, f"{location}: {verify.stdout}\n{verify.stderr}"
        if location == job_dir:
            assert json.loads(verify.stdout)["checkpoint_id"] == latest_id
    before = committed(out)
    assert 0 < len(before) < sum(DRIVER_LENGTHS), "the driver must die mid-job"

    # A new driver (here the test, on the same cluster) restores the latest checkpoint and finishes the job.
    from keystate.runtime.ray import RayExecutor

    async def restore() -> JobStatus:
        config = config_on(RayExecutor(), tmp_path, interval=0.1)
        client = submit(long_job(str(out), rate=None), config, restore_from=str(job_dir))
        return (await client.wait()).status

    assert run(restore()) is JobStatus.FINISHED
    output = committed(out)
    assert_exactly([r[:2] for r in output], expected_mixed(DRIVER_LENGTHS))
    assert_counts_continue(output, driver_key)
