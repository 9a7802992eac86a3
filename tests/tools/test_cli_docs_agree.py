"""The CLI does what docs/cli.md and docs/ci.md say: exit codes, what the first line of check-restore
names, counts in words ("1 violation", not "1 violations"), and the CI snippet's exit code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keystate.runtime.demo import _count
from keystate.statebackend import JsonSerializer, ListStateDescriptor
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CompletedCheckpoint,
    OperatorState,
    StreamOptions,
    SubtaskState,
    open_storage,
)
from tests.tools.conftest import JOB_ID, TIMESTAMP, Cli

DOCS = Path(__file__).resolve().parents[2] / "docs"


# --- list: a missing root is unreadable input (exit 2), an empty one lists nothing (exit 0) -----------


def test_list_on_a_missing_root_exits_2_with_one_line(cli: Cli, tmp_path: Path) -> None:
    result = cli("list", str(tmp_path / "nope"))
    assert (result.code, result.out) == (2, "")
    assert result.err == f"keystate: error: Cannot list checkpoints at '{tmp_path / 'nope'}': no such directory\n"
    as_json = cli("list", str(tmp_path / "nope"), "--json")
    assert as_json.code == 2
    assert json.loads(as_json.out)["error"]["kind"] == "checkpoint_not_found"
    uri = cli("list", f"file://{tmp_path / 'nope'}")
    assert uri.code == 2, uri


def test_list_on_a_file_exits_2(cli: Cli, golden_root: Path) -> None:
    result = cli("list", str(golden_root / JOB_ID / "chk-7" / "_metadata"))
    assert result.code == 2
    assert "is not a directory" in result.err
    assert result.err.count("\n") == 1


def test_list_on_an_existing_empty_root_exits_0(cli: Cli, tmp_path: Path) -> None:
    result = cli("list", str(tmp_path))
    assert (result.code, result.out, result.err) == (0, "no completed checkpoints or savepoints\n", "")
    doc = json.loads(cli("list", str(tmp_path), "--json").out)
    assert doc == {"root": str(tmp_path), "checkpoints": []}


# --- check-restore names what it checked ---------------------------------------------------------------


def _topology_of(root: Path, tmp_path: Path, **overrides: object) -> Path:
    doc = json.loads(open_storage(str(root)).resolve().metadata.topology().to_json_bytes())
    for op in doc["operators"]:
        changes: dict[str, object] = overrides.get(op["uid"], {})  # type: ignore[assignment]
        for key, value in changes.items():
            if value is None:
                op.pop(key, None)
            else:
                op[key] = value
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(doc))
    return path


def test_check_restore_first_line_names_kind_id_and_location(cli: Cli, golden_root: Path, tmp_path: Path) -> None:
    location = golden_root / JOB_ID / "chk-7"
    result = cli("check-restore", str(golden_root), "--topology", str(_topology_of(golden_root, tmp_path)))
    assert result.code == 0
    assert result.out == f"compatible: checkpoint 7 at {location} can be restored into the topology (3 operators)\n"


def test_check_restore_names_a_savepoint_as_a_savepoint(cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "root"
    savepoint = write_one_handle_checkpoint(root, savepoint=True)
    topology = _topology_of(root, tmp_path, sink={"parallelism": 200, "max_parallelism": None})
    result = cli("check-restore", str(root), "--topology", str(topology))
    assert result.code == 1
    first = result.out.splitlines()[0]
    assert first == f"incompatible: savepoint 3 at {savepoint.location} cannot be restored (1 violation)"


# --- counts in words ------------------------------------------------------------------------------------


def write_one_handle_checkpoint(root: Path, *, savepoint: bool = False) -> CompletedCheckpoint:
    """A checkpoint (or savepoint) 3 of one operator 'sink' (p=1, max 128) with one operator-state handle."""
    storage = open_storage(str(root), options=StreamOptions(inline_threshold=0))  # a file, not inline state
    writer = storage.begin_savepoint(JOB_ID, 3) if savepoint else storage.begin_checkpoint(JOB_ID, 3)
    backend = OperatorStateBackend("sink", 0)
    backend.get_list_state(ListStateDescriptor[int](name="pending", serializer=JsonSerializer())).add_all([1, 2])
    handle = backend.snapshot().write(writer, "sink/0/operator")
    assert handle is not None
    kind = CheckpointKind.SAVEPOINT if savepoint else CheckpointKind.CHECKPOINT
    operators = (OperatorState("sink", 1, 128, subtasks=(SubtaskState(0, operator=(handle,)),)),)
    return writer.commit(CheckpointMetadata(3, JOB_ID, kind, TIMESTAMP, operators))


def test_one_of_a_thing_is_not_plural(cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_one_handle_checkpoint(root)
    inspected = cli("inspect", str(root)).out
    assert " raw in 1 handle" in inspected, inspected
    assert "1 handles" not in inspected
    verified = cli("verify", str(root)).out
    assert "verified: 1 handle, " in verified, verified
    topology = _topology_of(root, tmp_path)
    compatible = cli("check-restore", str(root), "--topology", str(topology)).out
    assert compatible.endswith("can be restored into the topology (1 operator)\n"), compatible
    exceeds = _topology_of(root, tmp_path, sink={"parallelism": 200, "max_parallelism": None})
    incompatible = cli("check-restore", str(root), "--topology", str(exceeds)).out
    assert "cannot be restored (1 violation)\n" in incompatible, incompatible
    (next(root.rglob("*.ksf"))).write_bytes(b"damaged")
    failed = cli("verify", str(root)).out
    assert "verification FAILED: 1 of 1 handle is damaged" in failed, failed


def test_the_demo_counts_in_words_too() -> None:
    assert (_count(1, "file"), _count(0, "file"), _count(1200, "record")) == ("1 file", "0 files", "1,200 records")


# --- docs/ci.md: the snippet exits 2 when there is no checkpoint, as its comment says -------------------


def _ci_step() -> str:
    """The GitHub Actions step's script of docs/ci.md, up to (not including) the check-restore call."""
    text = (DOCS / "ci.md").read_text(encoding="utf-8")
    block = text.split("        run: |\n", 1)[1].split("\n```", 1)[0]
    script = textwrap.dedent(block)
    return script.split("\nkeystate check-restore", 1)[0]


