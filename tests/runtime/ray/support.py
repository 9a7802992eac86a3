"""What the executor-parametrized tests share: observables that work across processes, the executors, jobs.

On the embedded executor every subtask is a deep copy in the test's process; on Ray every subtask is
unpickled in its own worker process. :class:`EventLog` and :class:`Flag` of ``tests.runtime.e2e_support``
rely on ``deepcopy`` returning the same object, which a worker process cannot do, so the tests here use
file-backed versions of both: :class:`FileLog` appends one JSON line per event to a file every process
writes to (``O_APPEND``, one ``write`` per line), and :class:`FileFlag` is a file that exists or not.
Both are plain paths when pickled, and both behave the same on either executor.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from keystate.runtime import JobConfig, Operator
from tests.runtime.e2e_support import Event, EventLog, Flag, job_config

EXECUTORS = ["embedded", "ray"]
"""The ids of the ``executor`` fixture's parameters."""


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


def config_on(executor: Any, tmp_path: Path, **kwargs: Any) -> JobConfig:
    """:func:`tests.runtime.e2e_support.job_config` on ``executor`` (``None``: embedded)."""
    return replace(job_config(tmp_path, **kwargs), executor=executor)


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
