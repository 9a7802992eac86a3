"""Golden-output tests of the CLI on a deterministic checkpoint (regenerate with KEYSTATE_REGEN_GOLDEN=1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.tools.conftest import JOB_ID, Cli

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str, root: Path) -> None:
    normalized = text.replace(str(root), "<ROOT>")
    path = GOLDEN / name
    if os.environ.get("KEYSTATE_REGEN_GOLDEN"):
        path.write_text(normalized)
    assert normalized == path.read_text(), f"output differs from {path}; KEYSTATE_REGEN_GOLDEN=1 regenerates"


def test_inspect_table(cli: Cli, golden_root: Path) -> None:
    result = cli("inspect", str(golden_root))
    assert (result.code, result.err) == (0, "")
    check_golden("inspect.txt", result.out, golden_root)
    assert "partially finished [1]" in result.out
    assert "fully finished" in result.out


def test_inspect_json_contract(cli: Cli, golden_root: Path) -> None:
    result = cli("inspect", str(golden_root / JOB_ID / "chk-7"), "--json")
    assert result.code == 0
    check_golden("inspect.json", result.out, golden_root)
    doc = json.loads(result.out)
    # The contract fields (docs/architecture.md#inspect-json-output), all present with the right types.
    for field, kind in {"format_version": int, "checkpoint_id": int, "job_id": str, "kind": str, "timestamp": int,
                        "location": str, "total_state_bytes": int, "operators": list}.items():  # fmt: skip
        assert isinstance(doc[field], kind), field
    assert (doc["checkpoint_id"], doc["kind"], doc["job_id"]) == (7, "checkpoint", JOB_ID)
    ops = {o["uid"]: o for o in doc["operators"]}
    assert ops["src"]["status"] == "fully_finished"
    assert ops["src"]["finished_subtasks"] == [0, 1]
    assert ops["totals"]["status"] == "partially_finished"
    assert ops["totals"]["finished_subtasks"] == [1]
    assert ops["totals"]["inputs"] == [{"from": "src", "partitioning": "hash"}]
    assert ops["sink"]["status"] == "running"
    assert ops["sink"]["handles"] == 1
    assert doc["total_state_bytes"] == sum(o["state_bytes"] for o in doc["operators"])
    for op in doc["operators"]:
        assert set(op) >= {"uid", "parallelism", "max_parallelism", "status", "finished_subtasks", "state_bytes",
                           "handles", "inputs"}  # fmt: skip


def test_inspect_json_rebuilds_the_topology(cli: Cli, golden_root: Path, tmp_path: Path) -> None:
    doc = json.loads(cli("inspect", str(golden_root), "--json").out)
    keep = ("uid", "parallelism", "max_parallelism", "inputs")
    topology = {"format_version": 1, "operators": [{k: o[k] for k in keep} for o in doc["operators"]]}
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(topology))
    result = cli("check-restore", str(golden_root), "--topology", str(path))
    assert result.code == 0, result.out + result.err
    assert result.out.startswith("compatible: checkpoint 7")


@pytest.mark.parametrize(("fmt", "name"), [("mermaid", "graph.mmd"), ("dot", "graph.dot")])
def test_graph(cli: Cli, golden_root: Path, fmt: str, name: str) -> None:
    result = cli("inspect", str(golden_root), "--graph", fmt)
    assert result.code == 0
    check_golden(name, result.out, golden_root)


def test_dump_keyed_and_operator_state(cli: Cli, golden_root: Path) -> None:
    result = cli("dump", str(golden_root), "--operator", "totals", "--key-group", "6")
    assert result.code == 0
    check_golden("dump_totals_kg6.jsonl", result.out, golden_root)
    records = [json.loads(line) for line in result.out.splitlines()]
    assert {r["key_group"] for r in records} == {6}
    assert {r["state"] for r in records} >= {"total", "history", "tags"}
    history = [r for r in records if r["state"] == "history"]
    assert all(isinstance(r["value"], list) and len(r["value"]) == 2 for r in history)
    sink = [json.loads(line) for line in cli("dump", str(golden_root), "--operator", "sink").out.splitlines()]
    assert [r["value"] for r in sink] == [{"checkpoint_id": 6, "records": 12}, {"checkpoint_id": 7, "records": 3}]
    assert {r["mode"] for r in sink} == {"split"}


def test_dump_says_on_stderr_why_finished_subtasks_print_nothing(cli: Cli, golden_root: Path) -> None:
    src = cli("dump", str(golden_root), "--operator", "src")
    assert (src.code, src.out) == (0, "")
    assert src.err == (
        "note: operator 'src' is fully finished in checkpoint 7; finished subtasks have no state to dump\n"
    )
    totals = cli("dump", str(golden_root), "--operator", "totals")
    assert totals.code == 0
    assert totals.out
    assert totals.err == (
        "note: operator 'totals' is partially finished (subtasks [1]) in checkpoint 7; "
        "finished subtasks have no state to dump\n"
    )
    assert cli("dump", str(golden_root), "--operator", "sink").err == "", "no note for a running operator"


def test_dump_never_unpickles_without_the_flag(cli: Cli, golden_root: Path) -> None:
    lines = cli("dump", str(golden_root), "--operator", "totals", "--state", "opaque").out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 1
    assert records[0]["value"]["serializer"] == "pickle"
    assert "base64" in records[0]["value"]
    unsafe = cli("dump", str(golden_root), "--operator", "totals", "--state", "opaque", "--unsafe-unpickle")
    assert json.loads(unsafe.out)["value"] == {"repr": "{1, 2, 3}"}


def test_dump_state_filter_and_map_entries(cli: Cli, golden_root: Path) -> None:
    records = [
        json.loads(x) for x in cli("dump", str(golden_root), "--operator", "totals", "--state", "tags").out.splitlines()
    ]
    assert records
    assert all(r["user_key"] == "tier" and r["value"] in ("gold", "silver") for r in records)
    assert len({r["key"] for r in records}) == len(records)


def test_list(cli: Cli, golden_root: Path) -> None:
    result = cli("list", str(golden_root), "--json")
    assert result.code == 0
    doc = json.loads(result.out)
    [entry] = doc["checkpoints"]
    assert entry["checkpoint_id"] == 7
    assert entry["operators"] == {"running": 1, "partially_finished": 1, "fully_finished": 1}
    table = cli("list", str(golden_root)).out
    assert "checkpoint   7" in table or "checkpoint  7" in table
    assert "1 running, 1 partial, 1 finished" in table


def test_verify_ok(cli: Cli, golden_root: Path) -> None:
    result = cli("verify", str(golden_root))
    assert result.code == 0
    assert result.out.splitlines()[-1].startswith("verified: 2 handles")
    doc = json.loads(cli("inspect", str(golden_root), "--verify", "--json").out)
    assert doc["verification"] == {"ok": True, "handles": 2, "bytes": doc["total_state_bytes"], "failures": []}


def test_operator_detail(cli: Cli, golden_root: Path) -> None:
    out = cli("inspect", str(golden_root), "--operator", "totals").out
    assert "operator totals: parallelism 2, max parallelism 128, partially finished [1]" in out
    detail = out.split("operator totals:")[1]
    assert "keyed" in detail
    assert "0..63" in detail
    assert "finished" in detail
    assert "xxh3-64:" in detail
    sink = cli("inspect", str(golden_root), "--operator", "sink").out
    assert "pending (split, 2)" in sink


def test_inspect_checkpoint_console_alias(golden_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from keystate.tools.cli import inspect_main

    assert inspect_main([str(golden_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint_id"] == 7
