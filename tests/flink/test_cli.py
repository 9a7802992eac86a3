"""The read-only commands on Apache Flink checkpoints and savepoints (local disk): ``inspect`` (text, JSON,
``--operator``), ``list`` on a root that mixes keystate and Flink checkpoints, ``verify`` (files, sizes,
rebased absolute paths, paths of another machine, paths that would leave the root), ``check-restore``'s
report of dropped and empty operators, and the refusals (``dump``, ``--graph``, unsupported versions).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keystate.storage.errors import CheckpointDiscardedError
from keystate.storage.format import KeyGroupRange
from keystate.storage.format.flink import (
    FileStateHandle,
    FlinkHandleType,
    FlinkOperatorState,
    FlinkStateScope,
    FlinkStreamHandle,
    FlinkSubtaskState,
    KeyGroupsStateHandle,
    RelativeFileStateHandle,
    SegmentFileStateHandle,
    flink_operator_id,
)
from keystate.tools.cli import main
from keystate.tools.summary import load_location, verify_checkpoint
from tests.flink import _writer
from tests.tools.conftest import JOB_ID as KEYSTATE_JOB
from tests.tools.conftest import write_golden_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ALL = sorted(
    str(p.relative_to(FIXTURES))
    for group in ("flink-2.3.0", "generated-flink-2.3.0", "generated-flink-1.20.5")
    for p in (FIXTURES / group).iterdir()
    if p.is_dir()
)
JOB = "4635591fc76af4447d9450ba3a37a9ff"  # the job of the flink-2.3.0 hashmap fixtures
CONTRACT = {"format_version", "checkpoint_id", "job_id", "kind", "timestamp", "location", "total_state_bytes",
            "operators"}  # fmt: skip
OPERATOR_CONTRACT = {"uid", "parallelism", "max_parallelism", "status", "finished_subtasks", "state_bytes",
                     "handles", "inputs"}  # fmt: skip


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*argv: str | Path) -> Result:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def metadata_of(fixture: str) -> Path:
    (path,) = (FIXTURES / fixture).glob("**/_metadata")
    return path


# --- inspect -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ALL)
def test_inspect_shows_the_format_and_that_edges_are_unknown(cli: Cli, fixture: str) -> None:
    result = cli("inspect", FIXTURES / fixture)
    assert (result.code, result.err) == (0, "")
    version = 4 if "1.20" in fixture else 6
    assert f"\nformat    Apache Flink, metadata v{version}" in result.out
    assert "taken     unknown" in result.out
    assert "note: Flink's _metadata stores no edges" in result.out


@pytest.mark.parametrize("fixture", ALL)
def test_inspect_json_has_the_contract_fields(cli: Cli, fixture: str) -> None:
    result = cli("inspect", FIXTURES / fixture, "--json")
    assert result.code == 0
    doc = result.json()
    assert set(doc) >= CONTRACT
    assert (doc["source_format"], doc["timestamp"]) == ("flink", None)
    assert doc["format_version"] == doc["flink_metadata_version"] == (4 if "1.20" in fixture else 6)
    path = metadata_of(fixture)
    assert Path(doc["location"]) == path.parent
    savepoint = path.parent.name.startswith("savepoint-")
    assert doc["kind"] == ("savepoint" if savepoint else "checkpoint")
    assert doc["job_id"] == (None if savepoint else path.parent.parent.name)
    assert doc["total_state_bytes"] == sum(o["state_bytes"] for o in doc["operators"])
    dump = json.loads((FIXTURES / fixture / "flink-dump.json").read_text())
    flink = {o["operatorID"]: o for o in dump["operators"]}
    assert {o["operator_id"] for o in doc["operators"]} == set(flink)
    for op in doc["operators"]:
        assert set(op) >= OPERATOR_CONTRACT
        assert (op["inputs"], op["inputs_known"], op["raw_state_bytes"]) == (None, False, None)
        theirs = flink[op["operator_id"]]
        assert op["uid"] == (theirs["uid"] or op["operator_id"])
        assert op["name"] == theirs["name"]
        assert (op["parallelism"], op["max_parallelism"]) == (theirs["parallelism"], theirs["maxParallelism"])
        assert op["state_bytes"] == theirs["stateSize"]
        if theirs["fullyFinished"]:
            assert (op["status"], op["finished_subtasks"]) == ("fully_finished", list(range(op["parallelism"])))


def test_inspect_json_of_a_keystate_checkpoint_says_so(cli: Cli, tmp_path: Path) -> None:
    write_golden_checkpoint(tmp_path)
    doc = cli("inspect", tmp_path, "--json").json()
    assert doc["source_format"] == "keystate"
    assert "flink_metadata_version" not in doc
    assert all(o["inputs_known"] is True for o in doc["operators"])
    assert "format    keystate, metadata v2" in cli("inspect", tmp_path).out


@pytest.mark.parametrize("level", ["root", "job", "checkpoint", "metadata"])
def test_every_level_of_the_layout_names_the_checkpoint(cli: Cli, level: str) -> None:
    path = metadata_of("flink-2.3.0/hashmap-partially-finished-p3")
    location = {"root": path.parents[2], "job": path.parents[1], "checkpoint": path.parent, "metadata": path}[level]
    doc = cli("inspect", location, "--json").json()
    assert (doc["checkpoint_id"], doc["job_id"]) == (18, "ea7d00bc9f4f28f5a98175822e27591d")
    statuses = {o["uid"]: (o["status"], o["finished_subtasks"]) for o in doc["operators"]}
    assert statuses["unbounded-source"] == ("partially_finished", [2])


def test_a_savepoint_shows_the_job_prefix_its_name_holds(cli: Cli) -> None:
    result = cli("inspect", FIXTURES / "generated-flink-2.3.0/hashmap-savepoint-canonical", "--json")
    doc = result.json()
    assert (doc["kind"], doc["job_id"], doc["job_id_prefix"]) == ("savepoint", None, "190105")
    assert doc["flink_properties"]["savepoint_format"] == "CANONICAL"
    text = cli("inspect", FIXTURES / "generated-flink-2.3.0/hashmap-savepoint-canonical").out
    assert text.startswith("savepoint 11 of job 190105...")


def test_a_format_4_checkpoint_names_operators_by_id(cli: Cli) -> None:
    doc = cli("inspect", FIXTURES / "generated-flink-1.20.5/hashmap-fully-finished", "--json").json()
    count = flink_operator_id("unbounded-count")
    ops = {o["operator_id"]: o for o in doc["operators"]}
    assert (ops[count]["uid"], ops[count]["name"]) == (count, None)
    assert ops[count]["max_parallelism"] == 8
    assert ops[count]["key_groups"] == {"covered": 8, "ranges": [[0, 7]]}


@pytest.mark.parametrize("name", ["unbounded-keyed-count", "21f201b45f924f2fc85ce4cebecf6144"])
def test_operator_detail_by_uid_or_operator_id(cli: Cli, name: str) -> None:
    result = cli("inspect", FIXTURES / "flink-2.3.0/rocksdb-incremental", "--operator", name)
    assert result.code == 0, result.err
    detail = result.out.split("\n\n")[-1]
    assert detail.startswith("operator unbounded-keyed-count (ID 21f201b45f924f2fc85ce4cebecf6144)")
    assert "IncrementalRemoteKeyedStateHandle" in detail
    assert "0..63" in detail
    assert "files (" in detail


def test_an_unknown_operator_is_a_usage_error(cli: Cli) -> None:
    result = cli("inspect", FIXTURES / "flink-2.3.0/rocksdb-full", "--operator", "nope")
    assert result.code == 2
    assert "no operator 'nope'" in result.err


def test_graph_and_dump_are_refused_with_a_reason(cli: Cli) -> None:
    graph = cli("inspect", FIXTURES / "flink-2.3.0/rocksdb-full", "--graph")
    assert (graph.code, graph.out) == (2, "")
    assert "stores none" in graph.err
    dump = cli("dump", FIXTURES / "flink-2.3.0/rocksdb-full", "--operator", "sink")
    assert (dump.code, dump.out) == (2, "")
    assert "is an Apache Flink checkpoint" in dump.err
    assert "State Processor API" in dump.err


# --- list --------------------------------------------------------------------------------------------


def test_list_a_root_mixing_keystate_and_flink(cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_golden_checkpoint(root)
    shutil.copytree(metadata_of("flink-2.3.0/hashmap-fully-finished").parents[1], root / JOB)
    sp = metadata_of("generated-flink-2.3.0/hashmap-savepoint-canonical").parent
    shutil.copytree(sp, root / "savepoints" / sp.name)
    result = cli("list", root, "--json")
    assert result.code == 0, result.err
    rows = result.json()["checkpoints"]
    assert [(r["source_format"], r["kind"], r["checkpoint_id"]) for r in rows] == [
        ("keystate", "checkpoint", 7),
        ("flink", "savepoint", 11),
        ("flink", "checkpoint", 3),
    ]
    flink = rows[2]
    assert (flink["job_id"], flink["timestamp"], flink["age_seconds"]) == (JOB, None, None)
    assert flink["operators"] == {"running": 3, "partially_finished": 0, "fully_finished": 2}
    assert rows[0]["job_id"] == KEYSTATE_JOB
    table = cli("list", root).out
    assert "flink checkpoint   3  4635591f  ?" in table
    assert "flink savepoint   11  190105" in table
    # inspect ROOT picks the newest: keystate's has a timestamp, a Flink one has none.
    assert cli("inspect", root, "--json").json()["source_format"] == "keystate"
    assert cli("inspect", root / JOB, "--json").json()["checkpoint_id"] == 3


# --- verify ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ALL)
def test_verify_every_fixture(cli: Cli, fixture: str) -> None:
    result = cli("verify", FIXTURES / fixture)
    assert (result.code, result.err) == (0, ""), result.out
    assert "every file is there with its stated size" in result.out.splitlines()[-1]
    doc = cli("inspect", FIXTURES / fixture, "--verify", "--json").json()
    assert doc["verification"]["ok"] is True
    assert doc["verification"]["handles"] == sum(o["handles"] for o in doc["operators"])
    assert "not_checkable" not in doc["verification"]


def copy_of(fixture: str, tmp_path: Path) -> Path:
    target = tmp_path / "moved" / "elsewhere"
    shutil.copytree(FIXTURES / fixture, target)
    return target


def test_verify_rebases_the_absolute_paths_of_a_moved_checkpoint(cli: Cli, tmp_path: Path) -> None:
    # The _metadata names file:<the generating machine's directory>/<jobId>/shared/<uuid>.
    root = copy_of("flink-2.3.0/rocksdb-incremental", tmp_path)
    assert cli("verify", root).code == 0
    shared = sorted((root / "88cbe526da62863ea7f78fca9bd3c2f0" / "shared").iterdir())
    with shared[0].open("r+b") as f:
        f.truncate(100)
    shared[1].unlink()
    result = cli("verify", root, "--json")
    assert result.code == 1
    failures = result.json()["verification"]["failures"]
    assert sorted(f["error"] for f in failures) == [
        "the file is missing",
        "the handle states 21296 bytes but the file has 100",
    ]
    assert {Path(f["handle"]) for f in failures} == set(shared)
    text = cli("verify", root).out
    assert "verification FAILED: 2 of 22 handles are damaged" in text


def test_verify_a_damaged_relative_file(cli: Cli, tmp_path: Path) -> None:
    root = copy_of("flink-2.3.0/rocksdb-full", tmp_path)
    (path,) = root.glob("*/chk-7/d4dd0a87-*")
    path.write_bytes(path.read_bytes() + b"!")
    result = cli("verify", root, "--json")
    assert result.code == 1
    [failure] = result.json()["verification"]["failures"]
    assert failure["operator"] == "unbounded-keyed-count"
    assert failure["error"] == "the handle states 21291 bytes but the file has 21292"


def write_checkpoint(directory: Path, *streams: FlinkStreamHandle, version: int = 6) -> Path:
    """A one-operator Flink checkpoint whose subtasks hold ``streams`` (as keyed state of key group 0)."""
    subtasks = tuple(
        FlinkSubtaskState(i, managed_keyed_state=KeyGroupsStateHandle(
            FlinkHandleType.KEY_GROUPS_V2, KeyGroupRange(0, 0), (0,), stream, f"id-{i}"))
        for i, stream in enumerate(streams)
    )  # fmt: skip
    op = FlinkOperatorState(flink_operator_id("op"), "op", "op", len(streams), 128, None, subtasks)
    data = _writer.header(version) + _writer.body(3, (op,), version)
    if version >= 4:
        data += _writer.java_properties("checkpoint")
    directory.mkdir(parents=True)
    (directory / "_metadata").write_bytes(data)
    return directory


def test_a_path_of_another_machine_is_not_checkable_and_not_damage(cli: Cli, tmp_path: Path) -> None:
    chk = write_checkpoint(
        tmp_path / JOB / "chk-3",
        FileStateHandle("hdfs://namenode:8020/flink/other/layout/file-1", 10),
        FileStateHandle(f"file:/data/ck/{JOB}/shared/present", 5),
    )
    (tmp_path / JOB / "shared").mkdir()
    (tmp_path / JOB / "shared" / "present").write_bytes(b"12345")
    result = cli("verify", chk, "--json")
    assert result.code == 0, result.out
    verification = result.json()["verification"]
    assert (verification["ok"], verification["handles"], verification["bytes"]) == (True, 2, 5)
    [unchecked] = verification["not_checkable"]
    assert unchecked["handle"] == "hdfs://namenode:8020/flink/other/layout/file-1"
    assert "not checkable here" in unchecked["not_checkable"]
    text = cli("verify", chk).out
    assert "1 handle not checkable here:" in text
    assert "op[0] hdfs://namenode:8020/flink/other/layout/file-1" in text


@pytest.mark.parametrize(
    "stream",
    [
        RelativeFileStateHandle("../../../etc/passwd", 10),
        RelativeFileStateHandle("/etc/passwd", 10),
        FileStateHandle(f"file:/data/ck/{JOB}/../../../etc/passwd", 10),
        FileStateHandle("file:/data/ck/chk-3/../../../../etc/passwd", 10),
    ],
    ids=["relative_dotdot", "relative_absolute", "absolute_dotdot_after_job", "absolute_dotdot_after_chk"],
)
def test_a_path_that_would_leave_the_root_is_damage_and_never_opened(
    cli: Cli, tmp_path: Path, stream: FlinkStreamHandle
) -> None:
    chk = write_checkpoint(tmp_path / "ck" / JOB / "chk-3", stream)
    result = cli("verify", chk, "--json")
    assert result.code == 1
    [failure] = result.json()["verification"]["failures"]
    assert "leaves the checkpoint" in failure["error"]


def test_segments_of_a_merged_file(cli: Cli, tmp_path: Path) -> None:
    merged = f"file:/data/ck/{JOB}/chk-3/merged-1"
    chk = write_checkpoint(
        tmp_path / JOB / "chk-3",
        SegmentFileStateHandle(merged, 0, 60, FlinkStateScope.EXCLUSIVE, "a"),
        SegmentFileStateHandle(merged, 60, 40, FlinkStateScope.EXCLUSIVE, "b"),
    )
    (chk / "merged-1").write_bytes(b"x" * 100)
    assert cli("verify", chk).code == 0
    (chk / "merged-1").write_bytes(b"x" * 99)
    result = cli("verify", chk, "--json")
    assert result.code == 1
    [failure] = result.json()["verification"]["failures"]
    assert failure["subtask"] == 1
    assert failure["error"] == "the segment [60, 100) ends after the end of the 99-byte file"


def test_offsets_outside_their_stream_are_damage(cli: Cli, tmp_path: Path) -> None:
    chk = write_checkpoint(tmp_path / JOB / "chk-3", RelativeFileStateHandle("f", 0))
    (chk / "f").write_bytes(b"")
    metadata = chk / "_metadata"
    assert cli("verify", chk).code == 0  # offset 0 of an empty stream: fine
    handle = KeyGroupsStateHandle(
        FlinkHandleType.KEY_GROUPS_V2, KeyGroupRange(0, 0), (9,), RelativeFileStateHandle("f", 0), "id"
    )
    subtask = FlinkSubtaskState(0, managed_keyed_state=handle)
    op = FlinkOperatorState(flink_operator_id("op"), "op", "op", 1, 128, None, (subtask,))
    metadata.write_bytes(_writer.header(6) + _writer.body(3, (op,), 6) + _writer.java_properties("checkpoint"))
    result = cli("verify", chk, "--json")
    assert result.code == 1
    assert result.json()["verification"]["failures"][0]["error"] == "key-group offset 9 lies outside its 0-byte stream"


# --- unreadable metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_writer.header(7) + b"\x00" * 16, "format version 7 (at byte 4) is not supported"),
        (_writer.header(2) + b"\x00" * 16, "version 2"),
        (_writer.header(6) + b"\x00\x00", "truncated"),
    ],
    ids=["version_7", "version_2", "truncated"],
)
def test_an_unreadable_flink_metadata_is_one_line_on_stderr(cli: Cli, tmp_path: Path, data: bytes, words: str) -> None:
    chk = tmp_path / JOB / "chk-1"
    chk.mkdir(parents=True)
    (chk / "_metadata").write_bytes(data)
    for command in ("inspect", "verify", "list"):
        result = cli(command, tmp_path if command == "list" else chk)
        if command == "list":  # an unreadable checkpoint is listed with its reason, not hidden
            assert result.code == 0
            assert "unreadable" in result.out
            continue
        assert (result.code, result.out) == (2, "")
        assert result.err.count("\n") == 1
        assert words in result.err, result.err


# --- check-restore ---------------------------------------------------------------------------------------


def experiment(flink_version: str, variant: str) -> dict[str, Any]:
    doc = json.loads((FIXTURES / "restore-experiments.json").read_text())
    return next(e for e in doc["experiments"] if (e["flink_version"], e["variant"]) == (flink_version, variant))


def test_check_restore_reports_dropped_state_and_new_operators(cli: Cli, tmp_path: Path) -> None:
    removed = experiment("2.3.0", "remove-running-stateful")
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(removed["topology"]))
    where = FIXTURES / removed["checkpoint"]
    refused = cli("check-restore", where, "--topology", path)
    assert refused.code == 1
    count = "'unbounded-count' (ID d756731be788763974e6911124f48e1d)"
    assert f"[non-restored-state] checkpoint 8 holds state for operator {count}" in refused.out
    allowed = cli("check-restore", where, "--topology", path, "--allow-non-restored-state", "--json")
    assert allowed.code == 0
    doc = allowed.json()
    assert (doc["dropped_state"], doc["starts_empty"]) == (["unbounded-count"], [])
    assert doc["warnings"] == ["the state of 1 operator(s) of checkpoint 8 will be dropped: 'unbounded-count'"]
    text = cli("check-restore", where, "--topology", path, "--allow-non-restored-state").out
    assert "\nwarning: the state of 1 operator(s) of checkpoint 8 will be dropped: 'unbounded-count'" in text
    added = experiment("2.3.0", "new-downstream-of-finished-separate")
    path.write_text(json.dumps(added["topology"]))
    result = cli("check-restore", FIXTURES / added["checkpoint"], "--topology", path)
    assert result.code == 0
    assert result.out.endswith("\nstarts empty (not in the checkpoint): 'new-after'\n")


def test_another_jobs_savepoint_is_compatible_but_warned_about(cli: Cli, tmp_path: Path) -> None:
    other = experiment("2.3.0", "pf-same-job")["topology"]
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(other))
    savepoint = FIXTURES / "generated-flink-2.3.0/hashmap-savepoint-canonical"
    refused = cli("check-restore", savepoint, "--topology", path, "--json").json()
    assert {v["rule"] for v in refused["violations"]} == {"non-restored-state"}
    result = cli("check-restore", savepoint, "--topology", path, "--allow-non-restored-state", "--json")
    assert result.code == 0
    doc = result.json()
    assert doc["compatible"] is True
    assert doc["starts_empty"] == [op["uid"] for op in other["operators"]]
    assert "bounded-source" not in doc["dropped_state"]  # fully finished: no state to drop
    assert "unbounded-count" in doc["dropped_state"]
    assert "is this the checkpoint of another job?" in doc["warnings"][0]
    text = cli("check-restore", savepoint, "--topology", path, "--allow-non-restored-state").out
    assert text.startswith("compatible: savepoint 11 at ")
    assert "\nwarning: no operator of the new topology matches an operator of checkpoint 11" in text


def test_a_checkpoint_deleted_while_verified_is_discarded_not_damaged(tmp_path: Path) -> None:
    root = copy_of("flink-2.3.0/rocksdb-full", tmp_path)
    checkpoint = load_location(str(root))
    for path in metadata_of("flink-2.3.0/rocksdb-full").parent.iterdir():
        (root / path.relative_to(FIXTURES / "flink-2.3.0/rocksdb-full")).unlink()  # Flink's retention
    with pytest.raises(CheckpointDiscardedError, match=r"checkpoint 7 at .* was discarded while it was verified"):
        verify_checkpoint(checkpoint)
