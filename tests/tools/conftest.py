"""Checkpoints for the tool tests: a deterministic one built through the real backends and storage
(for golden output), and helpers to run the CLI in process."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystate.statebackend import (
    IntSerializer,
    JsonSerializer,
    ListStateDescriptor,
    LmdbKeyedStateBackend,
    MapStateDescriptor,
    PickleSerializer,
    StrSerializer,
    ValueStateDescriptor,
    key_group_range_for_subtask,
)
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CompletedCheckpoint,
    InputEdge,
    OperatorState,
    Partitioning,
    StreamOptions,
    SubtaskState,
    open_storage,
)
from keystate.tools.cli import run

JOB_ID = "0123456789abcdef0123456789abcdef"
TIMESTAMP = 1_763_900_000_000  # 2025-11-23 12:13:20 UTC


@dataclass
class CliResult:
    code: int
    out: str
    err: str


Cli = Callable[..., CliResult]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def invoke(*argv: str) -> CliResult:
        code = run(list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


def write_golden_checkpoint(root: Path) -> CompletedCheckpoint:
    """chk-7 of a three-operator job: 'src' fully finished, 'totals' (keyed, p=2) partially finished
    with subtask 1 finished, 'sink' running with operator list state."""
    storage = open_storage(str(root), options=StreamOptions(inline_threshold=1024))
    writer = storage.begin_checkpoint(JOB_ID, 7)
    backend = LmdbKeyedStateBackend(
        operator_uid="totals",
        subtask_index=0,
        max_parallelism=128,
        key_groups=key_group_range_for_subtask(128, 2, 0),
        key_serializer=StrSerializer(),
    )
    try:
        total = backend.get_state(ValueStateDescriptor[int](name="total", serializer=IntSerializer(), default=0))
        history = backend.get_state(ListStateDescriptor[int](name="history", serializer=IntSerializer()))
        tags = backend.get_state(MapStateDescriptor[str, str](name="tags", key_serializer=StrSerializer(),
                                                              serializer=StrSerializer()))  # fmt: skip
        opaque = backend.get_state(ValueStateDescriptor[object](name="opaque", serializer=PickleSerializer()))
        owned = 0
        for i in range(400):
            key = f"user-{i:03d}"
            try:
                backend.set_current_key(key)
            except Exception:
                continue  # owned by subtask 1
            owned += 1
            total.update(i * 10)
            history.add_all([i, i + 1])
            tags.put("tier", "gold" if i % 2 else "silver")
            if owned == 1:
                opaque.update({1, 2, 3})
        assert owned > 100
        keyed = backend.snapshot().write(writer, "totals/0/keyed")
    finally:
        backend.close()
    assert keyed is not None
    op_backend = OperatorStateBackend("sink", 0)
    op_backend.get_list_state(ListStateDescriptor[dict[str, int]](name="pending", serializer=JsonSerializer())).add_all(
        [{"checkpoint_id": 6, "records": 12}, {"checkpoint_id": 7, "records": 3}]
    )
    op_handle = op_backend.snapshot().write(writer, "sink/0/operator")
    assert op_handle is not None
    metadata = CheckpointMetadata(
        7,
        JOB_ID,
        CheckpointKind.CHECKPOINT,
        TIMESTAMP,
        (
            OperatorState("src", 2, 128, fully_finished=True),
            OperatorState(
                "totals", 2, 128, (InputEdge("src", Partitioning.HASH),),
                subtasks=(SubtaskState(0, keyed=(keyed,)), SubtaskState(1, finished=True)),
            ),
            OperatorState("sink", 1, 128, (InputEdge("totals", Partitioning.REBALANCE),),
                          subtasks=(SubtaskState(0, operator=(op_handle,)),)),
        ),
    )  # fmt: skip
    return writer.commit(metadata)


@pytest.fixture(scope="session")
def golden_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden") / "checkpoints"
    write_golden_checkpoint(root)
    return root


@pytest.fixture
def golden_copy(golden_root: Path, tmp_path: Path) -> Path:
    """A private copy of the golden checkpoint root that a test may damage."""
    target = tmp_path / "checkpoints"
    shutil.copytree(golden_root, target)
    return target
