"""keystate's restore decision against Apache Flink's own, on every experiment of
``fixtures/restore-experiments.json``: a changed job (its topology in keystate's topology file format, with
``operator_id`` and ``chains``) that real Flink was asked to restore from a real checkpoint or savepoint, and
what Flink did (accepted, or the exception that rejected it).

Each experiment runs twice: through the CLI (``keystate check-restore <checkpoint> --topology <file>``,
``main()``, exit code and JSON) and as the library call (``check_restore``). The decision must be Flink's,
and for a rejection keystate's first violation must be the rule Flink failed with (keystate checks in
Flink's order: ``Checkpoints``, then ``VertexFinishedStateChecker``, then ``StateAssignmentOperation``), about
an operator or vertex whose ID Flink's message names.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from keystate.runtime.restore_rules import RULES, RestoreReport, check_restore
from keystate.storage.flink_checkpoints import FlinkCheckpoint
from keystate.storage.format.topology import Topology
from keystate.tools.cli import main
from keystate.tools.summary import load_location

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPERIMENTS = FIXTURES / "restore-experiments.json"
_HEX_ID = re.compile(r"\b[0-9a-f]{32}\b")


@cache
def experiments() -> list[dict[str, Any]]:
    doc = json.loads(EXPERIMENTS.read_text(encoding="utf-8"))
    assert doc["schema_version"] == 1
    found: list[dict[str, Any]] = doc["experiments"]
    return found


def _id(experiment: dict[str, Any]) -> str:
    return f"{experiment['flink_version']}-{experiment['variant']}"


CASES = [pytest.param(e, id=_id(e)) for e in experiments()]


def test_the_experiments_cover_both_flink_versions_and_every_rule_flink_has() -> None:
    assert {e["flink_version"] for e in experiments()} >= {"2.3.0", "1.20.5"}
    flink_rules = {e["flink"]["rule"] for e in experiments() if not e["flink"]["accepted"]}
    assert flink_rules == set(RULES)
    assert {e["flink"]["accepted"] for e in experiments()} == {True, False}
    assert len({_id(e) for e in experiments()}) == len(experiments())


def _assert_agrees(experiment: dict[str, Any], report: dict[str, Any], topology: Topology) -> None:
    flink = experiment["flink"]
    got = [(v["rule"], v["operator"]) for v in report["violations"]]
    assert report["compatible"] is flink["accepted"], (
        f"Flink {'accepted' if flink['accepted'] else 'rejected'} it ({flink['message']}); keystate says {got}"
    )
    if flink["accepted"]:
        assert report["violations"] == []
        return
    assert report["violations"][0]["rule"] == flink["rule"], (flink["message"], got)
    named = set(_HEX_ID.findall(flink["message"]))
    assert named, flink["message"]
    ours: set[str] = set()
    for v in report["violations"]:
        if v["rule"] != flink["rule"]:
            continue
        ours.add(v["operator_id"])
        if v["operator"] in topology:  # a vertex rule: Flink names the vertex (its head's operator ID)
            ours |= {op.flink_operator_id for op in topology.vertex(v["operator"])}
    assert named & ours, f"Flink names {named}, keystate's {flink['rule']} violations are about {ours}"


@pytest.mark.parametrize("experiment", CASES)
def test_check_restore_cli_decides_as_flink_did(
    experiment: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(experiment["topology"]), encoding="utf-8")
    argv = ["check-restore", str(FIXTURES / experiment["checkpoint"]), "--topology", str(path), "--json"]
    if experiment["allow_non_restored_state"]:
        argv.append("--allow-non-restored-state")
    code = main(argv)
    out, err = capsys.readouterr()
    assert err == ""
    report = json.loads(out)
    assert code == (0 if experiment["flink"]["accepted"] else 1)
    assert report["source_format"] == "flink"
    assert Path(report["location"]) == (FIXTURES / experiment["metadata"]).parent
    _assert_agrees(experiment, report, Topology.from_dict(experiment["topology"], str(path)))


@pytest.mark.parametrize("experiment", CASES)
def test_check_restore_library_decides_as_flink_did(experiment: dict[str, Any]) -> None:
    checkpoint = load_location(str(FIXTURES / experiment["metadata"]))
    assert isinstance(checkpoint, FlinkCheckpoint)
    topology = Topology.from_dict(experiment["topology"], "restore-experiments.json")
    report: RestoreReport = check_restore(
        checkpoint.metadata, topology, allow_non_restored_state=experiment["allow_non_restored_state"]
    )
    _assert_agrees(experiment, report.to_dict(), topology)
    after: dict[str, str] = experiment["flink"].get("status_after_restore") or {}
    if after:  # Flink's first checkpoint after the restore: the operators keystate matched as fully finished
        status = {op.operator_id: op.status.value for op in checkpoint.metadata.operators}
        for uid, flink_status in after.items():
            ours = status.get(topology.operator(uid).flink_operator_id)
            assert (ours == "fully_finished") == (flink_status == "fully_finished"), (uid, ours, flink_status)
        assert set(report.starts_empty) == {uid for uid in after if topology.operator(uid).flink_operator_id
                                            not in status}  # fmt: skip
