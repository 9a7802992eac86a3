"""Readers racing retention on a live root: a checkpoint discarded while it is read is reported as exactly
that (exit 3, naming the newest checkpoint left), never as damage; ``inspect ROOT`` moves on to the next
latest checkpoint and ``list`` leaves out checkpoints that vanish.

Each race is made deterministic: retention runs (a newer checkpoint completes and subsumes the one being
read) at a chosen point between reading ``_metadata`` and reading the state files, on local disk and on
S3 (moto in process).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import (
    CheckpointDiscardedError,
    CheckpointNotFoundError,
    CheckpointStorage,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    NotFoundError,
    StreamHandle,
    open_storage,
)
from keystate.storage.format import StateFileReader
from keystate.tools.summary import verify_checkpoint
from tests.conftest import BUCKET
from tests.storage.checkpoint_support import JOB, OPTIONS, write_state
from tests.tools.conftest import Cli

EXIT_DISCARDED = 3


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "root")
    else:
        request.getfixturevalue("s3_client")  # moto in process: the CLI's own boto3 client is intercepted
        yield f"s3://{BUCKET}/root"


class LiveRoot:
    """A root with a job whose retention keeps ``num_retained`` checkpoints, as a running job's does."""

    def __init__(self, location: str, num_retained: int) -> None:
        self.storage: CheckpointStorage = open_storage(location, options=OPTIONS)
        self.retention = CompletedCheckpointStore(self.storage, JOB, num_retained)

    def complete(self, checkpoint_id: int) -> CompletedCheckpoint:
        writer = self.storage.begin_checkpoint(JOB, checkpoint_id)
        completed = writer.commit(write_state(writer, shared=False, timestamp=checkpoint_id).metadata)
        self.retention.add(completed)
        return completed


def _once(action: Callable[[], object]) -> Callable[[], None]:
    done: list[bool] = []

    def run() -> None:
        if not done:
            done.append(True)
            action()

    return run


def _retention_during_state_reads(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> None:
    """Run ``action`` (retention) right before the first state file is opened: after ``_metadata`` was read."""
    original = CompletedCheckpoint.open_state
    hook = _once(action)

    def open_state(self: CompletedCheckpoint, handle: StreamHandle) -> StateFileReader:
        hook()
        return original(self, handle)

    monkeypatch.setattr(CompletedCheckpoint, "open_state", open_state)


def _retention_before_first_load(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> None:
    """Run ``action`` (retention) right before the first ``_metadata`` is loaded: after the listing."""
    original = CheckpointStorage.load
    hook = _once(action)

    def load(self: CheckpointStorage, directory: str) -> CompletedCheckpoint:
        hook()
        return original(self, directory)

    monkeypatch.setattr(CheckpointStorage, "load", load)


def test_verify_reports_a_checkpoint_discarded_while_it_is_read(
    root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveRoot(root, num_retained=1)
    live.complete(12)
    _retention_during_state_reads(monkeypatch, lambda: live.complete(14))
    result = cli("verify", root)
    assert result.code == EXIT_DISCARDED, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("keystate: error: checkpoint 12 was discarded while it was read (retention"), lines
    assert "the latest is 14" in lines[0]
    assert "chk-14" in lines[0]
    assert "handles are damaged" not in result.err


def test_verify_json_and_inspect_verify_exit_3_too(root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveRoot(root, num_retained=1)
    live.complete(5)
    _retention_during_state_reads(monkeypatch, lambda: live.complete(6))
    result = cli("inspect", f"{root}/{JOB}/chk-5", "--verify", "--json")
    assert result.code == EXIT_DISCARDED, result
    assert json.loads(result.out)["error"]["kind"] == "checkpoint_discarded"  # --json: the error object
    assert "checkpoint 5 was discarded while it was read" in result.err


def test_a_missing_file_of_a_checkpoint_still_there_is_damage(
    root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveRoot(root, num_retained=1)
    completed = live.complete(3)
    handle = next(h for h in completed.metadata.handles() if h.path is not None)
    key = completed.state_key(handle)
    assert key is not None
    live.storage.store.delete(key)
    result = cli("verify", root)
    assert result.code == 1, result
    # (verify also decodes the payloads, which write_state fills with random bytes: the other handles fail too)
    assert "verification FAILED: " in result.out, result
    assert f"{handle.describe}: " in result.out, result


def test_inspect_root_moves_on_to_the_next_latest_checkpoint(
    root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveRoot(root, num_retained=1)
    live.complete(12)
    # Listed: chk-12. Before its _metadata is read, checkpoint 13 completes and retention discards 12.
    _retention_before_first_load(monkeypatch, lambda: live.complete(13))
    result = cli("inspect", root, "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["checkpoint_id"] == 13
    assert result.err == ""


def test_list_leaves_out_checkpoints_that_vanish(root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveRoot(root, num_retained=2)
    live.complete(11)
    live.complete(12)
    # Listed: chk-12 and chk-11. Before they are read, checkpoint 13 completes and 11 is discarded.
    _retention_before_first_load(monkeypatch, lambda: live.complete(13))
    result = cli("list", root, "--json")
    assert result.code == 0, result
    rows: list[dict[str, Any]] = json.loads(result.out)["checkpoints"]
    assert [r.get("error") for r in rows] == [None], rows
    assert [r["checkpoint_id"] for r in rows] == [12]


def test_dump_reports_a_checkpoint_discarded_while_it_is_read(
    root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveRoot(root, num_retained=1)
    live.complete(2)
    _retention_during_state_reads(monkeypatch, lambda: live.complete(3))
    result = cli("dump", root, "--operator", "op")
    assert result.code == EXIT_DISCARDED, result
    assert "checkpoint 2 was discarded while it was read" in result.err
    assert "the latest is 3" in result.err


def test_the_library_raises_a_typed_error_naming_the_latest(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveRoot(root, num_retained=1)
    first = live.complete(7)
    _retention_during_state_reads(monkeypatch, lambda: live.complete(9))
    with pytest.raises(CheckpointDiscardedError) as info:
        verify_checkpoint(first)
    error = info.value
    assert isinstance(error, CheckpointNotFoundError), "a discarded checkpoint is not found, not damaged"
    assert isinstance(error, FileNotFoundError)
    assert (error.checkpoint_id, error.latest_id) == (7, 9)
    assert error.location == first.location
    assert error.latest_location is not None
    assert error.latest_location.endswith("/chk-9")
    assert isinstance(error.__cause__, NotFoundError), "caused by the state file that could not be opened"


def test_a_checkpoint_directory_discarded_before_its_metadata_is_read_exits_3(
    root: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveRoot(root, num_retained=1)
    live.complete(4)
    # The directory named on the command line has _metadata when checked, none when loaded.
    _retention_before_first_load(monkeypatch, lambda: live.complete(5))
    result = cli("inspect", f"{root}/{JOB}/chk-4")
    assert result.code == EXIT_DISCARDED, result
    assert result.out == ""
    assert "checkpoint 4 was discarded while it was read" in result.err
    assert "the latest is 5" in result.err
