"""Run keystate jobs on Ray: ``JobConfig(executor=RayExecutor(...))`` (docs/ray.md).

Every subtask runs the same :class:`~keystate.runtime.task.Task` as in-process, inside a Ray actor (its
own worker process, its own LMDB scratch); the checkpoint coordinator stays in the driver. Channels
between actors carry record batches and in-band events in order, with credit-based flow control;
workers write their state files straight to the checkpoint storage and acknowledge with the handles as
JSON; the coordinator commits ``_metadata``. A worker process that dies fails the attempt, and the job
restarts from its latest completed checkpoint.

Importing this package does not import Ray: ``ray`` loads when the executor is first used, and using it
without Ray installed raises :class:`ExecutorUnavailableError` naming ``pip install 'keystate[ray]'``.
"""

from __future__ import annotations

from keystate.runtime.executor import (
    ClusterConflictError,
    ClusterUnavailableError,
    ExecutorError,
    ExecutorUnavailableError,
    NotShippableError,
    StorageNotSharedError,
)
from keystate.runtime.ray._executor import INSTALL_HINT, RayExecutor, actor_of
from keystate.runtime.ray._messages import AcknowledgementError

__all__ = [
    "INSTALL_HINT",
    "AcknowledgementError",
    "ClusterConflictError",
    "ClusterUnavailableError",
    "ExecutorError",
    "ExecutorUnavailableError",
    "NotShippableError",
    "RayExecutor",
    "StorageNotSharedError",
    "actor_of",
]
