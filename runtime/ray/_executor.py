"""The Ray executor: every subtask in a Ray actor (its own worker process), the coordinator in the driver.

``ray`` is imported here only when the executor is used (``check``, ``start``, ``deploy``), so
``import keystate.runtime`` and even ``from keystate.runtime.ray import RayExecutor`` stay light and work
without Ray installed; using the executor without Ray raises :class:`ExecutorUnavailableError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keystate.runtime.executor import (
    ClusterConflictError,
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
        address: the cluster: ``None`` starts a new local Ray cluster in this process (unless Ray is already
            initialized, which is then used, or ``RAY_ADDRESS`` names a cluster, as for ``ray.init()``; a
            cluster already running on this machine is not joined: ``"auto"`` does that); ``"auto"`` joins
            the cluster of this machine, ``"host:port"`` or ``"ray://host:10001"`` (Ray client) a remote one.
        connect_timeout: seconds to connect to a cluster at ``address`` before :class:`ClusterUnavailableError`:
            the TCP reachability check of ``host:port`` (retried until the time runs out) and ``ray.init``
            together. A local cluster's start (``address=None``) is not bounded by it: it runs on the
            event loop's thread (Ray's processes die with the thread that started them) and fails on its own.
        runtime_env: Ray's runtime environment for the workers (``pip``, ``env_vars``, ``working_dir``, ...);
            keystate must be importable in the workers. Given to ``ray.init`` when the executor initialises
            Ray; with Ray already initialised by someone else it cannot be applied (see :meth:`start`).
        num_cpus: CPUs of a local cluster this executor starts (``None``: Ray's default, all cores); only
            with ``address=None``, as Ray refuses it when connecting to an existing cluster.
        actor_options: Ray actor options of every subtask's actor (default ``{"num_cpus": 0}``: a subtask
            reserves no CPU, so a job of any parallelism fits on a small cluster).

    Raises:
        ValueError: ``connect_timeout`` is not positive, or ``num_cpus`` is given with an ``address``.
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
        if num_cpus is not None and address is not None:
            raise ValueError(
                f"num_cpus sizes a local cluster the executor starts (address=None); the cluster at {address!r} "
                "has its own CPUs (give num_cpus to `ray start` there, or leave it out)"
            )
        self.address = address
        self.connect_timeout = connect_timeout
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.num_cpus = num_cpus
        self.actor_options = dict(actor_options) if actor_options is not None else {"num_cpus": 0}
        self._actor_class: Any = None
        self._owns_session = False
        """This executor initialised the process's Ray session (connected, or started a local cluster)."""

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
            parts: list[tuple[str, object]] = []
            if spec.source is not None:  # before the operator that wraps it, so the source is the one named
                parts.append((f"source {type(spec.source).__name__}", spec.source))
            role = "source" if spec.source is not None else ("sink" if spec.uid in _sinks(graph) else "operator")
            parts.append((f"{role} {type(spec.prototype).__name__}", spec.prototype))
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

        If Ray is already initialised in this process by someone else (your own ``ray.init``), that session
        is used, and the executor's own settings are checked against it rather than dropped:

        - ``address``: must name the session's cluster (the same GCS ``host:port``; ``"auto"``: a cluster
          with a node on this machine; ``"ray://..."``: a Ray Client session), else ``ClusterConflictError``;
        - ``runtime_env``: is fixed when Ray is initialised, so unless it equals the session's own it cannot
          be applied: ``ClusterConflictError`` (give it to your ``ray.init``, or per actor through
          ``actor_options={"runtime_env": ...}``);
        - ``num_cpus``: does not apply to a running session; a WARNING names it if the session's CPUs differ.

        Raises:
            ExecutorUnavailableError: Ray is not installed.
            ClusterUnavailableError: the cluster was not reached in time.
            ClusterConflictError: Ray is already initialised with another cluster or runtime environment.
            StorageNotSharedError: a local checkpoint path while the cluster has more than one node.
        """
        ray = import_ray()
        if not ray.is_initialized():
            await self._connect(ray)
            self._owns_session = True
        elif not self._owns_session:
            self._check_session(ray)
        location = parse_location(run.config.checkpoint.storage)
        if location.scheme == "file":
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if len(nodes) > 1:
                raise StorageNotSharedError(
                    f"checkpoint storage {location} is a local path, but the Ray cluster has {len(nodes)} nodes: "
                    "workers on other nodes cannot write there; use s3://bucket/prefix "
                    "(CheckpointConfig(storage=...))"
                )

    def _check_session(self, ray: Any) -> None:
        """Compare this executor's settings with the Ray session someone else initialised (see :meth:`start`)."""
        via_client = bool(ray.util.client.ray.is_connected())
        gcs = None if via_client else str(ray.get_runtime_context().gcs_address)
        running = "a Ray Client session" if via_client else f"the cluster at {gcs!r}"
        if self.address is not None:
            if self.address.startswith("ray://"):
                # The server address of a Ray Client session has no public accessor: a client session is taken
                # to be the one meant (Ray allows one per process).
                same = via_client
            elif self.address == "auto":
                same = gcs is not None and _is_local(gcs.rpartition(":")[0], ray)
            else:
                same = gcs is not None and _same_endpoint(self.address, gcs, ray)
            if not same:
                raise ClusterConflictError(
                    f"RayExecutor(address={self.address!r}) but Ray is already initialised in this process, "
                    f"connected to {running}; use RayExecutor() to run there, or ray.shutdown() first"
                )
        if self.runtime_env is not None:
            current = dict(ray.get_runtime_context().runtime_env or {})
            if current != self.runtime_env:
                raise ClusterConflictError(
                    "RayExecutor(runtime_env=...) cannot be applied: Ray is already initialised in this process "
                    "and its runtime environment was fixed then; pass it to your ray.init(runtime_env=...), or "
                    "per actor as RayExecutor(actor_options={'runtime_env': ...})"
                )
        if self.num_cpus is not None:
            cpus = ray.cluster_resources().get("CPU")
            if cpus is None or int(cpus) != self.num_cpus:
                log.warning(
                    "RayExecutor(num_cpus=%d) does not apply: Ray is already initialised in this process (%s, %s "
                    "CPUs), and the job runs there",
                    self.num_cpus,
                    running,
                    "unknown" if cpus is None else f"{cpus:g}",
                )

    async def _connect(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.runtime_env is not None:
            kwargs["runtime_env"] = self.runtime_env
        if self.address is None:
            if os.environ.get("RAY_ADDRESS"):
                # Ray's convention (a script run by `ray job submit`): the cluster named there, as ray.init() does.
                if self.num_cpus is not None:
                    log.warning("RayExecutor(num_cpus=%d) does not apply: RAY_ADDRESS names a cluster", self.num_cpus)
            else:
                # "local": a new cluster of this process, never one that ray.init() would find running on this
                # machine (another user's `ray start`, another process's cluster).
                kwargs["address"] = "local"
                if self.num_cpus is not None:
                    kwargs["num_cpus"] = self.num_cpus
            # On this thread, blocking the loop for the few seconds the start takes: Ray's processes die with
            # the thread that started them (PR_SET_PDEATHSIG), so never from a helper thread.
            try:
                ray.init(**kwargs)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ClusterUnavailableError(f"could not start a local Ray cluster: {first}") from exc
            return
        kwargs["address"] = self.address
        kwargs.pop("include_dashboard")
        where = f"the Ray cluster at {self.address!r}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        await self._reachable(where, deadline)
        outcome: asyncio.Future[None] = loop.create_future()

        def connect() -> None:
            # A daemon thread, not asyncio.to_thread: a connection that hangs past the timeout must not
            # keep the interpreter from exiting. Ray warns that it sets no SIGTERM handler off the main
            # thread; that is intended here, and the line would only puzzle a user.
            worker_log = logging.getLogger("ray._private.worker")
            worker_log.addFilter(_no_sigterm_warning)
            try:
                ray.init(**kwargs)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, outcome, exc)
            else:
                loop.call_soon_threadsafe(_settle, outcome, None)
            finally:
                worker_log.removeFilter(_no_sigterm_warning)

        threading.Thread(target=connect, name="keystate-ray-connect", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(outcome), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            raise ClusterUnavailableError(
                f"could not connect to {where} within {self.connect_timeout:g} s (RayExecutor(connect_timeout=...))",
                address=self.address,
                timeout=self.connect_timeout,
            ) from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterUnavailableError(f"could not connect to {where}: {first}", address=self.address) from exc

    async def _reachable(self, where: str, deadline: float) -> None:
        """Wait until ``host:port`` of the address accepts a TCP connection, retrying until ``deadline``.

        Before ``ray.init``: an address nobody listens on then fails here, with one message and none of Ray's
        own log lines (its C++ client logs to stderr before any Python setting applies). ``"auto"`` has no
        host to try (Ray finds the local cluster itself, and fails at once if there is none).
        """
        assert self.address is not None
        endpoint = _endpoint(self.address)
        if endpoint is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(*endpoint), max(deadline - loop.time(), 0.001)
                )
            except (OSError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
                if loop.time() + _PROBE_PAUSE >= deadline:
                    raise ClusterUnavailableError(
                        f"could not connect to {where} within {self.connect_timeout:g} s: {problem} "
                        "(RayExecutor(connect_timeout=...))",
                        address=self.address,
                        timeout=self.connect_timeout,
                    ) from exc
                await asyncio.sleep(_PROBE_PAUSE)  # a head node that is (re)starting: try again
            else:
                writer.close()
                return

    def shutdown(self) -> None:
        """Shut down the Ray session this executor initialised: its connection to a cluster, or the local
        cluster it started. A session initialised by someone else (your ``ray.init``) is left running."""
        if not self._owns_session:
            log.debug("RayExecutor.shutdown: Ray was initialised by someone else, left running")
            return
        self._owns_session = False
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
            placed = await asyncio.gather(*(actor.connect.remote(peers) for actor in actors.values()))
            for task, (pid, node_id) in zip(deployment.tasks.values(), placed, strict=True):
                task.pid, task.node_id = pid, node_id
            await asyncio.gather(*(actor.start.remote() for actor in actors.values()))
        except BaseException:
            await deployment.close()
            raise
        return deployment


_PROBE_PAUSE = 0.2
"""Seconds between two TCP reachability checks of a cluster address."""


def _no_sigterm_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def _endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``"host:port"`` or ``"ray://host:port"`` (``None``: ``"auto"``, or no port)."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


def _is_local(host: str, ray: Any) -> bool:
    """Whether ``host`` is this machine: a loopback address, or the address Ray knows this node by."""
    node = str(ray.util.get_node_ip_address())
    return any(a == node or ipaddress.ip_address(a).is_loopback for a in _addresses(host) if _is_ip(a))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _same_endpoint(address: str, gcs: str, ray: Any) -> bool:
    """Whether ``address`` (``"host:port"``) names the GCS at ``gcs``: the same port, and hosts that resolve to
    a common address or are both this machine (``localhost:6379`` is the local node's ``10.0.0.5:6379``)."""
    mine, theirs = _endpoint(address), _endpoint(gcs)
    if mine is None or theirs is None or mine[1] != theirs[1]:
        return False
    if _addresses(mine[0]) & _addresses(theirs[0]):
        return True
    return _is_local(mine[0], ray) and _is_local(theirs[0], ray)


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
