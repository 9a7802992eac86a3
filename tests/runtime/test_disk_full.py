"""A job whose checkpoint storage fills up: checkpoints fail with a typed error and are aborted, the
abort's own failure is logged once as a warning (never left in an asyncio task nobody awaits, which
asyncio reports as "Task exception was never retrieved" with a traceback), and no temp file is left.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime import CheckpointFailureReason, JobGraph, JobStatus, Operator, submit
from keystate.statebackend.serializers import BytesSerializer
from keystate.statebackend.state import ListStateDescriptor
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.errors import StorageError
from tests.runtime.e2e_support import (
    Completed,
    EventLog,
    Flag,
    HeldSource,
    MixedSource,
    RecordingFileSink,
    RunningCount,
    job_config,
    run,
    wait_for,
)
from tests.runtime.test_e2e_coordinator import SlowSnapshot, _patch_failure
from tests.small_disk import small_tmpfs, temp_files

NEVER_RETRIEVED = "exception was never retrieved"


class Ballast(Operator):
    """Forwards records; holds ``size`` incompressible bytes in operator list state."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def initialize_state(self) -> None:
        state = self.ctx.get_list_state(ListStateDescriptor[bytes](name="ballast", serializer=BytesSerializer()))
        if not state.get():
            rng = random.Random(self.ctx.subtask_index)
            state.update([rng.randbytes(256 << 10) for _ in range(self.size // (256 << 10))])

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)


def _never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if NEVER_RETRIEVED in r.getMessage()]


FAILING = 3
"""The checkpoint whose sink stream fails, so that it is aborted."""


def _held_job(out: Path, release: Flag) -> JobGraph:
    """Source -> forward -> keyed count -> sink; the source's 300 records end only once ``release`` is set."""
    job = JobGraph("disk-full-abort")
    source = job.source(HeldSource([300], release, rates=[800.0]), uid="source", parallelism=1)
    forward = source.transform(SlowSnapshot(0.0), uid="slow", parallelism=1)
    forward.key_by(lambda r: r[1] % 4).process(RunningCount(), uid="count", parallelism=2).sink(
        RecordingFileSink(str(out), EventLog()), uid="sink"
    )
    return job


@pytest.mark.parametrize("error", ["oserror", "storage-error"])
def test_an_abort_that_fails_is_logged_once_as_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: str
) -> None:
    """Regression: the abort ran in ``asyncio.to_thread`` in a task nobody awaited; the ENOSPC the local
    writer's close raised then (an OSError) was printed by asyncio when the task was collected.

    The source holds its end until checkpoint 3 has been aborted: a paced source alone catches up after
    a stall of the event loop (a loaded machine), and the job then finished before checkpoint 3 was
    triggered, with nothing aborted.
    """
    injected = Flag()
    _patch_failure(monkeypatch, "stream", FAILING, injected)  # checkpoint 3 fails, and is aborted
    aborts = Flag()
    aborted_failing = Flag()  # set once checkpoint 3's abort ran: then the source may end

    def abort(self: CheckpointWriter) -> None:
        aborts.value += 1
        if self.checkpoint_id == FAILING:
            aborted_failing.value = 1
        if error == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise StorageError(f"cannot delete {self.location}: no space left on device; free disk space")

    monkeypatch.setattr(CheckpointWriter, "abort", abort)

    async def scenario() -> JobStatus:
        config = job_config(tmp_path, interval=0.03, tolerable_failed_checkpoints=5)
        client = submit(_held_job(tmp_path / "out", aborted_failing), config)
        return (await client.wait()).status

    with caplog.at_level(logging.WARNING):
        assert run(scenario()) is JobStatus.FINISHED  # asyncio debug mode
        gc.collect()  # a task with an unretrieved exception reports it when collected
    assert injected.value >= 1, "checkpoint 3's sink stream was never opened"
    assert aborted_failing.value == 1
    assert aborts.value >= 1
    assert _never_retrieved(caplog) == []
    warnings = [r for r in caplog.records if "could not remove the files of aborted checkpoint" in r.getMessage()]
    assert len(warnings) == aborts.value, [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert all("No space left on device" in m or "no space left" in m for m in (r.getMessage() for r in warnings))
    assert not any(r.exc_info for r in warnings), "one line, no traceback"


def test_a_job_whose_checkpoints_do_not_fit_on_the_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints on a 3 MiB tmpfs, 4 MiB of state: each fails with a typed disk-full error, is aborted
    and cleaned up, the job goes on (until canceled), and nothing is left on the disk."""
    completed = Completed()
    with small_tmpfs(tmp_path / "small", "3m") as disk:
        job = JobGraph("disk-full")
        source = job.source(MixedSource([None], rates=[400.0]), uid="source", parallelism=1)
        source.transform(Ballast(2 << 20), uid="ballast", parallelism=2).sink(
            RecordingFileSink(str(tmp_path / "out"), EventLog()), uid="sink"
        )
        config = job_config(tmp_path, interval=0.05, tolerable_failed_checkpoints=1000, inline_threshold=0)
        config = dataclasses.replace(
            config, checkpoint=dataclasses.replace(config.checkpoint, storage=str(disk / "checkpoints"))
        )

        async def scenario() -> JobStatus:
            client = submit(job, config)
            completed.watch(client)
            await wait_for(lambda: len(completed.failures) >= 4, within=60, what="four failed checkpoints")
            return (await client.cancel()).status

        with caplog.at_level(logging.WARNING):
            status = run(scenario())
            gc.collect()
        failures = [m for _, reason, m in completed.failures if reason is not CheckpointFailureReason.JOB_FAILOVER]
        assert status is JobStatus.CANCELED, failures
        assert len(failures) >= 4
        assert all("no space left on device" in m for m in failures), failures
        assert not completed.checkpoints
        assert _never_retrieved(caplog) == []
        assert temp_files(disk) == []
        assert [p for p in disk.rglob("*") if p.is_file()] == []  # every aborted checkpoint's files are gone
