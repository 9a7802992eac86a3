"""Restore compatibility rules (docs/flink-rules.md#restore-rules; rules V2, V3, V5 there and Flink's
VertexFinishedStateCheckerTest scenarios), checked with :func:`check_restore` against
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
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    DistributionMode,
    OperatorState,
    OperatorStatus,
    SubtaskState,
)
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator
from tests.runtime.handles import JOB_ID, keyed_handle, operator_handle

CHECKPOINT_ID = 7
Status = Literal["running", "partial", "fully", "new"]
A2A = [Partitioning.HASH, Partitioning.REBALANCE, Partitioning.BROADCAST]
PW = [Partitioning.FORWARD, Partitioning.RESCALE]
ACTION = re.compile(r"\b(remove|restore|reduce|keep|pass|connect|give|move)\b")
EXTENSIONS = {"dropped_state", "starts_empty", "warnings", "source_format"}


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


def chained(*nodes: TopologyOperator, chains: list[list[str]]) -> Topology:
    return Topology(tuple(nodes), tuple(tuple(c) for c in chains))


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
    "old",
    [running("op", keyed=True), running("op"), stateless("op"), fully("op"), partial("op")],
    ids=["keyed", "operator_state_only", "stateless", "fully_finished", "partially_finished"],
)
@pytest.mark.parametrize("max_p", [None, 128], ids=["derived", "same"])
def test_max_parallelism_without_violation(old: OperatorState, max_p: int | None) -> None:
    assert check_restore(metadata(old), Topology((node("op", max_p=max_p),))).compatible


@pytest.mark.parametrize(
    "old",
    [running("op"), stateless("op"), fully("op"), partial("op")],
    ids=["operator_state_only", "stateless", "fully_finished", "partially_finished"],
)
def test_explicit_max_parallelism_change_is_a_violation_for_every_operator(old: OperatorState) -> None:
    # Flink's Checkpoints.loadAndValidateCheckpoint compares max parallelism for every operator of the
    # checkpoint that the new job has, whatever its status or state (docs/flink-rules.md#max-parallelism-mismatch).
    violation = only(check_restore(metadata(old), Topology((node("op", max_p=256),))))
    assert (violation.rule, violation.operator) == ("max-parallelism-mismatch", "op")
    assert "keep 128" in violation.message


def test_fully_finished_keyed_operator_may_not_change_an_explicit_max_parallelism() -> None:
    # As Flink: the check looks neither at finished status nor at state (restore experiment
    # max-parallelism-changed-finished); leaving it unset adopts the checkpoint's value.
    meta = metadata(fully("src"), fully("totals"))
    topology = Topology((node("src"), node("totals", ("src", Partitioning.HASH), max_p=512)))
    violation = only(check_restore(meta, topology))
    assert (violation.rule, violation.operator) == ("max-parallelism-mismatch", "totals")
    assert "fully finished" in violation.message
    assert check_restore(meta, Topology((node("src"), node("totals", ("src", Partitioning.HASH))))).compatible


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
        partial("enrich"), partial("audit"), fully("done"),
    )  # fmt: skip
    topology = chained(
        node("orders", p=200),
        node("totals", max_p=512),
        node("sink", ("totals", Partitioning.FORWARD)),
        node("enrich", ("totals", Partitioning.HASH)),
        node("audit", ("totals", Partitioning.FORWARD)),
        node("done"),
        node("fresh", ("done", Partitioning.FORWARD)),
        chains=[["done", "fresh"]],
    )
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
        ("mixed-finished-chain", "done"),
    ])  # fmt: skip
    assert {v.rule for v in report.violations} == set(RULES)


def test_every_message_names_the_operator_and_says_what_to_do() -> None:
    for violation in _all_rules_report().violations:
        assert f"'{violation.operator}'" in violation.message, violation
        assert ACTION.search(violation.message), violation
        assert violation.message[0].islower() or violation.message.startswith("checkpoint"), violation


def test_report_to_dict_matches_the_check_restore_json_contract() -> None:
    doc = json.loads(json.dumps(_all_rules_report().to_dict()))
    # The contract (docs/architecture.md#check-restore-json-output), then its extensions.
    assert set(doc) == {"compatible", "checkpoint_id", "violations"} | EXTENSIONS
    assert doc["compatible"] is False
    assert doc["checkpoint_id"] == CHECKPOINT_ID
    assert len(doc["violations"]) == 7
    assert (doc["dropped_state"], doc["starts_empty"], doc["warnings"]) == (["legacy"], ["fresh"], [])
    assert doc["source_format"] == "keystate"
    for v in doc["violations"]:
        assert {"rule", "operator", "message"} <= set(v)
        assert set(v) <= {"rule", "operator", "message", "predecessor"}
        assert v["rule"] in RULES
        assert isinstance(v["operator"], str)
        assert isinstance(v["message"], str)
    assert {v["operator"]: v.get("predecessor") for v in doc["violations"]}["sink"] == "totals"


def test_compatible_report_to_dict() -> None:
    report = check_restore(metadata(running("op")), Topology((node("op"),)))
    assert report.to_dict() == {
        "compatible": True, "checkpoint_id": CHECKPOINT_ID, "violations": [],
        "dropped_state": [], "starts_empty": [], "warnings": [], "source_format": "keystate",
    }  # fmt: skip


# --- job vertices: with chains, the finished-state rules apply per vertex (VertexFinishedStateChecker) --


@pytest.mark.parametrize(
    ("head", "member", "words"),
    [
        ("fully", "new", "'b' is running (new); 'a' is fully finished"),
        ("fully", "running", "'b' is running; 'a' is fully finished"),
        ("fully", "partial", "'b' is partially finished; 'a' is fully finished"),
        ("partial", "running", "'b' is running; 'a' is partially finished"),
        ("running", "fully", "'a' is running; 'b' is fully finished"),
    ],
)
def test_a_chain_mixing_finished_states_is_rejected(head: Status, member: Status, words: str) -> None:
    meta = metadata(old_state("a", head), old_state("b", member))
    topology = chained(node("a"), node("b", ("a", Partitioning.FORWARD)), chains=[["a", "b"]])
    violation = only(check_restore(meta, topology))
    assert (violation.rule, violation.operator, violation.predecessor) == ("mixed-finished-chain", "a", None)
    assert "'a' -> 'b'" in violation.message
    assert words in violation.message
    assert f"checkpoint {CHECKPOINT_ID}" in violation.message
    # Without the chain the same operators are two vertices, and only the predecessor rules apply.
    assert all(v.rule != "mixed-finished-chain" for v in check_restore(meta, Topology(topology.operators)).violations)


@pytest.mark.parametrize("status", ["running", "partial", "fully"])
def test_edges_inside_a_chain_are_not_inputs(status: Status) -> None:
    # Unchained, a partially finished operator with an all-to-all partially finished input is rejected;
    # inside one vertex the edge is no input of the vertex.
    meta = metadata(old_state("a", status), old_state("b", status))
    nodes = (node("a"), node("b", ("a", Partitioning.REBALANCE)))
    assert check_restore(meta, chained(*nodes, chains=[["a", "b"]])).compatible
    unchained = check_restore(meta, Topology(nodes))
    assert unchained.compatible is (status != "partial")


def test_predecessor_rules_use_the_status_of_the_predecessor_vertex() -> None:
    meta = metadata(running("p1"), running("p2"), fully("down"))
    topology = chained(
        node("p1"), node("p2", ("p1", Partitioning.FORWARD)), node("down", ("p2", Partitioning.HASH)),
        chains=[["p1", "p2"]],
    )  # fmt: skip
    violation = only(check_restore(meta, topology))
    assert (violation.rule, violation.operator, violation.predecessor) == ("finished-predecessor", "down", "p2")
    finished = metadata(fully("p1"), fully("p2"), partial("down"))
    assert check_restore(finished, topology).compatible


@pytest.mark.parametrize("second", [Partitioning.HASH, Partitioning.FORWARD])
def test_all_to_all_wins_per_predecessor_vertex(second: Partitioning) -> None:
    meta = metadata(partial("a"), partial("b"), partial("down"))
    topology = chained(
        node("a"), node("b", ("a", Partitioning.FORWARD)),
        node("down", ("a", Partitioning.FORWARD), ("b", second)),
        chains=[["a", "b"]],
    )  # fmt: skip
    report = check_restore(meta, topology)
    if second is Partitioning.FORWARD:
        assert report.compatible, report.violations
        return
    violation = only(report)
    assert (violation.rule, violation.operator, violation.predecessor) == (
        "partial-all-to-all-predecessor",
        "down",
        "b",
    )


def test_a_mixed_predecessor_vertex_is_reported_once() -> None:
    meta = metadata(fully("a"), fully("down"))
    topology = chained(
        node("a"), node("b", ("a", Partitioning.FORWARD)), node("down", ("b", Partitioning.HASH)),
        chains=[["a", "b"]],
    )  # fmt: skip
    assert only(check_restore(meta, topology)).rule == "mixed-finished-chain"


def test_parallelism_precondition_applies_to_every_operator_of_a_vertex_with_state() -> None:
    meta = metadata(running("count", keyed=True, max_p=8), stateless("tag", max_p=8))
    nodes = (node("count", p=9), node("tag", ("count", Partitioning.FORWARD), p=9))
    report = check_restore(meta, chained(*nodes, chains=[["count", "tag"]]))
    assert [(v.rule, v.operator) for v in report.violations] == [
        ("parallelism-exceeds-max", "count"),
        ("parallelism-exceeds-max", "tag"),
    ]
    assert "reduce the parallelism to 8 or less" in report.violations[1].message
    # Unchained, the stateless operator gets no state and may run at any parallelism.
    assert [v.operator for v in check_restore(meta, Topology(nodes)).violations] == ["count"]


def test_a_chain_heads_max_parallelism_is_the_vertex_max_parallelism() -> None:
    meta = metadata(running("count", keyed=True, max_p=8), stateless("tag", max_p=8))
    topology = chained(
        node("count", max_p=16), node("tag", ("count", Partitioning.FORWARD), max_p=16), chains=[["count", "tag"]]
    )
    report = check_restore(meta, topology)
    assert sorted(v.operator for v in report.violations if v.rule == "max-parallelism-mismatch") == ["count", "tag"]
    tag = next(v for v in report.violations if v.operator == "tag")
    assert "chain head 'count'" in tag.message


# --- what a restore does with the state: dropped_state, starts_empty, warnings -------------------------


def test_another_jobs_checkpoint_restores_nothing_and_says_so() -> None:
    meta = metadata(running("a"), running("b", keyed=True))
    topology = Topology((node("x"), node("y", ("x", Partitioning.HASH))))
    allowed = check_restore(meta, topology, allow_non_restored_state=True)
    assert allowed.compatible  # as Flink decides: nothing forbids it
    assert (allowed.dropped_state, allowed.starts_empty) == (("a", "b"), ("x", "y"))
    assert len(allowed.warnings) == 2
    assert "no operator of the new topology matches an operator of checkpoint 7 by uid" in allowed.warnings[0]
    assert "another job" in allowed.warnings[0]
    assert allowed.warnings[1] == "the state of 2 operator(s) of checkpoint 7 will be dropped: 'a', 'b'"
    refused = check_restore(meta, topology)
    assert [v.rule for v in refused.violations] == ["non-restored-state", "non-restored-state"]
    assert refused.dropped_state == ("a", "b")
    assert len(refused.warnings) == 1


def test_dropped_state_lists_only_operators_with_state() -> None:
    meta = metadata(running("kept"), stateless("gone1"), fully("gone2"), running("gone3"))
    report = check_restore(meta, Topology((node("kept"), node("new"))), allow_non_restored_state=True)
    assert (report.dropped_state, report.starts_empty) == (("gone3",), ("new",))
    assert report.warnings == ("the state of 1 operator(s) of checkpoint 7 will be dropped: 'gone3'",)


def test_an_unchanged_job_drops_nothing_and_starts_nothing_empty() -> None:
    meta = metadata(running("a"), fully("b"), partial("c"))
    report = check_restore(meta, meta.topology())
    assert report.compatible
    assert (report.dropped_state, report.starts_empty, report.warnings) == ((), (), ())


def test_an_empty_checkpoint_warns_about_nothing() -> None:
    report = check_restore(metadata(), Topology((node("a"),)))
    assert (report.compatible, report.starts_empty, report.warnings) == (True, ("a",), ())
