"""Where a job's tasks run: the executor interface, the embedded (in-process) executor, and what they share.

An :class:`Executor` deploys one attempt of a job: it builds every subtask's channels and task, and hands
the job's driver a :class:`Deployment`: the coordinator's view of each task (a
:class:`~keystate.runtime.checkpoint_protocol.TaskGateway`) and one coroutine per task that returns when
the task finished and raises ``TaskFailedError`` when it failed. The checkpoint coordinator, the restart
loop and the client (:mod:`keystate.runtime.execution`) are the same for every executor.

- :class:`EmbeddedExecutor` (``JobConfig(executor=None)``, the default): every subtask is an asyncio task
  of this process, channels are in-process queues.
- ``keystate.runtime.ray.RayExecutor``: every subtask in a Ray actor, channels between worker processes
  with credit-based flow control (docs/ray.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keystate.runtime.channels import ChannelReceiver, ChannelSender, InputGate, Sender, open_channel
from keystate.runtime.errors import JobError
from keystate.runtime.output import Output, OutputEdge
from keystate.runtime.plan import SubtaskId, pointwise_targets
from keystate.storage.checkpoints import CheckpointStorage, CheckpointWriter
from keystate.storage.retry import with_retries
from keystate.storage.streams import StreamOptions
from keystate.storage.uri import open_store, parse_location

if TYPE_CHECKING:
    import asyncio

    from keystate.runtime.checkpoint_protocol import TaskGateway
    from keystate.runtime.config import CheckpointConfig, JobConfig
    from keystate.runtime.coordinator import CheckpointCoordinator
    from keystate.runtime.graph import JobGraph
    from keystate.runtime.task import TaskRestore
    from keystate.statebackend.backends import StateBackend
    from keystate.storage.format.topology import Topology

__all__ = [
    "ClusterConflictError",
    "ClusterUnavailableError",
    "Deployment",
    "EmbeddedExecutor",
    "Executor",
    "ExecutorError",
    "ExecutorUnavailableError",
    "JobRun",
    "NotShippableError",
    "ObservedCheckpointStorage",
    "StorageNotSharedError",
    "Wiring",
    "open_checkpoint_storage",
    "wire",
]


# --- errors --------------------------------------------------------------------------------------------


class ExecutorError(JobError):
    """The executor cannot run this job here; nothing was started, nothing was lost."""


class ExecutorUnavailableError(ExecutorError):
    """The executor's engine is not installed (Ray: ``pip install 'keystate[ray]'``)."""


