"""A driver process for the driver-death test: runs a long job on an existing Ray cluster until killed.

``python -m tests.runtime.ray.driver_job ADDRESS CHECKPOINTS OUTPUT`` connects to the cluster at
ADDRESS, runs :func:`long_job` with checkpoints every 100 ms under CHECKPOINTS and its committed output
under OUTPUT, and prints ``submitted <job_id>`` once the job is submitted. The test kills it mid-job.
"""

from __future__ import annotations

import asyncio
import sys

from keystate.runtime import JobConfig, JobGraph, RestartStrategy, TransactionalFileSink, submit
from keystate.runtime.config import CheckpointConfig
from tests.runtime.e2e_support import MixedSource, RunningCount

LENGTHS = [4000, 4000]
RATE = 400.0


def long_job(output: str, *, rate: float | None = RATE) -> JobGraph:
    """Two bounded splits (``[split, n]``, 4,000 each, paced at ``rate``/s) -> running count per key -> 2PC sink."""
    job = JobGraph("driver-death")
    source = job.source(MixedSource(LENGTHS, rates=[rate, rate]), uid="source", parallelism=2)
    counts = source.key_by(lambda r: r[0] * 100 + r[1] % 5).process(RunningCount(), uid="counts", parallelism=2)
    counts.sink(TransactionalFileSink(output), uid="sink", parallelism=1)
    return job


def key(record: list[int]) -> int:
    return record[0] * 100 + record[1] % 5


async def _main(address: str, checkpoints: str, output: str) -> None:
    from keystate.runtime.ray import RayExecutor

    config = JobConfig(
        checkpoint=CheckpointConfig(interval=0.1, storage=checkpoints, num_retained=3),
        restart=RestartStrategy(max_attempts=0, delay=0.05),
        executor=RayExecutor(address=address),
    )
    client = submit(long_job(output), config)
    print(f"submitted {client.job_id}", flush=True)
    await client.wait()


if __name__ == "__main__":
    asyncio.run(_main(*sys.argv[1:4]))
