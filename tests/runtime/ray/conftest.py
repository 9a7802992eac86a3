"""One local Ray cluster per test session, the ``executor`` fixture that runs a test on both executors, and
the ``checkpoints`` fixture that runs it on both checkpoint storages (local disk, S3 on moto's server).

The cluster starts on first use (``ray.init(num_cpus=2, include_dashboard=False)``: a head node in this
process's machine, no dashboard) and stops at the end of the session. Its worker processes inherit the
environment the cluster was started with, so it is set here: the repository on ``PYTHONPATH`` (the tests'
operators live in ``tests/``, which is not installed) and the same fake, isolated AWS settings every test
gets (tests/conftest.py), so no worker reaches real AWS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._environment import unavailable
from tests.runtime.ray.support import EXECUTORS, STORAGES, CheckpointRoot, worker_environment

ROOT = Path(__file__).resolve().parents[3]
CPUS = 2


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's local Ray cluster; yields its address (for a driver in another process)."""
    try:
        import ray
    except ImportError:
        unavailable("Ray is not installed: pip install -e '.[ray]' (the test extra includes it)")
    nowhere = tmp_path_factory.getbasetemp() / "no-aws-config"
    worker_env = worker_environment(ROOT, nowhere)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
            mp.delenv(name, raising=False)
        for name, value in worker_env.items():
            mp.setenv(name, value)
        ray.init(
            address="local",  # a cluster of its own, even if another one runs on this machine
            num_cpus=CPUS,
            include_dashboard=False,
            object_store_memory=256 << 20,
            log_to_driver=bool(os.environ.get("KEYSTATE_RAY_LOGS")),
            namespace="keystate-tests",
        )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> Any:
    """``None`` (the embedded executor) or a ``RayExecutor`` on the session's cluster."""
    if request.param == "embedded":
        return None
    request.getfixturevalue("ray_cluster")
    from keystate.runtime.ray import RayExecutor

    return RayExecutor()


@pytest.fixture(params=STORAGES)
def checkpoints(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointRoot:
    """The test's checkpoint root: ``tmp_path / "checkpoints"``, or ``s3://<a fresh bucket>/ckpt`` on the
    session's moto server (tests/conftest.py), its endpoint passed in the job's configuration."""
    if request.param == "local":
        return CheckpointRoot(str(tmp_path / "checkpoints"))
    endpoint: str = request.getfixturevalue("moto_endpoint")
    bucket: str = request.getfixturevalue("server_bucket")
    return CheckpointRoot(f"s3://{bucket}/ckpt", endpoint)
