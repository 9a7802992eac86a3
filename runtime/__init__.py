"""keystate runtime: a small asyncio stream processor with Flink's FLIP-147 semantics.

::

    job = JobGraph("orders")
    orders = job.source(SequenceSource(10_000), uid="orders", parallelism=2)
    orders.key_by(lambda n: n % 10).process(MyCounter(), uid="counts").sink(
        TransactionalFileSink("./out"), uid="sink")
    result = asyncio.run(run_job(job, JobConfig(checkpoint=CheckpointConfig(interval=0.5))))

Names load on first use (PEP 562), so importing one module of the runtime (the CLI's ``check-restore``
imports ``keystate.runtime.restore_rules``) does not import asyncio and the task machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keystate._lazy import lazy_dir, resolve_lazy

if TYPE_CHECKING:
    from keystate.runtime import faults
    from keystate.runtime.config import CheckpointConfig, JobConfig, RestartStrategy
    from keystate.runtime.coordinator import CheckpointCoordinator, CheckpointFailureReason, SubtaskSnapshot
    from keystate.runtime.errors import (
        ChannelClosedError,
        CheckpointFailedError,
        IncompatibleRestoreError,
        JobError,
        JobFailedError,
        JobGraphError,
        StopWithSavepointError,
        TaskFailedError,
    )
    from keystate.runtime.events import MAX_WATERMARK, Barrier, CheckpointOptions, EndOfData, StopMode, Watermark
    from keystate.runtime.execution import JobClient, JobResult, JobStatus, load_checkpoint, run_job, submit
    from keystate.runtime.executor import (
        ClusterUnavailableError,
        Deployment,
        EmbeddedExecutor,
        Executor,
        ExecutorError,
        ExecutorUnavailableError,
        NotShippableError,
        StorageNotSharedError,
    )
    from keystate.runtime.graph import DataStream, InputSpec, JobGraph, KeyedStream, OperatorSpec
    from keystate.runtime.operators import (
        FilterOperator,
        FlatMapOperator,
        KeyedProcessFunction,
        KeyedProcessOperator,
        MapOperator,
        Operator,
        OperatorContext,
    )
    from keystate.runtime.plan import CheckpointPlan, SubtaskId, SubtaskStatus, calculate_plan
    from keystate.runtime.restore_rules import RULES, RestoreReport, Violation, check_restore
    from keystate.runtime.sinks import TransactionalFileSink, TwoPhaseCommitSink
    from keystate.runtime.sources import GeneratorSource, SequenceSource, Source, SourceOperator, SplitReader

# name -> the module that defines it; resolved by __getattr__ on first access.
_LAZY = {
    "CheckpointConfig": "keystate.runtime.config",
    "JobConfig": "keystate.runtime.config",
    "RestartStrategy": "keystate.runtime.config",
    "CheckpointCoordinator": "keystate.runtime.coordinator",
    "CheckpointFailureReason": "keystate.runtime.coordinator",
    "SubtaskSnapshot": "keystate.runtime.coordinator",
    "ChannelClosedError": "keystate.runtime.errors",
    "CheckpointFailedError": "keystate.runtime.errors",
    "IncompatibleRestoreError": "keystate.runtime.errors",
    "JobError": "keystate.runtime.errors",
    "JobFailedError": "keystate.runtime.errors",
    "JobGraphError": "keystate.runtime.errors",
    "StopWithSavepointError": "keystate.runtime.errors",
    "TaskFailedError": "keystate.runtime.errors",
    "MAX_WATERMARK": "keystate.runtime.events",
    "Barrier": "keystate.runtime.events",
    "CheckpointOptions": "keystate.runtime.events",
    "EndOfData": "keystate.runtime.events",
    "StopMode": "keystate.runtime.events",
    "Watermark": "keystate.runtime.events",
    "ClusterUnavailableError": "keystate.runtime.executor",
    "Deployment": "keystate.runtime.executor",
    "EmbeddedExecutor": "keystate.runtime.executor",
    "Executor": "keystate.runtime.executor",
    "ExecutorError": "keystate.runtime.executor",
    "ExecutorUnavailableError": "keystate.runtime.executor",
    "NotShippableError": "keystate.runtime.executor",
    "StorageNotSharedError": "keystate.runtime.executor",
    "JobClient": "keystate.runtime.execution",
    "JobResult": "keystate.runtime.execution",
    "JobStatus": "keystate.runtime.execution",
    "load_checkpoint": "keystate.runtime.execution",
    "run_job": "keystate.runtime.execution",
    "submit": "keystate.runtime.execution",
    "DataStream": "keystate.runtime.graph",
    "InputSpec": "keystate.runtime.graph",
    "JobGraph": "keystate.runtime.graph",
    "KeyedStream": "keystate.runtime.graph",
    "OperatorSpec": "keystate.runtime.graph",
    "FilterOperator": "keystate.runtime.operators",
    "FlatMapOperator": "keystate.runtime.operators",
    "KeyedProcessFunction": "keystate.runtime.operators",
    "KeyedProcessOperator": "keystate.runtime.operators",
    "MapOperator": "keystate.runtime.operators",
    "Operator": "keystate.runtime.operators",
    "OperatorContext": "keystate.runtime.operators",
    "CheckpointPlan": "keystate.runtime.plan",
    "SubtaskId": "keystate.runtime.plan",
    "SubtaskStatus": "keystate.runtime.plan",
    "calculate_plan": "keystate.runtime.plan",
    "RULES": "keystate.runtime.restore_rules",
    "RestoreReport": "keystate.runtime.restore_rules",
    "Violation": "keystate.runtime.restore_rules",
    "check_restore": "keystate.runtime.restore_rules",
    "TransactionalFileSink": "keystate.runtime.sinks",
    "TwoPhaseCommitSink": "keystate.runtime.sinks",
    "GeneratorSource": "keystate.runtime.sources",
    "SequenceSource": "keystate.runtime.sources",
    "Source": "keystate.runtime.sources",
    "SourceOperator": "keystate.runtime.sources",
    "SplitReader": "keystate.runtime.sources",
}
_SUBMODULES = {"faults"}

__all__ = [
    "MAX_WATERMARK",
    "RULES",
    "Barrier",
    "ChannelClosedError",
    "CheckpointConfig",
    "CheckpointCoordinator",
    "CheckpointFailedError",
    "CheckpointFailureReason",
    "CheckpointOptions",
    "CheckpointPlan",
    "ClusterUnavailableError",
    "DataStream",
    "Deployment",
    "EmbeddedExecutor",
    "EndOfData",
    "Executor",
    "ExecutorError",
    "ExecutorUnavailableError",
    "FilterOperator",
    "FlatMapOperator",
    "GeneratorSource",
    "IncompatibleRestoreError",
    "InputSpec",
    "JobClient",
    "JobConfig",
    "JobError",
    "JobFailedError",
    "JobGraph",
    "JobGraphError",
    "JobResult",
    "JobStatus",
    "KeyedProcessFunction",
    "KeyedProcessOperator",
    "KeyedStream",
    "MapOperator",
    "NotShippableError",
    "Operator",
    "OperatorContext",
    "OperatorSpec",
    "RestartStrategy",
    "RestoreReport",
    "SequenceSource",
    "Source",
    "SourceOperator",
    "SplitReader",
    "StopMode",
    "StopWithSavepointError",
    "StorageNotSharedError",
    "SubtaskId",
    "SubtaskSnapshot",
    "SubtaskStatus",
    "TaskFailedError",
    "TransactionalFileSink",
    "TwoPhaseCommitSink",
    "Violation",
    "Watermark",
    "calculate_plan",
    "check_restore",
    "faults",
    "load_checkpoint",
    "run_job",
    "submit",
]


def __getattr__(name: str) -> Any:
    return resolve_lazy(globals(), name, _LAZY, _SUBMODULES)


def __dir__() -> list[str]:
    return lazy_dir(globals())


if __name__ != "keystate.runtime":
    # One import root: this folder is installed as keystate.runtime. Refusing the bare name keeps every file
    # importable under exactly one module name (two copies of one module mean two copies of its classes).
    raise ImportError(f"import keystate.runtime, not {__name__!r}: keystate installs a single top-level package")
