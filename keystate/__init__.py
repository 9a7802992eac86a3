"""keystate: Flink-grade keyed state and checkpoints for Python stream processors.

One import root with four layers, each importable on its own (imports point down)::

    keystate.tools         the CLIs: keystate inspect / list / verify / dump / check-restore / demo
    keystate.runtime       the asyncio runtime: job graph, tasks, barriers, checkpoint coordinator
    keystate.statebackend  keyed state (LMDB, heap) and operator list state, snapshots, restore
    keystate.storage       the checkpoint format and checkpoint storage on local disk, S3 and memory

The names most users need first are also here, loaded on first use so that ``import keystate`` stays
cheap (the CLI's local paths never import boto3 or the runtime)::

    import keystate

    storage = keystate.open_storage("/var/checkpoints")     # or "s3://bucket/prefix"
    job = keystate.JobGraph("orders")
    result = asyncio.run(keystate.run_job(job, keystate.JobConfig()))
    # the same job with every subtask in a Ray actor (pip install 'keystate[ray]'; docs/ray.md):
    result = asyncio.run(keystate.run_job(job, keystate.JobConfig(executor=keystate.RayExecutor())))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keystate._lazy import lazy_dir, resolve_lazy

__version__ = "0.2.0"

if TYPE_CHECKING:
    from keystate.runtime import CheckpointConfig, JobConfig, JobGraph, run_job, submit
    from keystate.runtime.ray import RayExecutor
    from keystate.statebackend import HeapStateBackend, LmdbStateBackend
    from keystate.storage import CheckpointStorage, KeystateError, open_storage

# name -> the module that defines it; resolved by __getattr__ on first access (PEP 562).
_LAZY = {
    "KeystateError": "keystate.storage",
    "CheckpointStorage": "keystate.storage",
    "open_storage": "keystate.storage",
    "LmdbStateBackend": "keystate.statebackend",
    "HeapStateBackend": "keystate.statebackend",
    "JobGraph": "keystate.runtime",
    "JobConfig": "keystate.runtime",
    "CheckpointConfig": "keystate.runtime",
    "run_job": "keystate.runtime",
    "submit": "keystate.runtime",
    "RayExecutor": "keystate.runtime.ray",  # importing it does not import Ray (that happens on first use)
}

__all__ = [
    "CheckpointConfig",
    "CheckpointStorage",
    "HeapStateBackend",
    "JobConfig",
    "JobGraph",
    "KeystateError",
    "LmdbStateBackend",
    "RayExecutor",
    "__version__",
    "open_storage",
    "run_job",
    "submit",
]


def __getattr__(name: str) -> Any:
    return resolve_lazy(globals(), name, _LAZY)


def __dir__() -> list[str]:
    return lazy_dir(globals())
