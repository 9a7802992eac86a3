"""A driver process for the lost-node test: a two-node Ray cluster, a job spread over both, one node removed.

``python -m tests.runtime.ray.lost_node_driver ENDPOINT BUCKET`` starts a cluster of two raylets on
this machine (``ray.cluster_utils.Cluster``: a head and a second node), runs :func:`lost_node_job` on it
with every actor placed by Ray's ``SPREAD`` strategy, checkpoints and output on S3 at ENDPOINT (a
local path is refused on two nodes), and once two checkpoints completed removes the second node the hard
way (its raylet and every worker process on it SIGKILLed, ``allow_graceful=False``). The last line
printed is a JSON summary for the test: the job's result, the node of every subtask in the first attempt,
and the failure that ended it.

It runs in its own process because a multi-node ``Cluster`` needs a Ray session of its own, and the test
session's cluster (tests/runtime/ray/conftest.py) is a plain ``ray.init`` in the test's process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from keystate.runtime import JobConfig, JobGraph, JobStatus, RestartStrategy, TransactionalFileSink, submit
from keystate.runtime.config import CheckpointConfig
from tests.runtime.e2e_support import Completed, MixedSource, RunningCount

LENGTHS = [1500, 1500]
RATE = 300.0
WITHIN = 60.0
FAST_FAILURE_DETECTION = {
    # The head declares a silent node dead after 3 missed health checks 300 ms apart (Ray's default: about
    # 30 s), so the test does not wait for Ray's own production timeouts. Actor calls fail as soon as the
    # workers' processes are gone; this bounds the case where Ray waits for the node's verdict.
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 3,
}


def key(record: list[int]) -> int:
    return record[0] * 100 + record[1] % 5


def lost_node_job(output: str, endpoint: str) -> JobGraph:
    """Two paced bounded splits -> a running count per key -> a 2PC sink on S3 (five actors)."""
    job = JobGraph("lost-node")
    source = job.source(MixedSource(LENGTHS, rates=[RATE, RATE]), uid="source", parallelism=2)
    counts = source.key_by(key).process(RunningCount(), uid="counts", parallelism=2)
    counts.sink(TransactionalFileSink(output, endpoint_url=endpoint), uid="sink", parallelism=1)
    return job


class _Failures(logging.Handler):
    """Keeps the driver's "restarting" lines (the failure that ended each attempt)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "restarting" in record.getMessage():
            self.lines.append(record.getMessage())


async def _run(address: str, endpoint: str, bucket: str, remove: Any) -> dict[str, Any]:
    from keystate.runtime.ray import RayExecutor
    from keystate.runtime.ray._driver import RayDeployment

    failures = _Failures()
    logging.getLogger("keystate.runtime.execution").addHandler(failures)

    config = JobConfig(
        checkpoint=CheckpointConfig(interval=0.1, storage=f"s3://{bucket}/ckpt", endpoint_url=endpoint, num_retained=5),
        restart=RestartStrategy(max_attempts=2, delay=0.05),
        executor=RayExecutor(address=address, actor_options={"num_cpus": 0, "scheduling_strategy": "SPREAD"}),
    )
    client = submit(lost_node_job(f"s3://{bucket}/out", endpoint), config)
    completed = Completed()
    completed.watch(client)
    await completed.until(lambda c: c.checkpoint_id >= 2, within=WITHIN)
    before = completed.checkpoints[-1].checkpoint_id
    deployment = client.deployment
    assert isinstance(deployment, RayDeployment)
    placement = {str(sub): task.node_id for sub, task in deployment.tasks.items()}
    await asyncio.to_thread(remove)
    result = await asyncio.wait_for(client.wait(), WITHIN)
    return {
        "status": str(result.status),
        "finished": result.status is JobStatus.FINISHED,
        "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}",
        "attempts": result.attempts,
        "latest_before_removal": before,
        "checkpoints": [c.checkpoint_id for c in completed.checkpoints],
        "placement": placement,
        "failures": failures.lines,
    }


def main(endpoint: str, bucket: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster: Any = Cluster(  # ray.cluster_utils is untyped
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION},
    )
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    head_id, doomed_id = cluster.head_node.node_id, doomed.node_id
    try:
        summary = asyncio.run(
            _run(cluster.address, endpoint, bucket, lambda: cluster.remove_node(doomed, allow_graceful=False))
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({**summary, "head": head_id, "removed": doomed_id}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
