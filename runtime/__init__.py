"""keystate runtime: a small asyncio stream processor with Flink's FLIP-147 semantics.

::

    job = JobGraph("orders")
    orders = job.source(SequenceSource(10_000), uid="orders", parallelism=2)
    orders.key_by(lambda n: n % 10).process(MyCounter(), uid="counts").sink(
        TransactionalFileSink("./out"), uid="sink")
    result = asyncio.run(run_job(job, JobConfig(checkpoint=CheckpointConfig(interval=0.5))))
"""

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
    "DataStream",
    "EndOfData",
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

if __name__ != "keystate.runtime":
    # One import root: this folder is installed as keystate.runtime. Refusing the bare name keeps every file
    # importable under exactly one module name (two copies of one module mean two copies of its classes).
    raise ImportError(f"import keystate.runtime, not {__name__!r}: keystate installs a single top-level package")
