"""The restore rules on synthetic Flink ``_metadata`` (``check_restore`` with a ``FlinkCheckpointMetadata``):
matching by operator ID, what counts as state, and the messages. The real-Flink oracle is
``test_restore_experiments.py``; the rules themselves are tested on keystate metadata in
``tests/runtime/test_restore_rules.py``, and are the same code.
"""

from __future__ import annotations

import pytest

from keystate.runtime.restore_rules import check_restore
from keystate.storage.format import KeyGroupRange
from keystate.storage.format.flink import (
    ByteStreamStateHandle,
    FlinkCheckpointMetadata,
    FlinkHandleType,
    FlinkOperatorState,
    FlinkSubtaskState,
    FullyFinishedOperatorState,
    KeyGroupsStateHandle,
    flink_operator_id,
)
from keystate.storage.format.metadata import CheckpointKind, CheckpointMetadata, OperatorState, SubtaskState
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator
from tests.runtime.handles import JOB_ID

INLINE = ByteStreamStateHandle("file:/ck/4635591fc76af4447d9450ba3a37a9ff/chk-9/0b5e", b"\x00\x01 state")


def keyed(index: int, p: int = 2, max_p: int = 128) -> FlinkSubtaskState:
    lo, hi = index * max_p // p, (index + 1) * max_p // p - 1
    handle = KeyGroupsStateHandle(FlinkHandleType.KEY_GROUPS_V2, KeyGroupRange(lo, hi), (0,) * (hi - lo + 1), INLINE)
    return FlinkSubtaskState(index, managed_keyed_state=handle)


def op(
    uid: str,
    subtasks: tuple[FlinkSubtaskState, ...] | None = None,
    *,
    max_p: int = 128,
    stored_uid: bool = True,
    operator_id: str | None = None,
    coordinator: bool = False,
) -> FlinkOperatorState:
    """A running operator with keyed state in both subtasks, unless ``subtasks`` says otherwise."""
    oid = operator_id or flink_operator_id(uid)
    state = ByteStreamStateHandle(oid, b"\x00" * 16) if coordinator else None
    entries = (keyed(0, max_p=max_p), keyed(1, max_p=max_p)) if subtasks is None else subtasks
    return FlinkOperatorState(oid, uid if stored_uid else None, uid if stored_uid else None, 2, max_p, state, entries)


def finished(uid: str, *, max_p: int = 128, stored_uid: bool = True) -> FullyFinishedOperatorState:
    name = uid if stored_uid else None
    return FullyFinishedOperatorState(flink_operator_id(uid), name, name, 2, max_p, None, ())


def checkpoint(*operators: FlinkOperatorState, version: int = 6) -> FlinkCheckpointMetadata:
    return FlinkCheckpointMetadata(version, 8, (), operators, None, "chk-8/_metadata")


def node(uid: str, *inputs: tuple[str, Partitioning], p: int = 2, max_p: int | None = None,
         operator_id: str | None = None) -> TopologyOperator:  # fmt: skip
    return TopologyOperator(uid, p, max_p, tuple(InputEdge(s, k) for s, k in inputs), operator_id)


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_operators_are_matched_by_the_hash_of_their_uid(version: int) -> None:
    # Formats 3-4 store no uid: the match is by operator ID alone, as in Flink.
    meta = checkpoint(op("sum", stored_uid=version >= 5), finished("src", stored_uid=version >= 5), version=version)
    topology = Topology((node("src"), node("sum", ("src", Partitioning.HASH))))
    report = check_restore(meta, topology)
    assert report.compatible, report.violations
    assert (report.dropped_state, report.starts_empty, report.warnings) == ((), (), ())
    assert report.source_format == "flink"


def test_a_removed_operator_is_named_by_uid_and_operator_id() -> None:
    sum_id = flink_operator_id("sum")
    v6 = check_restore(checkpoint(op("sum"), finished("src")), Topology((node("src"),)))
    [violation] = v6.violations
    assert (violation.rule, violation.operator, violation.operator_id) == ("non-restored-state", "sum", sum_id)
    assert f"'sum' (ID {sum_id})" in violation.message
    assert violation.to_dict()["operator_id"] == sum_id
    v4 = check_restore(checkpoint(op("sum", stored_uid=False), version=4), Topology((node("src"),)))
    [violation] = v4.violations
    assert violation.operator == sum_id  # no uid in a format-4 file: the ID is its name
    assert "the checkpoint stores no uid for it" in violation.message
    assert v4.dropped_state == (sum_id,)


def test_every_message_names_the_uid_and_the_operator_id() -> None:
    meta = checkpoint(finished("sum"), op("tag", max_p=8))
    topology = Topology((
        node("new"), node("sum", ("new", Partitioning.FORWARD)), node("tag", ("sum", Partitioning.FORWARD), max_p=16),
    ))  # fmt: skip
    report = check_restore(meta, topology)
    assert {v.rule for v in report.violations} == {"finished-predecessor", "max-parallelism-mismatch"}
    for v in report.violations:
        assert f"{v.operator!r} (ID {flink_operator_id(v.operator)}" in v.message, v.message
        assert v.operator_id == flink_operator_id(v.operator)
    pred = next(v for v in report.violations if v.rule == "finished-predecessor")
    assert f"'new' (ID {flink_operator_id('new')})" in pred.message


def test_operator_id_matches_an_operator_without_uid_or_with_set_uid_hash() -> None:
    hashed = "4d8507c9d9a85399fc69b68d59c42355"  # a uid-less Filter's generated ID (reference section 7)
    meta = checkpoint(op("Filter", operator_id=hashed, stored_uid=False))
    assert check_restore(meta, Topology((node("filter", operator_id=hashed),))).compatible
    report = check_restore(meta, Topology((node("filter"),)), allow_non_restored_state=True)
    assert (report.dropped_state, report.starts_empty) == ((hashed,), ("filter",))
    assert "no operator of the new topology matches" in report.warnings[0]
    assert "operator ID" in report.warnings[0]


