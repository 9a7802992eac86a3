"""A lost node (docs/ray.md#failures): a Ray node that hosts some of a job's actors is removed mid-job; the
attempt fails, the job restarts from the latest completed checkpoint on the nodes left, and its committed
output is exactly once.

The cluster is two raylets on this machine (``ray.cluster_utils.Cluster``), started by a driver in a
subprocess (tests/runtime/ray/lost_node_driver.py): a multi-node cluster needs a Ray session of its own.
Checkpoints and output go to S3 on moto's server, as on a real multi-node cluster (a local path is
refused there, tests/runtime/ray/test_bad_input.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests._environment import unavailable
from tests.runtime.e2e_support import assert_counts_continue, assert_exactly, expected_mixed
from tests.runtime.ray.conftest import ROOT
from tests.runtime.ray.lost_node_driver import LENGTHS, key
from tests.runtime.ray.support import worker_environment
from tests.runtime.ray.test_s3_and_demo import _committed_s3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_lost_node_fails_the_attempt_and_the_job_restarts_exactly_once(
    tmp_path: Path, moto_endpoint: str, server_bucket: str
) -> None:
    if importlib.util.find_spec("ray") is None:
        unavailable("Ray is not installed: pip install -e '.[ray]' (the test extra includes it)")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))},
        **worker_environment(ROOT, tmp_path / "no-aws-config"),
    }
    argv = [sys.executable, "-m", "tests.runtime.ray.lost_node_driver", moto_endpoint, server_bucket]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])

    assert summary["finished"], summary
    assert summary["attempts"] == 2, f"the lost node failed exactly one attempt: {summary}"
    on_removed = sorted(sub for sub, node in summary["placement"].items() if node == summary["removed"])
    assert on_removed, f"no actor of the first attempt ran on the removed node: {summary['placement']}"
    assert len(on_removed) < len(summary["placement"]), "some actors ran on the node that stayed"
    (failure,) = summary["failures"]
    assert f"on node {summary['removed']}) died" in failure, failure
    assert any(c > summary["latest_before_removal"] for c in summary["checkpoints"]), "the restarted job checkpoints"

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    output = _committed_s3(s3, server_bucket, "out/")
    assert_exactly([r[:2] for r in output], expected_mixed(LENGTHS))
    assert_counts_continue(output, key)
