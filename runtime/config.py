"""Job configuration: state backend, checkpointing (Flink's options and defaults), restarts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keystate.statebackend.backends import StateBackend
from keystate.storage.base import ObjectStore
from keystate.storage.format.statefile import ReadLimits
from keystate.storage.retry import RetryPolicy

if TYPE_CHECKING:
    from keystate.runtime.executor import Executor

__all__ = ["CheckpointConfig", "JobConfig", "RestartStrategy"]


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpointing, after Flink's ``execution.checkpointing.*`` options.

    Attributes:
        interval: seconds between periodic checkpoints; ``None`` disables checkpointing.
        storage: checkpoint location: a path, ``file://`` or ``s3://bucket/prefix`` URI.
        timeout: seconds before a pending checkpoint expires (Flink default 10 min).
        min_pause: minimum seconds between the end of one checkpoint and the next periodic one.
        max_concurrent: pending checkpoints at once (Flink default 1).
        tolerable_failed_checkpoints: counted failures tolerated before the job fails (default 0).
        num_retained: completed checkpoints kept (default 1); savepoints are never deleted.
        checkpoints_after_tasks_finish: FLIP-147 (default on): keep checkpointing after some tasks
            finish, and let tasks wait for a final checkpoint before they terminate.
        inline_threshold: state streams up to this many bytes are inlined in ``_metadata``.
        endpoint_url: S3 endpoint override (else ``AWS_ENDPOINT_URL``).
        retry: how transient storage failures (``StorageUnavailableError``) of the checkpoint store
            are retried, for stores that do not retry on their own (S3 does, in botocore); also used
            to re-drive a ``_metadata`` commit whose outcome is unknown. ``None``: no retries.
        wrap_store: wraps the checkpoint object store before the retry layer, e.g. in a
            ``keystate.storage.faults.FaultyObjectStore`` for fault injection, or for instrumentation.
        read_limits: what a state file read from the checkpoint storage may declare when the job restores
            from it after a failure (``ReadLimits``: 16 MiB per block, 4 GiB per file). A checkpoint
            passed in to restore from is read with the limits of the storage it was loaded from.
        incremental: incremental keyed snapshots: a checkpoint writes only the keys changed since the
            subtask's last completed checkpoint, as a delta file under the job's ``shared/`` directory,
            and references the earlier files it still needs (like Flink's RocksDB incremental checkpoints).
            ``None`` (default): the state backend's default, on for LMDB and off for the heap. Savepoints
            are always full and self-contained.
        max_chain_length: with ``incremental``, a subtask materializes (writes a full snapshot as its new
            base) once its chain has this many deltas, so a restore reads at most this many deltas.
        max_delta_ratio: with ``incremental``, a subtask also materializes once the bytes of its deltas
            exceed this multiple of its base's bytes.
    """

    interval: float | None = None
    storage: str = "./checkpoints"
    timeout: float = 600.0
    min_pause: float = 0.0
    max_concurrent: int = 1
    tolerable_failed_checkpoints: int = 0
    num_retained: int = 1
    checkpoints_after_tasks_finish: bool = True
    inline_threshold: int = 20 * 1024
    endpoint_url: str | None = None
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    wrap_store: Callable[[ObjectStore], ObjectStore] | None = None
    read_limits: ReadLimits = field(default_factory=ReadLimits)
    incremental: bool | None = None
    max_chain_length: int = 10
    max_delta_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.interval is not None and self.interval <= 0:
            raise ValueError(f"checkpoint interval must be positive seconds or None, found {self.interval}")
        if self.timeout <= 0 or self.min_pause < 0:
            raise ValueError("checkpoint timeout must be positive and min_pause non-negative")
        if self.max_concurrent < 1 or self.num_retained < 1 or self.tolerable_failed_checkpoints < 0:
            raise ValueError("max_concurrent and num_retained must be >= 1, tolerable_failed_checkpoints >= 0")
        if self.max_chain_length < 1 or not self.max_delta_ratio > 0:
            raise ValueError(
                f"max_chain_length must be >= 1 and max_delta_ratio positive, found {self.max_chain_length} "
                f"and {self.max_delta_ratio}"
            )

    @property
    def enabled(self) -> bool:
        return self.interval is not None


@dataclass(frozen=True)
class RestartStrategy:
    """Fixed-delay restarts: on a task failure the whole job restarts from the latest checkpoint."""

    max_attempts: int = 3
    delay: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 0 or self.delay < 0:
            raise ValueError("max_attempts and delay must be non-negative")


@dataclass(frozen=True)
class JobConfig:
    """Everything a job run needs besides its graph.

    Attributes:
        state_backend: ``"lmdb"`` (default), ``"heap"``, or a configured :class:`StateBackend`.
        checkpoint: checkpointing options.
        restart: restart strategy.
        channel_capacity: record batches buffered per channel before the sender waits (backpressure).
        batch_size: records per batch sent over a channel.
        executor: where the tasks run. ``None`` (default): the embedded executor, every task an asyncio
            task of this process. ``keystate.runtime.ray.RayExecutor(...)``: every subtask in a Ray actor
            (its own worker process), the coordinator in this process (docs/ray.md).
    """

    state_backend: str | StateBackend = "lmdb"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    restart: RestartStrategy = field(default_factory=RestartStrategy)
    channel_capacity: int = 8
    batch_size: int = 256
    executor: Executor | None = None

    def __post_init__(self) -> None:
        if self.channel_capacity < 1 or self.batch_size < 1:
            raise ValueError("channel_capacity and batch_size must be at least 1")
