"""``RayExecutor`` with Ray already initialised by the user (the session cluster of the conftest is a plain
``ray.init``, as a user's notebook would have): its explicit settings are checked against that session,
not dropped (docs/ray.md#choosing-the-executor), and ``shutdown()`` leaves the user's Ray running.

- ``address``: must name the session's cluster, else ``ClusterConflictError`` before the job starts;
- ``runtime_env``: fixed at ``ray.init``, so one that differs from the session's is ``ClusterConflictError``;
- ``num_cpus``: does not apply to a running session, a WARNING names it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from keystate.runtime import JobConfig, JobGraph, SequenceSource, TransactionalFileSink, run_job
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.executor import ClusterConflictError, ExecutorError
from tests.runtime.ray.conftest import CPUS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _start(executor: Any, tmp_path: Path) -> None:
    run: Any = SimpleNamespace(config=JobConfig(checkpoint=CheckpointConfig(storage=str(tmp_path / "checkpoints"))))
    asyncio.run(executor.start(run))


def test_an_address_of_another_cluster_is_refused_before_the_job_starts(tmp_path: Path, ray_cluster: str) -> None:
    from keystate.runtime.ray import RayExecutor

    port = int(ray_cluster.rpartition(":")[2])
    other = f"127.0.0.1:{port + 1}"
    job = JobGraph("elsewhere")
    job.source(SequenceSource(10), uid="numbers").sink(TransactionalFileSink(str(tmp_path / "out")), uid="sink")
    config = JobConfig(
        checkpoint=CheckpointConfig(interval=0.1, storage=str(tmp_path / "checkpoints")),
        executor=RayExecutor(address=other),
    )
    with pytest.raises(ClusterConflictError) as refused:
        asyncio.run(run_job(job, config))
    message = str(refused.value)
    assert f"RayExecutor(address={other!r})" in message, message
    assert f"connected to the cluster at {ray_cluster!r}" in message, message
    assert "\n" not in message
    assert isinstance(refused.value, ExecutorError)
    assert not (tmp_path / "out").exists(), "nothing ran"
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())

    with pytest.raises(ClusterConflictError, match="connected to the cluster at"):
        _start(RayExecutor(address="ray://127.0.0.1:10001"), tmp_path)  # a direct session, not Ray Client


def test_the_address_of_the_running_cluster_is_accepted_in_any_spelling(tmp_path: Path, ray_cluster: str) -> None:
    from keystate.runtime.ray import RayExecutor

    port = ray_cluster.rpartition(":")[2]
    for address in (ray_cluster, f"127.0.0.1:{port}", f"localhost:{port}", "auto"):
        _start(RayExecutor(address=address), tmp_path)  # no ClusterConflictError


def test_a_runtime_env_that_cannot_be_applied_is_refused(tmp_path: Path, ray_cluster: str) -> None:
    from keystate.runtime.ray import RayExecutor

    with pytest.raises(ClusterConflictError) as refused:
        _start(RayExecutor(runtime_env={"env_vars": {"FLAG": "1"}}), tmp_path)
    message = str(refused.value)
    assert "RayExecutor(runtime_env=...) cannot be applied" in message, message
    assert "ray.init(runtime_env=...)" in message, message
    assert "actor_options={'runtime_env': ...}" in message, message
    _start(RayExecutor(runtime_env={}), tmp_path)  # the session's own (none): nothing to apply


def test_num_cpus_that_do_not_apply_are_named_in_a_warning(
    tmp_path: Path, ray_cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    from keystate.runtime.ray import RayExecutor

    with caplog.at_level(logging.WARNING, logger="keystate.runtime.ray._executor"):
        _start(RayExecutor(num_cpus=CPUS + 5), tmp_path)
        assert [r.getMessage() for r in caplog.records] == [
            f"RayExecutor(num_cpus={CPUS + 5}) does not apply: Ray is already initialised in this process "
            f"(the cluster at {ray_cluster!r}, {CPUS} CPUs), and the job runs there"
        ]
        caplog.clear()
        _start(RayExecutor(num_cpus=CPUS), tmp_path)  # what the session has: nothing to say
        assert caplog.records == []


def test_shutdown_leaves_a_ray_the_user_started_running(tmp_path: Path, ray_cluster: str) -> None:
    import ray

    from keystate.runtime.ray import RayExecutor

    executor = RayExecutor()
    _start(executor, tmp_path)
    executor.shutdown()
    assert ray.is_initialized(), "the user's ray.init session was shut down by the executor"
    RayExecutor().shutdown()  # never started: nothing to do
    assert ray.is_initialized()


def test_num_cpus_with_an_address_is_refused_at_construction() -> None:
    from keystate.runtime.ray import RayExecutor

    with pytest.raises(ValueError, match=r"num_cpus sizes a local cluster the executor starts \(address=None\)"):
        RayExecutor("auto", num_cpus=2)
