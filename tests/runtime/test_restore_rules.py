"""Restore compatibility rules (DESIGN.md section 7; reference (c) V2, V3, V5 and the
VertexFinishedStateCheckerTest scenarios of (d)), checked with :func:`check_restore` against
metadata built in code.

Fixtures as in Flink's test: PARTIAL = parallelism 2 with a finished marker at index 0 (state at 1);
FULLY = fully finished, parallelism 2; RUNNING = state in both subtasks; NEW = absent from the
checkpoint, which counts as running.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest

from keystate.runtime.restore_rules import RULES, RestoreReport, Violation, check_restore
from keystate.storage.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    DistributionMode,
    OperatorState,
    OperatorStatus,
    SubtaskState,
)
from keystate.storage.topology import InputEdge, Partitioning, Topology, TopologyOperator
from tests.runtime.handles import JOB_ID, keyed_handle, operator_handle

CHECKPOINT_ID = 7
Status = Literal["running", "partial", "fully", "new"]
A2A = [Partitioning.HASH, Partitioning.REBALANCE, Partitioning.BROADCAST]
PW = [Partitioning.FORWARD, Partitioning.RESCALE]
ACTION = re.compile(r"\b(remove|restore|reduce|keep|pass|connect|give)\b")


def running(uid: str, *, p: int = 2, max_p: int = 128, keyed: bool = False) -> OperatorState:
    def state(i: int) -> SubtaskState:
        lo, hi = i * max_p // p, (i + 1) * max_p // p - 1
        if keyed:
            return SubtaskState(i, keyed=(keyed_handle(lo, hi),))
        return SubtaskState(i, operator=(operator_handle(("buffer", DistributionMode.SPLIT, 1)),))

    return OperatorState(uid, p, max_p, subtasks=tuple(state(i) for i in range(p)))


def partial(uid: str, *, max_p: int = 128) -> OperatorState:
    upper = SubtaskState(1, keyed=(keyed_handle(max_p // 2, max_p - 1),))
    return OperatorState(uid, 2, max_p, subtasks=(SubtaskState(0, finished=True), upper))


def fully(uid: str, *, max_p: int = 128) -> OperatorState:
    return OperatorState(uid, 2, max_p, fully_finished=True)


def stateless(uid: str, *, max_p: int = 128) -> OperatorState:
    return OperatorState(uid, 2, max_p)


def old_state(uid: str, status: Status) -> OperatorState | None:
    return {"running": running, "partial": partial, "fully": fully}[status](uid) if status != "new" else None


def metadata(*operators: OperatorState | None) -> CheckpointMetadata:
    ops = tuple(op for op in operators if op is not None)
    return CheckpointMetadata(CHECKPOINT_ID, JOB_ID, CheckpointKind.CHECKPOINT, 1_700_000_000_000, ops)


def node(uid: str, *inputs: tuple[str, Partitioning], p: int = 2, max_p: int | None = None) -> TopologyOperator:
    return TopologyOperator(uid, p, max_p, tuple(InputEdge(src, kind) for src, kind in inputs))


def only(report: RestoreReport) -> Violation:
    assert len(report.violations) == 1, report.violations
    return report.violations[0]


def test_fixtures_have_the_intended_status() -> None:
    ops = {op.uid: op for op in metadata(running("r"), partial("p"), fully("f")).operators}
    assert ops["r"].status is OperatorStatus.RUNNING
    assert ops["p"].status is OperatorStatus.PARTIALLY_FINISHED
    assert ops["p"].finished_subtasks == [0]
    assert ops["f"].status is OperatorStatus.FULLY_FINISHED


# --- finished-state predecessor rules (VertexFinishedStateChecker) ----------------------------------

PREDECESSOR_CASES: list[tuple[Status, Status, list[Partitioning], str | None, str | None]] = [
    # (predecessor, operator, edge kinds, rule, words the message must contain)
    ("running", "fully", A2A + PW, "finished-predecessor", "is running"),
    ("new", "fully", A2A + PW, "finished-predecessor", "is running"),
    ("partial", "fully", A2A + PW, "finished-predecessor", "is partially finished"),
    ("running", "partial", A2A, "partial-all-to-all-predecessor", "all running"),
    ("new", "partial", A2A, "partial-all-to-all-predecessor", "all running"),
    ("partial", "partial", A2A, "partial-all-to-all-predecessor", "partially finished"),
    ("running", "partial", PW, "partial-running-pointwise-predecessor", "all running"),
    ("new", "partial", PW, "partial-running-pointwise-predecessor", "all running"),
    ("partial", "partial", PW, None, None),
    ("fully", "partial", A2A + PW, None, None),
    ("fully", "fully", A2A + PW, None, None),
    ("fully", "running", A2A + PW, None, None),
    ("fully", "new", A2A + PW, None, None),
    ("partial", "running", A2A + PW, None, None),
    ("running", "running", A2A + PW, None, None),
    ("new", "new", A2A + PW, None, None),
]


@pytest.mark.parametrize(
    ("up", "down", "kind", "rule", "words"),
    [(up, down, kind, rule, words) for up, down, kinds, rule, words in PREDECESSOR_CASES for kind in kinds],
    ids=lambda v: v.value if isinstance(v, Partitioning) else str(v),
)
def test_predecessor_rules(up: Status, down: Status, kind: Partitioning, rule: str | None, words: str | None) -> None:
    meta = metadata(old_state("up", up), old_state("down", down))
    report = check_restore(meta, Topology((node("up"), node("down", ("up", kind)))))
    if rule is None:
        assert report.compatible, report.violations
        assert report.violations == ()
        return
    assert not report.compatible
    violation = only(report)
    assert (violation.rule, violation.operator, violation.predecessor) == (rule, "down", "up")
    assert words is not None
    assert words in violation.message
    assert "'down'" in violation.message
    assert "'up'" in violation.message
    assert f"checkpoint {CHECKPOINT_ID}" in violation.message


@pytest.mark.parametrize("order", ["pointwise_first", "all_to_all_first"])
def test_two_edges_between_partial_operators_all_to_all_wins(order: str) -> None:
    edges = [("up", Partitioning.FORWARD), ("up", Partitioning.HASH)]
    if order == "all_to_all_first":
        edges.reverse()
    report = check_restore(metadata(partial("up"), partial("down")), Topology((node("up"), node("down", *edges))))
    violation = only(report)
    assert violation.rule == "partial-all-to-all-predecessor"
    assert "partially finished" in violation.message


def test_two_edges_from_running_into_partial_report_one_violation() -> None:
    edges = [("up", Partitioning.RESCALE), ("up", Partitioning.REBALANCE)]
    report = check_restore(metadata(running("up"), partial("down")), Topology((node("up"), node("down", *edges))))
    assert only(report).rule == "partial-all-to-all-predecessor"


def test_each_bad_predecessor_is_reported() -> None:
    meta = metadata(running("a"), partial("b"), fully("c"), fully("sink"))
    topology = Topology((
        node("a"), node("b"), node("c"),
        node("sink", ("a", Partitioning.HASH), ("b", Partitioning.FORWARD), ("c", Partitioning.HASH)),
    ))  # fmt: skip
    report = check_restore(meta, topology)
    assert sorted((v.rule, v.operator, v.predecessor) for v in report.violations) == [
        ("finished-predecessor", "sink", "a"),
        ("finished-predecessor", "sink", "b"),
    ]


def test_new_operator_inserted_before_finished_chain_is_rejected_at_the_first_finished_one() -> None:
    # Checkpoint: src -> sink, both fully finished. New: src -> added -> sink.
    meta = metadata(fully("src"), fully("sink"))
    topology = Topology((
        node("src"),
        node("added", ("src", Partitioning.FORWARD)),
        node("sink", ("added", Partitioning.FORWARD)),
    ))  # fmt: skip
    violation = only(check_restore(meta, topology))
    assert (violation.rule, violation.operator, violation.predecessor) == ("finished-predecessor", "sink", "added")
    assert "'added'" in violation.message
    assert "'sink'" in violation.message


# --- non-restored-state (V2) ------------------------------------------------------------------------


def test_removed_operator_with_state_is_a_violation() -> None:
    violation = only(check_restore(metadata(running("kept"), running("gone")), Topology((node("kept"),))))
    assert (violation.rule, violation.operator) == ("non-restored-state", "gone")
    assert "--allow-non-restored-state" in violation.message


def test_removed_operator_with_state_is_allowed_with_allow_non_restored_state() -> None:
    report = check_restore(
        metadata(running("kept"), running("gone")), Topology((node("kept"),)), allow_non_restored_state=True
    )
    assert report.compatible


@pytest.mark.parametrize(
    "gone",
    [
        fully("gone"),
        OperatorState("gone", 2, 128, subtasks=(SubtaskState(0, finished=True), SubtaskState(1, finished=True))),
        OperatorState("gone", 2, 128, subtasks=(SubtaskState(0, finished=True),)),
        stateless("gone"),
    ],
    ids=["fully_finished", "only_finished_markers", "marker_and_stateless", "stateless"],
)
def test_removed_operator_without_state_needs_no_flag(gone: OperatorState) -> None:
    assert check_restore(metadata(running("kept"), gone), Topology((node("kept"),))).compatible


# --- max-parallelism-mismatch and parallelism-exceeds-max (V2, V5) ---------------------------------


def test_explicit_max_parallelism_change_on_keyed_operator_is_a_violation() -> None:
    meta = metadata(running("totals", keyed=True))
    violation = only(check_restore(meta, Topology((node("totals", max_p=256),))))
    assert (violation.rule, violation.operator) == ("max-parallelism-mismatch", "totals")
    assert "128" in violation.message
    assert "256" in violation.message
    assert "keep 128" in violation.message


def test_explicit_max_parallelism_change_on_hash_input_operator_is_a_violation() -> None:
    # Keyed by its hash input even though its checkpointed state is operator state only.
    meta = metadata(running("src"), running("totals"))
    topology = Topology((node("src"), node("totals", ("src", Partitioning.HASH), max_p=64)))
    assert only(check_restore(meta, topology)).rule == "max-parallelism-mismatch"


@pytest.mark.parametrize(
    ("old", "max_p"),
    [
        (running("op", keyed=True), None),
        (running("op", keyed=True), 128),
        (running("op"), 256),
        (stateless("op"), 256),
        (fully("op"), 256),
    ],
    ids=["keyed_derived", "keyed_same", "operator_state_only", "stateless", "fully_finished"],
)
def test_max_parallelism_without_violation(old: OperatorState, max_p: int | None) -> None:
    assert check_restore(metadata(old), Topology((node("op", max_p=max_p),))).compatible


def test_fully_finished_keyed_operator_may_change_its_max_parallelism() -> None:
    # No subtask state to map (reference E4): the max-parallelism check does not apply.
    meta = metadata(fully("src"), fully("totals"))
    topology = Topology((node("src"), node("totals", ("src", Partitioning.HASH), max_p=512)))
    assert check_restore(meta, topology).compatible


def test_parallelism_above_checkpoint_max_parallelism_is_a_violation() -> None:
    meta = metadata(running("totals", keyed=True))
    violation = only(check_restore(meta, Topology((node("totals", p=200),))))
    assert (violation.rule, violation.operator) == ("parallelism-exceeds-max", "totals")
    assert "200" in violation.message
    assert "reduce the parallelism to 128 or less" in violation.message


@pytest.mark.parametrize(
    ("old", "p"),
    [(running("op", keyed=True), 128), (stateless("op"), 200), (fully("op"), 200), (partial("op", max_p=64), 64)],
    ids=["equal_to_max", "stateless", "fully_finished", "partial_at_max"],
)
def test_parallelism_without_violation(old: OperatorState, p: int) -> None:
    assert check_restore(metadata(old), Topology((node("op", p=p),))).compatible


# --- the report -------------------------------------------------------------------------------------


def _all_rules_report() -> RestoreReport:
    meta = metadata(
        running("orders", keyed=True), fully("sink"), running("legacy"), running("totals", keyed=True),
        partial("enrich"), partial("audit"),
    )  # fmt: skip
    topology = Topology((
        node("orders", p=200),
        node("totals", max_p=512),
        node("sink", ("totals", Partitioning.FORWARD)),
        node("enrich", ("totals", Partitioning.HASH)),
        node("audit", ("totals", Partitioning.FORWARD)),
    ))  # fmt: skip
    return check_restore(meta, topology)


def test_several_violations_are_reported_at_once() -> None:
    report = _all_rules_report()
    assert not report.compatible
    assert sorted((v.rule, v.operator) for v in report.violations) == sorted([
        ("parallelism-exceeds-max", "orders"),
        ("max-parallelism-mismatch", "totals"),
        ("finished-predecessor", "sink"),
        ("partial-all-to-all-predecessor", "enrich"),
        ("partial-running-pointwise-predecessor", "audit"),
        ("non-restored-state", "legacy"),
    ])  # fmt: skip
    assert {v.rule for v in report.violations} == set(RULES)


def test_every_message_names_the_operator_and_says_what_to_do() -> None:
    for violation in _all_rules_report().violations:
        assert f"'{violation.operator}'" in violation.message, violation
        assert ACTION.search(violation.message), violation
        assert violation.message[0].islower() or violation.message.startswith("checkpoint"), violation


def test_report_to_dict_matches_the_check_restore_json_contract() -> None:
    doc = json.loads(json.dumps(_all_rules_report().to_dict()))
    assert set(doc) == {"compatible", "checkpoint_id", "violations"}
    assert doc["compatible"] is False
    assert doc["checkpoint_id"] == CHECKPOINT_ID
    assert len(doc["violations"]) == 6
    for v in doc["violations"]:
        assert {"rule", "operator", "message"} <= set(v)
        assert set(v) <= {"rule", "operator", "message", "predecessor"}
        assert v["rule"] in RULES
        assert isinstance(v["operator"], str)
        assert isinstance(v["message"], str)
    assert {v["operator"]: v.get("predecessor") for v in doc["violations"]}["sink"] == "totals"


def test_compatible_report_to_dict() -> None:
    report = check_restore(metadata(running("op")), Topology((node("op"),)))
    assert report.to_dict() == {"compatible": True, "checkpoint_id": CHECKPOINT_ID, "violations": []}
