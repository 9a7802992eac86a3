"""The tools on incremental checkpoints: a chain of three written through the LMDB backend (a base by
checkpoint 1, deltas by 2 and 3, in the job's ``shared/``), with statistics in the metadata.

``inspect`` shows Flink's two sizes, "checkpointed" (written by this checkpoint) and "full" (the state it
represents), and the durations; ``list`` marks incremental checkpoints; ``verify`` reads every file, deltas
included; ``dump`` prints the merged state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystate.statebackend import (
    IntSerializer,
    LmdbKeyedStateBackend,
    StrSerializer,
    ValueStateDescriptor,
    key_group_range_for_subtask,
)
from keystate.statebackend.state import SnapshotOptions
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStatistics,
    HandleScope,
    InputEdge,
    KeyedStateHandle,
    OperatorState,
    OperatorStatistics,
    Partitioning,
    StreamOptions,
    SubtaskState,
    open_storage,
)
from tests.tools.conftest import JOB_ID, TIMESTAMP, Cli


@dataclass(frozen=True)
class Chain:
    root: Path
    handles: list[KeyedStateHandle]
    """The keyed handle of each checkpoint, 1..3."""
    expected: dict[str, int]
    """The merged state of checkpoint 3: key -> value."""

    def checkpoint(self, checkpoint_id: int) -> Path:
        return self.root / JOB_ID / f"chk-{checkpoint_id}"

    def shared_file(self, handle_index: int, stream_index: int) -> Path:
        stream = list(self.handles[handle_index].streams())[stream_index]
        assert stream.scope is HandleScope.SHARED
        assert stream.path is not None
        return self.root / JOB_ID / "shared" / stream.path


def write_chain(root: Path) -> Chain:
    storage = open_storage(str(root), options=StreamOptions(inline_threshold=0))
    backend = LmdbKeyedStateBackend(
        operator_uid="totals",
        subtask_index=0,
        max_parallelism=128,
        key_groups=key_group_range_for_subtask(128, 1, 0),
        key_serializer=StrSerializer(),
    )
    expected: dict[str, int] = {}
    handles = []
    try:
        total = backend.get_state(ValueStateDescriptor[int](name="total", serializer=IntSerializer(), default=0))
        for checkpoint_id in (1, 2, 3):
            end_to_end = 100 + checkpoint_id if checkpoint_id > 1 else None  # checkpoint 1: not recorded
            for i in range(300) if checkpoint_id == 1 else range(0, 300, 50):
                key = f"user-{i:03d}"
                backend.set_current_key(key)
                total.update(checkpoint_id * 1000 + i)
                expected[key] = checkpoint_id * 1000 + i
            if checkpoint_id == 3:
                backend.set_current_key("user-007")
                total.clear()  # a delete: a tombstone in the delta
                del expected["user-007"]
            writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
            snapshot = backend.snapshot(checkpoint_id, SnapshotOptions(incremental=True))
            handle = snapshot.write(writer, "totals/0/keyed")
            assert handle is not None
            handles.append(handle)
            metadata = CheckpointMetadata(
                checkpoint_id,
                JOB_ID,
                CheckpointKind.CHECKPOINT,
                TIMESTAMP + checkpoint_id,
                (
                    OperatorState("src", 1, 128, fully_finished=True),
                    OperatorState(
                        "totals", 1, 128, (InputEdge("src", Partitioning.HASH),),
                        subtasks=(SubtaskState(0, keyed=(handle,)),),
                        statistics=OperatorStatistics(2, 40 + checkpoint_id, 7, 1, end_to_end),
                    ),
                ),
                statistics=CheckpointStatistics(120 + checkpoint_id),
            )  # fmt: skip
            writer.commit(metadata)
            backend.notify_checkpoint_complete(checkpoint_id)
    finally:
        backend.close()
    assert [len(h.deltas) for h in handles] == [0, 1, 2], "the backend wrote a base, then deltas"
    return Chain(root, handles, expected)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return write_chain(tmp_path_factory.mktemp("incremental") / "checkpoints")


def sizes(chain: Chain, checkpoint_id: int) -> tuple[int, int]:
    """(bytes checkpoint ``checkpoint_id`` wrote, bytes it references), from its handle."""
    handle = chain.handles[checkpoint_id - 1]
    streams = list(handle.streams())
    return sum(s.size for s in streams if s.written_by == checkpoint_id), sum(s.size for s in streams)


# --- inspect ------------------------------------------------------------------------------------------


def test_inspect_json_adds_the_two_sizes_and_the_statistics(cli: Cli, chain: Chain) -> None:
    result = cli("inspect", str(chain.checkpoint(3)), "--json")
    assert (result.code, result.err) == (0, "")
    doc = json.loads(result.out)
    written, full = sizes(chain, 3)
    assert 0 < written < full
    assert (doc["incremental_state_bytes"], doc["full_state_bytes"]) == (written, full)
    assert doc["total_state_bytes"] == full, "the contract field is unchanged: the full size"
    assert doc["incremental"] is True
    assert doc["format_version"] == 2
    assert doc["statistics"] == {"duration_ms": 123}
    ops = {o["uid"]: o for o in doc["operators"]}
    assert (ops["totals"]["incremental_state_bytes"], ops["totals"]["full_state_bytes"]) == (written, full)
    assert ops["totals"]["state_bytes"] == full
    assert ops["totals"]["handles"] == 3, "the base and two deltas"
    assert ops["totals"]["statistics"] == {
        "sync_duration_ms": 2, "async_duration_ms": 43, "alignment_duration_ms": 7, "acknowledged_subtasks": 1,
        "end_to_end_duration_ms": 103,
    }  # fmt: skip
    assert (ops["src"]["incremental_state_bytes"], ops["src"]["full_state_bytes"], ops["src"]["statistics"]) == (
        0,
        0,
        None,
    )


def test_inspect_json_of_the_base_checkpoint_is_full(cli: Cli, chain: Chain) -> None:
    doc = json.loads(cli("inspect", str(chain.checkpoint(1)), "--json").out)
    written, full = sizes(chain, 1)
    assert written == full
    assert (doc["incremental_state_bytes"], doc["full_state_bytes"], doc["incremental"]) == (written, full, False)
    totals = next(o for o in doc["operators"] if o["uid"] == "totals")
    assert totals["statistics"]["end_to_end_duration_ms"] is None, "not recorded in this _metadata: null"
    table = cli("inspect", str(chain.checkpoint(1))).out
    assert next(line for line in table.splitlines() if line.startswith("totals")).split()[-1] == "-"


def test_inspect_table_shows_checkpointed_and_full_size_and_durations(cli: Cli, chain: Chain) -> None:
    result = cli("inspect", str(chain.checkpoint(2)))
    assert result.code == 0
    lines = result.out.splitlines()
    written, _ = sizes(chain, 2)
    assert f"size      {written} B checkpointed (written by this checkpoint)" in result.out
    assert "full (incremental)" in result.out
    assert "duration  122 ms (trigger to completion)" in lines
    header = next(line for line in lines if line.startswith("OPERATOR"))
    assert header.split() == ["OPERATOR", "PARALLELISM", "MAX", "PARALLELISM", "STATUS", "CHECKPOINTED", "FULL",
                              "SIZE", "HANDLES", "KEY", "GROUPS", "SYNC", "ASYNC", "ALIGNMENT", "END", "TO",
                              "END"]  # fmt: skip
    totals = next(line for line in lines if line.startswith("totals"))
    assert totals.split()[-8:] == ["2", "ms", "42", "ms", "7", "ms", "102", "ms"]
    assert f"{written} B" in totals
    src = next(line for line in lines if line.startswith("src"))
    assert src.split()[-4:] == ["-", "-", "-", "-"], "no statistics recorded for src"


def test_inspect_operator_lists_base_and_deltas_with_their_writers(cli: Cli, chain: Chain) -> None:
    out = cli("inspect", str(chain.checkpoint(3)), "--operator", "totals").out
    assert "keyed base, written by checkpoint 1" in out
    assert "keyed delta 1/2, written by checkpoint 2" in out
    assert "keyed delta 2/2 " in out
    for stream in chain.handles[2].streams():
        assert f"shared:{stream.path}" in out


# --- list ---------------------------------------------------------------------------------------------


def test_list_marks_incremental_checkpoints(cli: Cli, chain: Chain) -> None:
    doc = json.loads(cli("list", str(chain.root), "--json").out)
    rows = {r["checkpoint_id"]: r for r in doc["checkpoints"]}
    assert {i: r["incremental"] for i, r in rows.items()} == {1: False, 2: True, 3: True}
    for checkpoint_id, row in rows.items():
        assert (row["incremental_state_bytes"], row["full_state_bytes"]) == sizes(chain, checkpoint_id)
        assert row["total_state_bytes"] == row["full_state_bytes"]
        assert row["statistics"] == {"duration_ms": 120 + checkpoint_id}
    table = cli("list", str(chain.root)).out.splitlines()
    assert table[0].split()[:9] == ["KIND", "ID", "JOB", "AGE", "INCREMENTAL", "CHECKPOINTED", "FULL", "SIZE",
                                    "DURATION"]  # fmt: skip
    by_id = {line.split()[1]: line.split() for line in table[1:]}  # AGE is two words: "3m ago"
    assert [by_id[i][5] for i in ("1", "2", "3")] == ["no", "yes", "yes"]
    assert by_id["3"][6:8] == [str(sizes(chain, 3)[0]), "B"]
    assert [by_id[i][10:12] for i in ("1", "2", "3")] == [["121", "ms"], ["122", "ms"], ["123", "ms"]]


# --- verify -------------------------------------------------------------------------------------------


def test_verify_reads_every_file_deltas_included(cli: Cli, chain: Chain) -> None:
    result = cli("verify", str(chain.checkpoint(3)), "--json")
    assert result.code == 0, result.out
    verification = json.loads(result.out)["verification"]
    assert verification["ok"] is True
    assert verification["handles"] == 3
    assert verification["bytes"] == sizes(chain, 3)[1]


@pytest.mark.parametrize("stream_index", [0, 1, 2], ids=["base", "delta-1", "delta-2"])
def test_verify_finds_a_damaged_shared_file(cli: Cli, tmp_path: Path, stream_index: int) -> None:
    chain = write_chain(tmp_path / "checkpoints")
    damaged = chain.shared_file(2, stream_index)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = cli("verify", str(chain.checkpoint(3)), "--json")
    assert result.code == 1
    verification = json.loads(result.out)["verification"]
    [failure] = verification["failures"]
    stream = list(chain.handles[2].streams())[stream_index]
    assert failure["handle"] == f"shared:{stream.path}"
    table = cli("verify", str(chain.checkpoint(3))).out
    assert "verification FAILED: 1 of 3 handles is damaged" in table


def test_verify_finds_a_missing_delta(cli: Cli, tmp_path: Path) -> None:
    chain = write_chain(tmp_path / "checkpoints")
    chain.shared_file(2, 1).unlink()
    result = cli("verify", str(chain.checkpoint(3)))
    assert result.code == 1
    assert "1 of 3 handles is damaged" in result.out
    assert cli("verify", str(chain.checkpoint(1))).code == 0, "checkpoint 1 does not reference the delta"


# --- dump ---------------------------------------------------------------------------------------------


def test_dump_prints_the_merged_state(cli: Cli, chain: Chain) -> None:
    result = cli("dump", str(chain.checkpoint(3)), "--operator", "totals")
    assert result.code == 0, result.err
    records = [json.loads(line) for line in result.out.splitlines()]
    assert {r["key"]: r["value"] for r in records} == chain.expected
    assert len(records) == len(chain.expected), "each key once, deleted keys not at all"
    older = [json.loads(line) for line in cli("dump", str(chain.checkpoint(1)), "--operator", "totals").out.split()]
    assert {r["key"]: r["value"] for r in older}["user-050"] == 1050


# --- Apache Flink checkpoints -------------------------------------------------------------------------


def test_a_flink_checkpoint_reports_flinks_checkpointed_size(cli: Cli, tmp_path: Path) -> None:
    """Flink's "Checkpointed Data Size" is the sum of getCheckpointedSize(): stored by RocksDB incremental
    (type 11) and changelog handles, the state size for the others; a type-5 RocksDB handle stores none, so
    an operator holding one has no known checkpointed size."""
    from tests.flink import _samples, _writer

    directory = tmp_path / "4635591fc76af4447d9450ba3a37a9ff" / "chk-9"
    directory.mkdir(parents=True)
    (directory / "_metadata").write_bytes(_writer.metadata(_samples.checkpoint(6)))
    doc = json.loads(cli("inspect", str(directory), "--json").out)
    ops = {o["uid"]: o for o in doc["operators"]}
    keyed = ops["keyed"]
    assert keyed["full_state_bytes"] == keyed["state_bytes"]
    # ROCKSDB, CHANGELOG and CHANGELOG_V1 record what they wrote (4096, 77, 7): less than their state size.
    assert keyed["incremental_state_bytes"] < keyed["full_state_bytes"]
    rocksdb = _samples.ROCKSDB
    assert keyed["full_state_bytes"] - keyed["incremental_state_bytes"] == (
        rocksdb.state_size - 4096 + _samples.CHANGELOG.state_size - 77 + _samples.CHANGELOG_V1.state_size - 7
    )
    more = next(o for o in doc["operators"] if o["name"] == "more")  # no uid in the file: its operator ID
    assert more["incremental_state_bytes"] is None, "a type-5 RocksDB handle records no checkpointed size"
    assert ops["src"]["incremental_state_bytes"] == ops["src"]["full_state_bytes"] == 16, "coordinator state"
    assert (doc["incremental_state_bytes"], doc["incremental"], doc["statistics"]) == (None, None, None)
    assert doc["full_state_bytes"] == doc["total_state_bytes"]
    table = cli("inspect", str(directory)).out
    assert "size      unknown checkpointed (written by this checkpoint)" in table