def test_a_uid_stored_under_another_operator_id_is_warned_about() -> None:
    pinned = "0123456789abcdef0123456789abcdef"  # written with setUidHash, the uid kept as a name
    meta = checkpoint(op("counts", operator_id=pinned))
    report = check_restore(meta, Topology((node("counts"),)), allow_non_restored_state=True)
    assert report.compatible
    assert report.dropped_state == ("counts",)
    assert report.starts_empty == ("counts",)
    assert any(f"set its operator_id to {pinned}" in w for w in report.warnings), report.warnings
    assert check_restore(meta, Topology((node("counts", operator_id=pinned),))).warnings == ()


@pytest.mark.parametrize(
    ("subtasks", "coordinator", "needs_flag"),
    [
        ((FlinkSubtaskState(0), FlinkSubtaskState(1)), False, False),  # PyFlink: entries without handles
        ((), False, False),  # a stateless sink: no entries at all
        ((FlinkSubtaskState(0, finished=True), FlinkSubtaskState(1)), False, False),
        ((), True, True),  # only coordinator state (a source's enumerator)
        ((keyed(0), FlinkSubtaskState(1, finished=True)), False, True),
    ],
    ids=["entries_without_handles", "no_entries", "finished_marker", "coordinator_only", "partial_with_state"],
)
def test_what_counts_as_state_when_an_operator_is_removed(
    subtasks: tuple[FlinkSubtaskState, ...], coordinator: bool, needs_flag: bool
) -> None:
    # Flink: coordinator state, or a subtask whose hasState() is true (Checkpoints.loadAndValidateCheckpoint).
    meta = checkpoint(op("kept"), op("gone", subtasks, coordinator=coordinator))
    report = check_restore(meta, Topology((node("kept"),)))
    assert report.compatible is not needs_flag
    assert report.dropped_state == (("gone",) if needs_flag else ())


@pytest.mark.parametrize(
    ("subtasks", "rejected"),
    [
        ((FlinkSubtaskState(0, finished=True),), True),
        ((FlinkSubtaskState(0), FlinkSubtaskState(1)), True),
        ((), False),
    ],
    ids=["only_a_finished_marker", "entries_without_handles", "no_entries"],
)
def test_the_parallelism_precondition_counts_every_subtask_entry(
    subtasks: tuple[FlinkSubtaskState, ...], rejected: bool
) -> None:
    # Flink runs it for a vertex with any subtask entry (TaskStateAssignment.hasNonFinishedState:
    # getNumberCollectedStates() > 0), whether or not an entry holds a handle.
    report = check_restore(checkpoint(op("map", subtasks, max_p=8)), Topology((node("map", p=9),)))
    assert [v.rule for v in report.violations] == (["parallelism-exceeds-max"] if rejected else [])
    # keystate's own metadata lists a subtask only with state or a finished marker, and keystate needs no
    # key-group split for no state: its rule looks at state handles (docs/flink-rules.md).
    ks = CheckpointMetadata(8, JOB_ID, CheckpointKind.CHECKPOINT, 1, (
        OperatorState("map", 2, 8, subtasks=(SubtaskState(0, finished=True),)),
    ))  # fmt: skip
    assert check_restore(ks, Topology((node("map", p=9),))).compatible


def test_a_fully_finished_operator_keeps_its_max_parallelism_and_may_rescale() -> None:
    meta = checkpoint(finished("done"))
    assert check_restore(meta, Topology((node("done", p=200),))).compatible
    assert check_restore(meta, Topology((node("done", max_p=128),))).compatible
    [violation] = check_restore(meta, Topology((node("done", max_p=256),))).violations
    assert violation.rule == "max-parallelism-mismatch"
    assert "fully finished" in violation.message


def test_a_mixed_chain_names_its_operators_and_ids() -> None:
    meta = checkpoint(finished("src"), finished("map"))
    topology = Topology(
        (node("src"), node("new", ("src", Partitioning.FORWARD)), node("map", ("new", Partitioning.FORWARD))),
        (("src", "new", "map"),),
    )
    [violation] = check_restore(meta, topology).violations
    assert (violation.rule, violation.operator, violation.operator_id) == (
        "mixed-finished-chain", "src", flink_operator_id("src"),
    )  # fmt: skip
    assert "'src' -> 'new' -> 'map'" in violation.message
    assert f"'new' (ID {flink_operator_id('new')}) is running (new)" in violation.message


def test_without_chains_a_likely_chain_across_finished_states_is_warned_about() -> None:
    # Without chains every operator is its own vertex and mixed-finished-chain cannot be seen; Flink chains a
    # single forward input at equal parallelism by default (restore experiment new-downstream-of-finished-chained).
    meta = checkpoint(finished("tag"))
    nodes = (node("tag"), node("after", ("tag", Partitioning.FORWARD)))
    report = check_restore(meta, Topology(nodes))
    assert report.compatible
    [warning] = report.warnings
    assert "Flink chains 'after' to its only input 'tag' by default" in warning
    assert "running and fully finished" in warning
    assert "mixed-finished-chain" in warning
    assert check_restore(meta, Topology(nodes, (("tag",), ("after",)))).warnings == ()  # chains given: known
    rescaled = (node("tag"), node("after", ("tag", Partitioning.RESCALE), p=3))
    assert check_restore(meta, Topology(rescaled)).warnings == ()  # not chainable
