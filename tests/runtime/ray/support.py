"""What the executor-parametrized tests share: observables that work across processes, the executors, jobs.

On the embedded executor every subtask is a deep copy in the test's process; on Ray every subtask is
unpickled in its own worker process. :class:`EventLog` and :class:`Flag` of ``tests.runtime.e2e_support``
rely on ``deepcopy`` returning the same object, which a worker process cannot do, so the tests here use
file-backed versions of both: :class:`FileLog` appends one JSON line per event to a file every process
writes to (``O_APPEND``, one ``write`` per line), and :class:`FileFlag` is a file that exists or not.
Both are plain paths when pickled, and both behave the same on either executor.

Checkpoint storage is a parameter too (:data:`STORAGES`, the ``checkpoints`` fixture of the conftest):
a :class:`CheckpointRoot` on local disk, or an ``s3://`` root on moto's threaded server (real HTTP on
127.0.0.1) with its endpoint in ``CheckpointConfig.endpoint_url``, which is how Ray workers, which do not
share the test's environment, find it; their fake credentials come from the cluster's environment.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from keystate.runtime import JobConfig, Operator
from keystate.storage.checkpoints import CompletedCheckpoint
from tests.runtime.e2e_support import Event, EventLog, Flag, job_config

EXECUTORS = ["embedded", "ray"]
"""The ids of the ``executor`` fixture's parameters."""

STORAGES = ["local", "s3"]
"""The ids of the ``checkpoints`` fixture's parameters."""


@dataclass(frozen=True)
class CheckpointRoot:
    """Where a test's checkpoints go: ``uri`` (a local path or ``s3://bucket/prefix``) and, for S3, the
    endpoint every process (the test's, each Ray worker) reaches it at."""

    uri: str
    endpoint_url: str | None = None

    @property
    def on_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def holds(self, location: str) -> bool:
        """Whether a checkpoint ``location`` (an absolute path or URI) is under this root."""
        return location.startswith(self.uri.rstrip("/") + "/")

    def assert_holds(self, *taken: CompletedCheckpoint) -> None:
        """Every one of ``taken`` (at least one) was written under this root."""
        assert taken, "the scenario completed no checkpoint"
        for checkpoint in taken:
            assert self.holds(checkpoint.location), f"{checkpoint.location} is not under {self.uri}"


class FileLog(EventLog):
    """An :class:`EventLog` kept in a file: ``add`` appends a JSON line, :meth:`read` loads every event.

    ``events`` (and so ``of``, ``names``, ``position``) reads the file each time, so the test sees what
    every process logged so far.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path)
        Path(self.path).touch()

    def __deepcopy__(self, memo: dict[int, Any]) -> FileLog:
        return self

    def add(self, event: Event) -> None:
        line = json.dumps([event.uid, event.index, event.attempt, event.name, event.arg]) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    @property
    def events(self) -> list[Event]:
        text = Path(self.path).read_text()
        return [Event(*json.loads(line)) for line in text.splitlines() if line.endswith("]")]

    @events.setter
    def events(self, value: list[Event]) -> None:
        if value:
            raise AttributeError("a FileLog's events are appended with add()")


class FileFlag(Flag):
    """A :class:`Flag` kept as a file: non-zero while the file exists; setting it creates or removes it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __deepcopy__(self, memo: dict[int, Any]) -> FileFlag:
        return self

    @property
    def value(self) -> int:
        return int(os.path.exists(self.path))

    @value.setter
    def value(self, value: int) -> None:
        if value:
            Path(self.path).touch()
        elif os.path.exists(self.path):
            os.unlink(self.path)


def config_on(executor: Any, tmp_path: Path, *, root: CheckpointRoot | None = None, **kwargs: Any) -> JobConfig:
    """:func:`tests.runtime.e2e_support.job_config` on ``executor`` (``None``: embedded), with checkpoints
    under ``root`` (default: ``tmp_path / "checkpoints"``)."""
    config = replace(job_config(tmp_path, **kwargs), executor=executor)
    if root is None:
        return config
    return replace(config, checkpoint=replace(config.checkpoint, storage=root.uri, endpoint_url=root.endpoint_url))


class PidRecorder(Operator):
    """Forwards records; in ``open`` writes ``<dir>/<uid>-<index>-<attempt>.pid`` with its process id."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)

    async def open(self) -> None:
        ctx = self.ctx
        path = Path(self.directory) / f"{ctx.uid}-{ctx.subtask_index}-{ctx.attempt}.pid"
        path.write_text(str(os.getpid()))

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)


def recorded_pid(directory: Path, uid: str, index: int, attempt: int, *, within: float = 60.0) -> int:
    """The process id :class:`PidRecorder` ``uid[index]`` wrote in ``attempt`` (waits for it)."""
    path = directory / f"{uid}-{index}-{attempt}.pid"
    deadline = time.monotonic() + within
    while not path.exists() or not path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{uid}[{index}] attempt {attempt} never wrote {path.name}")
        time.sleep(0.01)
    return int(path.read_text())


def sigkill(pid: int) -> None:
    """SIGKILL process ``pid`` (a worker's; never the test's own)."""
    assert pid != os.getpid(), "refusing to kill the test process"
    os.kill(pid, signal.SIGKILL)


def process_gone(pid: int) -> Callable[[], bool]:
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    return gone


def worker_environment(root: Path, nowhere: Path) -> dict[str, str]:
    """What Ray's worker processes of a test cluster need: keystate importable from ``root``, moto's test
    credentials, no AWS configuration of this machine (``nowhere`` does not exist), no token auth."""
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(nowhere),
        "AWS_SHARED_CREDENTIALS_FILE": str(nowhere),
        "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),  # a local test cluster, no tokens
    }
