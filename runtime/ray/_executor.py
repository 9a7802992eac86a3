"""The Ray executor: every subtask in a Ray actor (its own worker process), the coordinator in the driver.

``ray`` is imported here only when the executor is used (``check``, ``start``, ``deploy``), so
``import keystate.runtime`` and even ``from keystate.runtime.ray import RayExecutor`` stay light and work
without Ray installed; using the executor without Ray raises :class:`ExecutorUnavailableError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keystate.runtime.executor import (
    ClusterUnavailableError,
    Deployment,
    Executor,
    ExecutorUnavailableError,
    JobRun,
    NotShippableError,
    StorageNotSharedError,
    wire,
)
from keystate.runtime.plan import SubtaskId
from keystate.storage.uri import parse_location

if TYPE_CHECKING:
    from types import ModuleType

    from keystate.runtime.config import JobConfig
    from keystate.runtime.execution import JobClient
    from keystate.runtime.graph import JobGraph
    from keystate.runtime.task import TaskRestore

__all__ = ["RayExecutor", "actor_of", "import_ray"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'keystate[ray]'"


def import_ray() -> ModuleType:
    """The ``ray`` module.

    Raises:
        ExecutorUnavailableError: Ray is not installed (names ``pip install 'keystate[ray]'``).
    """
    try:
        import ray
    except ImportError as exc:
        raise ExecutorUnavailableError(
            f"the Ray executor needs Ray, which is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return ray


class RayExecutor(Executor):
    """Run every subtask in a Ray actor; ``JobConfig(executor=RayExecutor(...))``.

    Args:
        address: the cluster: ``None`` starts a local Ray cluster in this process (unless Ray is already
            initialized, which is then used), ``"auto"`` joins the cluster of this machine, ``"host:port"``
            or ``"ray://host:10001"`` (Ray client) a remote one.
        connect_timeout: seconds to connect to a cluster at ``address`` before :class:`ClusterUnavailableError`
            (a local cluster's start is not bounded by it).
        runtime_env: Ray's runtime environment for the workers (``pip``, ``env_vars``, ``working_dir``, ...);
            keystate must be importable in the workers.
        num_cpus: CPUs of a local cluster this executor starts (``None``: Ray's default, all cores).
        actor_options: Ray actor options of every subtask's actor (default ``{"num_cpus": 0}``: a subtask
            reserves no CPU, so a job of any parallelism fits on a small cluster).
    """

    observed_storage = True

    def __init__(
        self,
        address: str | None = None,
        *,
        connect_timeout: float = 30.0,
        runtime_env: Mapping[str, Any] | None = None,
        num_cpus: int | None = None,
        actor_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive seconds, found {connect_timeout}")
        self.address = address
        self.connect_timeout = connect_timeout
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.num_cpus = num_cpus
        self.actor_options = dict(actor_options) if actor_options is not None else {"num_cpus": 0}
        self._actor_class: Any = None

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"

    # --- before the job starts -----------------------------------------------------------------------

    def check(self, graph: JobGraph, config: JobConfig) -> None:
        """Refuse what cannot run on Ray: no Ray, storage workers cannot share, parts Ray cannot pickle.

        Raises:
            ExecutorUnavailableError: Ray is not installed.
            StorageNotSharedError: the checkpoint storage is not a path or S3 location.
            NotShippableError: an operator, source, sink, key selector, serializer, state backend or
                store wrapper cannot be pickled; names it.
        """
        ray = import_ray()
        location = parse_location(config.checkpoint.storage)
        if location.scheme not in ("file", "s3"):
            raise StorageNotSharedError(
                f"checkpoint storage {config.checkpoint.storage!r} cannot be shared by Ray workers; use a path "
                "(one machine) or s3://bucket/prefix"
            )
        dumps = ray.cloudpickle.dumps
        for spec in graph.operators.values():
            role = "source" if spec.source is not None else ("sink" if spec.uid in _sinks(graph) else "operator")
            parts: list[tuple[str, object]] = [(f"{role} {type(spec.prototype).__name__}", spec.prototype)]
            if spec.source is not None:
                parts.append((f"source {type(spec.source).__name__}", spec.source))
            parts += [(f"key selector of its input from {i.source!r}", i.key_selector) for i in spec.inputs]
            parts.append(("key serializer", spec.key_serializer))
            for what, obj in parts:
                _check_picklable(dumps, obj, f"{spec.uid!r} ({what})")
        if not isinstance(config.state_backend, str):
            _check_picklable(dumps, config.state_backend, f"state backend {type(config.state_backend).__name__}")
        if config.checkpoint.wrap_store is not None:
            _check_picklable(dumps, config.checkpoint.wrap_store, "CheckpointConfig.wrap_store")

    async def start(self, run: JobRun) -> None:
        """Connect to (or start) the cluster within ``connect_timeout``; refuse local storage on many nodes.

        Raises:
            ExecutorUnavailableError: Ray is not installed.
            ClusterUnavailableError: the cluster was not reached in time.
            StorageNotSharedError: a local checkpoint path while the cluster has more than one node.
        """
        ray = import_ray()
        if not ray.is_initialized():
            await self._connect(ray)
        location = parse_location(run.config.checkpoint.storage)
        if location.scheme == "file":
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if len(nodes) > 1:
                raise StorageNotSharedError(
                    f"checkpoint storage {location} is a local path, but the Ray cluster has {len(nodes)} nodes: "
                    "workers on other nodes cannot write there; use s3://bucket/prefix "
                    "(CheckpointConfig(storage=...))"
                )

    async def _connect(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.runtime_env is not None:
            kwargs["runtime_env"] = self.runtime_env
        if self.address is None:
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
        else:
            kwargs["address"] = self.address
            kwargs.pop("include_dashboard")
        if self.address is None:
            # On this thread, blocking the loop for the few seconds the start takes: Ray's processes die with
            # the thread that started them (PR_SET_PDEATHSIG), so never from a helper thread.
            try:
                ray.init(**kwargs)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ClusterUnavailableError(f"could not start a local Ray cluster: {first}") from exc
            return
        where = f"the Ray cluster at {self.address!r}"
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[None] = loop.create_future()

        def connect() -> None:
            # A daemon thread, not asyncio.to_thread: a connection that hangs past the timeout must not
            # keep the interpreter from exiting.
            try:
                ray.init(**kwargs)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, outcome, exc)
            else:
                loop.call_soon_threadsafe(_settle, outcome, None)

        threading.Thread(target=connect, name="keystate-ray-connect", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(outcome), self.connect_timeout)
        except TimeoutError:
            raise ClusterUnavailableError(
                f"could not connect to {where} within {self.connect_timeout:g} s (RayExecutor(connect_timeout=...))"
            ) from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterUnavailableError(f"could not connect to {where}: {first}") from exc

    def shutdown(self) -> None:
        """Disconnect from the cluster (and stop a local cluster this process started)."""
        ray = import_ray()
        if ray.is_initialized():
            ray.shutdown()

    # --- deployment ----------------------------------------------------------------------------------

    async def deploy(self, run: JobRun, attempt: int, restore: Mapping[SubtaskId, TaskRestore]) -> Deployment:
        ray = import_ray()
        from keystate.runtime.ray._driver import RayDeployment
        from keystate.runtime.ray._messages import restore_payload
        from keystate.runtime.ray._worker import ConsumerEdge, SubtaskWorker, WorkerBlueprint

        if self._actor_class is None:
            self._actor_class = ray.remote(SubtaskWorker)
        graph, config = run.graph, run.config
        wiring = wire(graph)
        max_p = run.max_parallelism
        # The workers open the storage themselves: a relative path is resolved here, once.
        checkpoint = dataclasses.replace(config.checkpoint, storage=_absolute(config.checkpoint.storage))
        storage = run.coordinator.storage
        # Channel numbering: the position in the consumer's gate, and in the producer's output list.
        gate_index: dict[tuple[SubtaskId, SubtaskId], int] = {}
        for consumer, channels in wiring.inputs.items():
            for c, (producer, _k) in enumerate(channels):
                gate_index[producer, consumer] = c
        out_index: dict[tuple[SubtaskId, SubtaskId], int] = {}
        output_channels: dict[SubtaskId, list[tuple[str, int]]] = {}
        for producer, edges in wiring.outputs.items():
            listed: list[tuple[str, int]] = []
            for edge in edges:
                for target in edge.targets:
                    consumer = SubtaskId(edge.consumer, target)
                    out_index[producer, consumer] = len(listed)
                    listed.append((str(consumer), gate_index[producer, consumer]))
            output_channels[producer] = listed
        actors: dict[SubtaskId, Any] = {}
        for spec in graph.operators.values():
            for i in range(spec.parallelism):
                sub = SubtaskId(spec.uid, i)
                outputs = []
                for edge in wiring.outputs.get(sub, []):
                    down = graph.operators[edge.consumer]
                    targets = {t: gate_index[sub, SubtaskId(edge.consumer, t)] for t in edge.targets}
                    outputs.append(
                        ConsumerEdge(edge, down.inputs[edge.input_index], down.key_serializer, down.parallelism,
                                     max_p[edge.consumer], targets)
                    )  # fmt: skip
                task_restore = restore.get(sub)
                blueprint = WorkerBlueprint(
                    job_id=run.job_id,
                    spec=spec,
                    index=i,
                    attempt=attempt,
                    max_parallelism=max_p[spec.uid],
                    checkpoint=checkpoint,
                    state_backend=config.state_backend,
                    channel_capacity=config.channel_capacity,
                    batch_size=config.batch_size,
                    wait_for_final_checkpoint=run.wait_for_final_checkpoint,
                    inputs=[(str(p), out_index[p, sub], k) for p, k in wiring.inputs.get(sub, [])],
                    outputs=outputs,
                    restore=None if task_restore is None else restore_payload(task_restore, storage),
                    output_channels=output_channels.get(sub, []),
                )
                name = f"keystate-{run.job_id[:8]}-{sub.uid}-{i}-a{attempt}"
                actors[sub] = self._actor_class.options(name=name, max_restarts=0, **self.actor_options).remote(
                    blueprint
                )
        deployment = RayDeployment(run, actors)
        peers = {str(sub): actor for sub, actor in actors.items()}
        try:
            pids = await asyncio.gather(*(actor.connect.remote(peers) for actor in actors.values()))
            for task, pid in zip(deployment.tasks.values(), pids, strict=True):
                task.pid = pid
            await asyncio.gather(*(actor.start.remote() for actor in actors.values()))
        except BaseException:
            await deployment.close()
            raise
        return deployment


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _absolute(storage: str) -> str:
    location = parse_location(storage)
    return str(location) if location.scheme == "file" else storage


def _sinks(graph: JobGraph) -> set[str]:
    used = {i.source for spec in graph.operators.values() for i in spec.inputs}
    return {uid for uid in graph.operators if uid not in used}


def _check_picklable(dumps: Any, obj: object, what: str) -> None:
    if obj is None:
        return
    try:
        dumps(obj)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotShippableError(f"{what} cannot be shipped to a Ray worker: it cannot be pickled ({first})") from exc


def actor_of(client: JobClient, sub: SubtaskId) -> Any:
    """The Ray actor (``ActorHandle``) running subtask ``sub`` in the job's current attempt.

    Raises:
        LookupError: the job does not run on Ray, is between attempts, or has no such subtask.
    """
    from keystate.runtime.ray._driver import RayDeployment

    deployment = client.deployment
    if not isinstance(deployment, RayDeployment):
        raise LookupError(f"job {client.job_id} has no deployment on Ray right now")  # noqa: TRY004
    task = deployment.tasks.get(sub)
    if task is None:
        raise LookupError(f"job {client.job_id} has no subtask {sub}")
    return task.actor