class ClusterUnavailableError(ExecutorError):
    """The cluster could not be reached (or started) within the configured time.

    Attributes:
        address: the cluster address asked for (``None``: a local cluster the executor was to start).
        timeout: the connect timeout in seconds when it ran out (``None``: the connection failed otherwise).
    """

    def __init__(self, message: str, *, address: str | None = None, timeout: float | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.timeout = timeout


class ClusterConflictError(ExecutorError):
    """The executor was given a cluster or a setting that the engine session this process already has
    cannot honour (Ray initialised with another cluster, or a runtime environment fixed at ``ray.init``)."""


class StorageNotSharedError(ExecutorError):
    """The checkpoint storage cannot be reached by every worker (a local path on a multi-node cluster)."""


class NotShippableError(ExecutorError):
    """An operator, source, sink, key selector or state backend cannot be shipped to a worker process."""


# --- what an executor is given -------------------------------------------------------------------------


class ObservedCheckpointStorage(CheckpointStorage):
    """Checkpoint storage that tells listeners about every checkpoint or savepoint the coordinator begins.

    A remote executor announces each checkpoint's directory to its workers before any of them is
    triggered, so every worker writes its state files straight into it with a writer of its own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.begin_listeners: list[Callable[[CheckpointWriter], None]] = []

    def _began(self, writer: CheckpointWriter) -> CheckpointWriter:
        for listener in list(self.begin_listeners):
            listener(writer)
        return writer

    def begin_checkpoint(self, job_id: str, checkpoint_id: int) -> CheckpointWriter:
        return self._began(super().begin_checkpoint(job_id, checkpoint_id))

    def begin_savepoint(self, job_id: str, checkpoint_id: int) -> CheckpointWriter:
        return self._began(super().begin_savepoint(job_id, checkpoint_id))


def open_checkpoint_storage(config: CheckpointConfig, *, observed: bool = False) -> CheckpointStorage:
    """The job's checkpoint storage as ``config`` describes it (store wrapper, retries, inline threshold)."""
    location = parse_location(config.storage)
    store = open_store(location, endpoint_url=config.endpoint_url)
    if config.wrap_store is not None:
        store = config.wrap_store(store)
    cls = ObservedCheckpointStorage if observed else CheckpointStorage
    return cls(
        with_retries(store, config.retry),
        location.path,
        options=StreamOptions(inline_threshold=config.inline_threshold),
        read_limits=config.read_limits,
    )


@dataclass(frozen=True)
class JobRun:
    """One job as its executor sees it (the same object across the job's attempts)."""

    graph: JobGraph
    config: JobConfig
    job_id: str
    topology: Topology
    """The effective topology (max parallelism adopted from the restored checkpoint)."""
    coordinator: CheckpointCoordinator
    backend: StateBackend

    @property
    def max_parallelism(self) -> dict[str, int]:
        return {op.uid: op.effective_max_parallelism for op in self.topology.operators}

    @property
    def wait_for_final_checkpoint(self) -> bool:
        ckpt = self.config.checkpoint
        return ckpt.enabled and ckpt.checkpoints_after_tasks_finish


class Deployment(ABC):
    """One attempt's tasks, deployed."""

    @property
    @abstractmethod
    def gateways(self) -> Mapping[SubtaskId, TaskGateway]:
        """The coordinator's view of every task."""

    @abstractmethod
    def runs(self) -> dict[str, Coroutine[Any, Any, None]]:
        """Task name -> a coroutine that returns when the task finished and raises ``TaskFailedError`` when
        it failed (cancelling it stops the task)."""

    async def running(self) -> None:  # noqa: B027 (an optional hook)
        """Return once every task runs (takes checkpoint triggers); the default: at once."""

    async def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release what the attempt holds (worker processes); called once, after every run ended."""


class Executor(ABC):
    """Runs a job's tasks. ``JobConfig(executor=None)`` is the :class:`EmbeddedExecutor`."""

    observed_storage: bool = False
    """Whether the coordinator's storage must be an :class:`ObservedCheckpointStorage`."""

    def check(self, graph: JobGraph, config: JobConfig) -> None:  # noqa: B027 (an optional hook)
        """Refuse a job this executor cannot run, before anything starts (``submit`` calls it).

        Raises:
            ExecutorError: which part cannot run here, and why.
        """

    async def start(self, run: JobRun) -> None:  # noqa: B027 (an optional hook)
        """Prepare for the job (connect to a cluster); called once before the first deployment.

        Raises:
            ExecutorError: the executor cannot run the job here.
        """

    @abstractmethod
    async def deploy(self, run: JobRun, attempt: int, restore: Mapping[SubtaskId, TaskRestore]) -> Deployment:
        """Deploy one attempt of the job (every subtask, restored from ``restore``)."""


# --- channels between subtasks (shared by all executors) ------------------------------------------------


@dataclass(frozen=True)
class OutputWiring:
    """One edge of a producer subtask: to the consumer subtasks ``targets`` of operator ``consumer``."""

    input_index: int
    """The edge's index among the consumer's inputs."""
    consumer: str
    targets: list[int]


@dataclass(frozen=True)
class Wiring:
    """Every channel of one attempt: one per (producer subtask, consumer subtask) pair of each edge."""

    inputs: dict[SubtaskId, list[tuple[SubtaskId, int]]]
    """Consumer -> its channels in input gate order, each (producer, the consumer's input index)."""
    outputs: dict[SubtaskId, list[OutputWiring]]
    """Producer -> its edges, in the order of its output."""

    def output_edge(
        self, graph: JobGraph, max_parallelism: Mapping[str, int], edge: OutputWiring, producer_index: int,
        senders: Mapping[int, Sender],
    ) -> OutputEdge:  # fmt: skip
        down = graph.operators[edge.consumer]
        return OutputEdge(
            senders,
            down.inputs[edge.input_index].partitioning,
            producer_index,
            key_selector=down.inputs[edge.input_index].key_selector,
            key_serializer=down.key_serializer,
            downstream_parallelism=down.parallelism,
            downstream_max_parallelism=max_parallelism[edge.consumer],
        )


def wire(graph: JobGraph) -> Wiring:
    """The channels of ``graph``: pointwise edges connect :func:`pointwise_targets`, all-to-all edges all."""
    specs = graph.operators
    inputs: dict[SubtaskId, list[tuple[SubtaskId, int]]] = defaultdict(list)
    outputs: dict[SubtaskId, list[OutputWiring]] = defaultdict(list)
    for spec in specs.values():
        for k, inp in enumerate(spec.inputs):
            up = specs[inp.source]
            for j in range(up.parallelism):
                producer = SubtaskId(up.uid, j)
                if inp.partitioning.pointwise:
                    targets = pointwise_targets(j, up.parallelism, spec.parallelism)
                else:
                    targets = list(range(spec.parallelism))
                for i in targets:
                    inputs[SubtaskId(spec.uid, i)].append((producer, k))
                outputs[producer].append(OutputWiring(k, spec.uid, list(targets)))
    return Wiring(dict(inputs), dict(outputs))


# --- the embedded executor ------------------------------------------------------------------------------


class _EmbeddedDeployment(Deployment):
    def __init__(self, tasks: dict[SubtaskId, Any]) -> None:
        self._tasks = tasks

    @property
    def gateways(self) -> Mapping[SubtaskId, TaskGateway]:
        return self._tasks

    def runs(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {task.name: task.run() for task in self._tasks.values()}


class EmbeddedExecutor(Executor):
    """Every subtask an asyncio task of this process (the default)."""

    async def deploy(self, run: JobRun, attempt: int, restore: Mapping[SubtaskId, TaskRestore]) -> Deployment:
        import asyncio

        from keystate.runtime.task import Task

        config, graph = run.config, run.graph
        specs = graph.operators
        max_p = run.max_parallelism
        wiring = wire(graph)
        wakeups: dict[SubtaskId, asyncio.Event] = {
            SubtaskId(uid, i): asyncio.Event() for uid, s in specs.items() for i in range(s.parallelism)
        }
        receivers: dict[SubtaskId, list[ChannelReceiver]] = defaultdict(list)
        senders: dict[tuple[SubtaskId, SubtaskId], ChannelSender] = {}
        for consumer, channels in wiring.inputs.items():
            for producer, _k in channels:
                tx, rx = open_channel(config.channel_capacity, wakeups[consumer], f"{producer}->{consumer}")
                senders[producer, consumer] = tx
                receivers[consumer].append(rx)
        tasks: dict[SubtaskId, Task] = {}
        for spec in specs.values():
            for i in range(spec.parallelism):
                sub = SubtaskId(spec.uid, i)
                edges = [
                    wiring.output_edge(graph, max_p, edge, i,
                                       {t: senders[sub, SubtaskId(edge.consumer, t)] for t in edge.targets})
                    for edge in wiring.outputs.get(sub, [])
                ]  # fmt: skip
                inputs = [k for _producer, k in wiring.inputs.get(sub, [])]
                tasks[sub] = Task(
                    spec=spec,
                    index=i,
                    attempt=attempt,
                    gate=InputGate(receivers[sub], inputs) if spec.inputs else None,
                    output=Output(edges, config.batch_size),
                    wakeup=wakeups[sub],
                    coordinator=run.coordinator,
                    state_backend=run.backend,
                    max_parallelism=max_p[spec.uid],
                    restore=restore.get(sub),
                    wait_for_final_checkpoint=run.wait_for_final_checkpoint,
                    batch_size=config.batch_size,
                    checkpointing=config.checkpoint.enabled,
                    checkpoint_config=config.checkpoint,
                )
        return _EmbeddedDeployment(tasks)
