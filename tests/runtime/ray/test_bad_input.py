"""Bad input and bad environments for the Ray executor (docs/ray.md#limits): each fails before the job
starts, with one clear message, and nothing is lost.

- Ray not installed: simulated in a subprocess whose ``sitecustomize`` puts an import blocker for ``ray``
  first on ``sys.meta_path`` (Python then behaves exactly as without the package), both for
  ``RayExecutor`` and for ``keystate demo --executor ray`` (one line on stderr, exit 2);
- an unreachable cluster address fails within the configured ``connect_timeout``;
- a local checkpoint path on a cluster of several nodes is refused, pointing to S3: a real two-node
  cluster (``ray.cluster_utils.Cluster``: two raylets on this machine) in a subprocess;
- an operator, source, sink, key selector, store wrapper or state backend that cannot be shipped to a worker
  process is named at ``submit``, before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import JobGraph, Operator, SequenceSource, TransactionalFileSink, submit
from keystate.runtime.config import CheckpointConfig
from keystate.runtime.executor import NotShippableError
from keystate.statebackend.backends import HeapStateBackend
from tests.runtime.e2e_support import RunningCount, run
from tests.runtime.ray.conftest import ROOT
from tests.runtime.ray.support import config_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # Ray starts worker processes per attempt

BLOCKER = '''
import sys


class _NoRay:
    """Import blocker: ``ray`` and its submodules are not installed (as in a venv without the extra)."""

    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoRay())
'''


def _env(tmp_path: Path, *, without_ray: bool) -> dict[str, str]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    if without_ray:
        blocker = tmp_path / "no-ray"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(BLOCKER)
        paths.insert(0, str(blocker))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env.pop("RAY_ADDRESS", None)
    return env


def _python(tmp_path: Path, code: str, *, without_ray: bool = False, timeout: float = 120) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line, which is returned."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path, env=_env(tmp_path, without_ray=without_ray), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


_FAILING_RUN = """
import asyncio, json, sys, time
from keystate.runtime import CheckpointConfig, JobConfig, JobGraph, SequenceSource, TransactionalFileSink, run_job

def job():
    job = JobGraph("bad")
    job.source(SequenceSource(100), uid="numbers").sink(TransactionalFileSink("out"), uid="sink")
    return job

def attempt(make_executor, storage="checkpoints"):
    started = time.monotonic()
    try:
        config = JobConfig(checkpoint=CheckpointConfig(interval=0.1, storage=storage), executor=make_executor())
        result = asyncio.run(run_job(job(), config))
        error = result.error
        status = str(result.status)
    except Exception as exc:
        error, status = exc, "raised"
    import os
    return {
        "status": status, "type": type(error).__name__, "message": str(error),
        "classes": [c.__name__ for c in type(error).__mro__], "elapsed": time.monotonic() - started,
        "ray_imported": "ray" in sys.modules, "output": os.path.exists("out"),
        "checkpoints": os.path.exists("checkpoints") and any(os.scandir("checkpoints")),
    }
"""


def test_ray_executor_without_ray_names_the_extra(tmp_path: Path) -> None:
    code = (
        _FAILING_RUN
        + """
from keystate.runtime.ray import RayExecutor  # importable without Ray: Ray loads only when the executor is used
print(json.dumps(attempt(lambda: RayExecutor())))
"""
    )
    outcome = _python(tmp_path, code, without_ray=True)
    assert outcome["type"] == "ExecutorUnavailableError", outcome
    assert "pip install 'keystate[ray]'" in outcome["message"]
    assert "\n" not in outcome["message"], "one line"
    assert "JobError" in outcome["classes"]
    assert not outcome["ray_imported"]
    assert not outcome["output"], "nothing ran"


def test_embedded_jobs_never_import_ray(tmp_path: Path) -> None:
    code = (
        _FAILING_RUN
        + """
import keystate, keystate.runtime, keystate.runtime.ray
outcome = attempt(lambda: None)
print(json.dumps(outcome))
"""
    )
    outcome = _python(tmp_path, code, without_ray=True)  # a blocked import would fail the job
    assert outcome["status"] == "finished", outcome
    assert not outcome["ray_imported"]


def test_demo_with_executor_ray_without_ray_is_one_line_exit_2(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "keystate.tools.cli", "demo", "--executor", "ray", "--duration", "1"]
    done = subprocess.run(
        [*argv, "--checkpoints", str(tmp_path / "demo")], cwd=tmp_path, env=_env(tmp_path, without_ray=True),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'keystate[ray]'" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").rglob("_metadata"))


TIMEOUT = 3.0
MARGIN = 2.0
"""What an unreachable address may take beyond ``connect_timeout``: Ray is imported before the clock starts,
so what is left is building the job and the event loop's start (tens of milliseconds), one last reachability
check (at most ``_PROBE_PAUSE``, 0.2 s, past the deadline) and scheduling delays on a shared 2-core machine."""


def test_unreachable_address_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    code = (
        _FAILING_RUN
        + f"""