@pytest.mark.parametrize("case", ["missing-root", "empty-root", "unreadable-only"])
def test_the_ci_snippet_exits_2_without_a_readable_checkpoint(golden_copy: Path, tmp_path: Path, case: str) -> None:
    root = tmp_path / "nope"
    if case == "empty-root":
        root.mkdir()
    elif case == "unreadable-only":
        root = golden_copy
        (golden_copy / JOB_ID / "chk-7" / "_metadata").write_bytes(b"{")
    result = _run_step(root, tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "checking restore compatibility" not in result.stdout


def test_the_ci_snippet_picks_the_newest_readable_checkpoint(golden_root: Path, tmp_path: Path) -> None:
    result = _run_step(golden_root, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"checking restore compatibility against {golden_root / JOB_ID / 'chk-7'}" in result.stdout


def _run_step(root: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = re.sub(r"(?m)^ROOT=.*$", f"ROOT={root}", _ci_step())
    assert f"ROOT={root}" in script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


# --- dump --state: a name the operator does not have is bad usage, not an empty dump -------------------


def test_dump_of_an_unknown_state_name_exits_2(cli: Cli, golden_root: Path) -> None:
    result = cli("dump", str(golden_root), "--operator", "totals", "--state", "totl")
    assert (result.code, result.out) == (2, "")
    assert "operator 'totals' has no state 'totl' in checkpoint 7 (it has 'history', 'opaque', 'tags', 'total')" in (
        result.err
    )
    assert cli("dump", str(golden_root), "--operator", "sink", "--state", "pending").code == 0
    assert cli("dump", str(golden_root), "--operator", "sink", "--state", "total").code == 2
    # A fully finished operator has no state at all: nothing to refuse, the note says why nothing prints.
    assert cli("dump", str(golden_root), "--operator", "src", "--state", "anything").code == 0