import ray  # imported before the clock starts: importing Ray takes seconds on a loaded machine
from keystate.runtime.ray import RayExecutor
print(json.dumps(attempt(lambda: RayExecutor(address="127.0.0.1:9", connect_timeout={TIMEOUT}))))
"""
    )
    outcome = _python(tmp_path, code)
    assert outcome["type"] == "ClusterUnavailableError", outcome
    assert "127.0.0.1:9" in outcome["message"]
    assert f"within {TIMEOUT:g} s" in outcome["message"]
    assert "\n" not in outcome["message"], "one line"
    # Nobody listens at 127.0.0.1:9: the executor retries until the timeout (a head node may be starting).
    assert TIMEOUT - 0.5 < outcome["elapsed"] < TIMEOUT + MARGIN, f"took {outcome['elapsed']:.1f} s, timeout {TIMEOUT}"
    assert outcome["stderr"] == "", "Ray printed nothing: with the address unreachable, ray.init never ran"
    assert not outcome["output"]
    assert not outcome["checkpoints"]


def test_local_checkpoint_path_on_a_multi_node_cluster_is_refused(tmp_path: Path) -> None:
    code = (
        _FAILING_RUN
        + """
import ray
from ray.cluster_utils import Cluster
from keystate.runtime.ray import RayExecutor

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    executor = RayExecutor(address=cluster.address)
    local = attempt(lambda: executor)
    executor.shutdown()  # the executor connected, so its shutdown disconnects
    local["connected_after_shutdown"] = ray.is_initialized()
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(local))
"""
    )
    outcome = _python(tmp_path, code, timeout=180)
    assert outcome["type"] == "StorageNotSharedError", outcome
    assert outcome["connected_after_shutdown"] is False, "RayExecutor.shutdown() ends the session it initialised"
    assert "s3://" in outcome["message"], "the message points to S3"
    assert "\n" not in outcome["message"], "one line"
    assert not outcome["output"]
    assert not outcome["checkpoints"]


class HoldsALock(Operator):
    """Forwards records; holds a ``threading.Lock``, which no pickler can ship to another process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)


def test_unpicklable_operator_is_named_before_the_job_starts(tmp_path: Path, ray_cluster: str) -> None:
    from keystate.runtime.ray import RayExecutor

    job = JobGraph("unshippable")
    numbers = job.source(SequenceSource(100), uid="numbers")
    numbers.transform(HoldsALock(), uid="locked").sink(TransactionalFileSink(str(tmp_path / "out")), uid="sink")

    async def scenario() -> None:
        submit(job, config_on(RayExecutor(), tmp_path, interval=0.1))

    started = time.monotonic()
    with pytest.raises(NotShippableError) as refused:
        run(scenario())
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert "locked" in message, message
    assert "HoldsALock" in message or "lock" in message.replace("locked", ""), message
    assert "\n" not in message, "one line"
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "checkpoints").exists()


class LockedHeap(HeapStateBackend):
    """The heap state backend, holding a lock: it cannot be shipped to a worker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


def _unshippable_source(job: JobGraph, out: str) -> CheckpointConfig | None:
    lock = threading.Lock()
    job.source(SequenceSource(10, make=lambda n: (lock, n)[1]), uid="numbers").sink(
        TransactionalFileSink(out), uid="sink"
    )
    return None


def _unshippable_sink(job: JobGraph, out: str) -> CheckpointConfig | None:
    job.source(SequenceSource(10), uid="numbers").sink(HoldsALock(), uid="locked-sink")
    return None


def _unshippable_key_selector(job: JobGraph, out: str) -> CheckpointConfig | None:
    lock = threading.Lock()
    keyed = job.source(SequenceSource(10), uid="numbers").key_by(lambda n: (lock, n % 3)[1])
    keyed.process(RunningCount(), uid="counts").sink(TransactionalFileSink(out), uid="sink")
    return None


def _unshippable_store_wrapper(job: JobGraph, out: str) -> CheckpointConfig | None:
    _unshippable_sink_free(job, out)
    lock = threading.Lock()
    return CheckpointConfig(interval=0.1, wrap_store=lambda store: (lock, store)[1])


def _unshippable_sink_free(job: JobGraph, out: str) -> None:
    job.source(SequenceSource(10), uid="numbers").sink(TransactionalFileSink(out), uid="sink")


def _unshippable_state_backend(job: JobGraph, out: str) -> CheckpointConfig | None:
    _unshippable_sink_free(job, out)
    return None


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (_unshippable_source, "'numbers' (source SequenceSource) cannot be shipped to a Ray worker"),
        (_unshippable_sink, "'locked-sink' (sink HoldsALock) cannot be shipped to a Ray worker"),
        (_unshippable_key_selector, "'counts' (key selector of its input from 'numbers') cannot be shipped"),
        (_unshippable_store_wrapper, "CheckpointConfig.wrap_store cannot be shipped to a Ray worker"),
        (_unshippable_state_backend, "state backend LockedHeap cannot be shipped to a Ray worker"),
    ],
    ids=["source", "sink", "key-selector", "store-wrapper", "state-backend"],
)
def test_every_part_that_cannot_be_shipped_is_named_at_submit(tmp_path: Path, build: Any, named: str) -> None:
    """Each part a worker unpickles (docs/ray.md#limits) is checked at ``submit``: a lock reached from it (an
    attribute, or a lambda's closure) is named, before Ray starts or anything is written."""
    from keystate.runtime.ray import RayExecutor

    job = JobGraph("unshippable")
    checkpoint = build(job, str(tmp_path / "out"))
    config = config_on(RayExecutor(), tmp_path, interval=0.1)
    if checkpoint is not None:
        config = replace(config, checkpoint=replace(config.checkpoint, wrap_store=checkpoint.wrap_store))
    if build is _unshippable_state_backend:
        config = replace(config, state_backend=LockedHeap())

    async def scenario() -> None:
        submit(job, config)

    with pytest.raises(NotShippableError) as refused:
        run(scenario())
    message = str(refused.value)
    assert named in message, message
    assert "it cannot be pickled" in message, message
    assert "\n" not in message, "one line"
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "checkpoints").exists()
