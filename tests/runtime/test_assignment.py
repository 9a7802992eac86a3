"""State assignment on restore (rules E4-E7, F2-F5 of docs/flink-rules.md; Flink's StateAssignmentOperationTest):
:func:`assign_state` and :func:`effective_topology` on checkpoints built in code.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from keystate.runtime.assignment import assign_state, effective_topology
from keystate.runtime.plan import SubtaskId
from keystate.runtime.restore_rules import check_restore
from keystate.runtime.task import TaskRestore
from keystate.statebackend.repartition import repartition_operator_state
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.keygroups import KeyGroupRange, default_max_parallelism, key_group_range_for_subtask
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    DistributionMode,
    KeyedStateHandle,
    OperatorState,
    OperatorStateHandle,
    SubtaskState,
)
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator
from keystate.storage.uri import open_storage
from tests.runtime.handles import JOB_ID, keyed_handle, operator_handle

SPLIT, UNION, BROADCAST = DistributionMode.SPLIT, DistributionMode.UNION, DistributionMode.BROADCAST


@pytest.fixture
def tmp_storage_path(tmp_path: Path) -> str:
    return str(tmp_path)


def checkpoint(path: str, *operators: OperatorState) -> CompletedCheckpoint:
    meta = CheckpointMetadata(11, JOB_ID, CheckpointKind.CHECKPOINT, 1_700_000_000_000, operators)
    return CompletedCheckpoint(open_storage(path), f"{JOB_ID}/chk-11", meta)


def keyed_operator(uid: str, p: int, max_p: int = 128, *, finished: frozenset[int] = frozenset()) -> OperatorState:
    """Keyed state in every subtask's own key-group range (finished subtasks get a marker)."""
    subtasks = []
    for i in range(p):
        kg = key_group_range_for_subtask(max_p, p, i)
        subtasks.append(
            SubtaskState(i, True) if i in finished else SubtaskState(i, keyed=(keyed_handle(kg.start, kg.end),))
        )
    return OperatorState(uid, p, max_p, subtasks=tuple(subtasks))


def old_keyed(state: OperatorState, index: int) -> KeyedStateHandle:
    sub = state.subtask(index)
    assert sub is not None
    assert len(sub.keyed) == 1
    return sub.keyed[0]


def old_operator(state: OperatorState, index: int) -> OperatorStateHandle:
    sub = state.subtask(index)
    assert sub is not None
    assert len(sub.operator) == 1
    return sub.operator[0]


def subtasks_of(result: dict[SubtaskId, TaskRestore], uid: str) -> list[TaskRestore]:
    indices = sorted(s.index for s in result if s.uid == uid)
    assert indices == list(range(len(indices))), "every subtask of an operator gets a restore, in order"
    return [result[SubtaskId(uid, i)] for i in indices]


# --- fully finished (E4) ----------------------------------------------------------------------------


@pytest.mark.parametrize("new_parallelism", [1, 3, 7])
def test_fully_finished_operator_is_finished_on_restore_at_any_parallelism(
    tmp_storage_path: str, new_parallelism: int
) -> None:
    ckpt = checkpoint(tmp_storage_path, OperatorState("done", 3, 256, fully_finished=True), keyed_operator("live", 2))
    topology = Topology((TopologyOperator("done", new_parallelism), TopologyOperator("live", 2)))
    result = assign_state(ckpt, topology.operators)
    done = subtasks_of(result, "done")
    assert len(done) == new_parallelism
    for restore in done:
        assert restore.finished_on_restore
        assert (restore.keyed, restore.operator, restore.checkpoint) == ([], [], ckpt)
    assert not any(r.finished_on_restore for r in subtasks_of(result, "live"))


# --- same parallelism (F3, F4, E6) ------------------------------------------------------------------


def test_same_parallelism_assigns_one_to_one(tmp_storage_path: str) -> None:
    ops = [operator_handle(("buffer", SPLIT, i + 1)) for i in range(3)]
    keyed = keyed_operator("agg", 3)
    state = OperatorState(
        "agg", 3, 128,
        subtasks=tuple(SubtaskState(i, keyed=(old_keyed(keyed, i),), operator=(ops[i],)) for i in range(3)),
    )  # fmt: skip
    ckpt = checkpoint(tmp_storage_path, state)
    result = subtasks_of(assign_state(ckpt, [TopologyOperator("agg", 3)]), "agg")
    for i, restore in enumerate(result):
        assert restore.keyed == [old_keyed(keyed, i)]
        assert restore.operator == [ops[i]]
        assert not restore.finished_on_restore
        assert restore.checkpoint is ckpt


def test_finished_slot_restores_empty_at_the_same_index(tmp_storage_path: str) -> None:
    state = keyed_operator("agg", 3, finished=frozenset({1}))
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("agg", 3)]), "agg")
    assert result[1].keyed == []
    assert result[1].operator == []
    assert not result[1].finished_on_restore
    assert result[0].keyed == [old_keyed(state, 0)]
    assert result[2].keyed == [old_keyed(state, 2)]


def test_stateless_running_operator_restores_empty(tmp_storage_path: str) -> None:
    result = assign_state(checkpoint(tmp_storage_path, OperatorState("map", 2, 128)), [TopologyOperator("map", 4)])
    assert [(r.keyed, r.operator, r.finished_on_restore) for r in subtasks_of(result, "map")] == [([], [], False)] * 4


def test_operator_absent_from_checkpoint_gets_no_restore(tmp_storage_path: str) -> None:
    ckpt = checkpoint(tmp_storage_path, keyed_operator("agg", 2))
    topology = Topology(
        (TopologyOperator("agg", 2), TopologyOperator("new", 3, None, (InputEdge("agg", Partitioning.HASH),)))
    )
    result = assign_state(ckpt, topology.operators)
    assert not any(sub.uid == "new" for sub in result)
    assert len(subtasks_of(result, "agg")) == 2


# --- rescaled keyed state (F3) ----------------------------------------------------------------------


@pytest.mark.parametrize(("old_p", "new_p"), [(2, 3), (3, 2), (2, 1), (1, 4), (4, 7), (5, 128)])
def test_rescaled_keyed_state_gives_each_subtask_the_handles_intersecting_its_range(
    tmp_storage_path: str, old_p: int, new_p: int
) -> None:
    state = keyed_operator("agg", old_p)
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("agg", new_p)]), "agg")
    assert len(result) == new_p
    old = [old_keyed(state, i) for i in range(old_p)]
    covered: Counter[int] = Counter()
    for index, restore in enumerate(result):
        mine = key_group_range_for_subtask(128, new_p, index)
        assert restore.keyed == [h for h in old if h.key_groups.intersection(mine)]
        assert restore.operator == []
        covered.update(kg for h in restore.keyed for kg in h.key_groups.intersection(mine))
    assert covered == Counter(range(128)), "every key group is restored by exactly one new subtask"


def test_rescale_two_to_three_example(tmp_storage_path: str) -> None:
    state = keyed_operator("agg", 2)  # key groups 0..63 and 64..127
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("agg", 3)]), "agg")
    low, high = old_keyed(state, 0), old_keyed(state, 1)
    assert [r.keyed for r in result] == [[low], [low, high], [high]]  # new ranges 0..42, 43..85, 86..127


def test_rescaled_partially_finished_operator_redistributes_only_running_state(tmp_storage_path: str) -> None:
    state = keyed_operator("agg", 2, finished=frozenset({0}))  # key groups 0..63 were finished
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("agg", 4)]), "agg")
    high = old_keyed(state, 1)
    assert [r.keyed for r in result] == [[], [], [high], [high]]
    assert not any(r.finished_on_restore for r in result)


def test_rescale_uses_the_checkpoint_max_parallelism(tmp_storage_path: str) -> None:
    state = keyed_operator("agg", 2, max_p=32)  # key groups 0..15, 16..31
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("agg", 4)]), "agg")
    low, high = old_keyed(state, 0), old_keyed(state, 1)
    assert [r.keyed for r in result] == [[low], [low], [high], [high]]
    assert high.key_groups == KeyGroupRange(16, 31)


# --- rescaled operator list state (F4, F5) ----------------------------------------------------------


def _elements(restores: list[TaskRestore], name: str) -> list[list[tuple[int, int]]]:
    """Per new subtask: the (stream id, offset) elements of state ``name`` it restores."""
    return [
        [(id(h.stream), off) for h in r.operator for e in h.states if e.name == name for off in e.offsets]
        for r in restores
    ]


@pytest.mark.parametrize(("old_p", "new_p"), [(2, 3), (3, 2), (2, 1), (2, 5)])
def test_rescaled_operator_state_split_union_broadcast(tmp_storage_path: str, old_p: int, new_p: int) -> None:
    handles = [
        operator_handle(("buffer", SPLIT, 2 + i), ("offsets", UNION, 1), ("rules", BROADCAST, 3)) for i in range(old_p)
    ]
    state = OperatorState(
        "src", old_p, 128, subtasks=tuple(SubtaskState(i, operator=(h,)) for i, h in enumerate(handles))
    )
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("src", new_p)]), "src")

    assert [r.operator for r in result] == repartition_operator_state([[h] for h in handles], new_p)
    # Split: every element goes to exactly one new subtask, in balanced contiguous shares.
    split = _elements(result, "buffer")
    every = [(id(h.stream), off) for h in handles for e in h.states if e.name == "buffer" for off in e.offsets]
    assert sorted(x for share in split for x in share) == sorted(every)
    sizes = sorted(len(share) for share in split)
    assert sizes[-1] - sizes[0] <= 1
    # Union: every new subtask gets every entry.
    union = sorted((id(h.stream), off) for h in handles for e in h.states if e.name == "offsets" for off in e.offsets)
    assert len(union) == old_p
    assert all(sorted(share) == union for share in _elements(result, "offsets"))
    # Broadcast: each new subtask gets one whole copy, from reporter i % reporters.
    for i, share in enumerate(_elements(result, "rules")):
        source = handles[i % old_p]
        assert share == [(id(source.stream), off) for e in source.states if e.name == "rules" for off in e.offsets]


def test_partly_reported_broadcast_state_reaches_every_subtask_at_same_parallelism(tmp_storage_path: str) -> None:
    # Subtask 0 finished (marker, no state): each new subtask gets the copy of the one reporter (F5).
    handle = operator_handle(("rules", BROADCAST, 2), ("buffer", SPLIT, 1))
    state = OperatorState("src", 2, 128, subtasks=(SubtaskState(0, finished=True), SubtaskState(1, operator=(handle,))))
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, state), [TopologyOperator("src", 2)]), "src")
    rules = _elements(result, "rules")
    assert rules[0] == rules[1] == [(id(handle.stream), off) for off in handle.states[0].offsets]
    assert _elements(result, "buffer") == [[], [(id(handle.stream), off) for off in handle.states[1].offsets]]


# --- effective topology (F2) ------------------------------------------------------------------------


def test_effective_topology_adopts_checkpoint_max_parallelism_when_derived(tmp_storage_path: str) -> None:
    ckpt = checkpoint(tmp_storage_path, keyed_operator("agg", 2, max_p=64))
    topology = Topology((TopologyOperator("agg", 4),))
    assert effective_topology(topology, ckpt).operator("agg").max_parallelism == 64


def test_effective_topology_keeps_an_explicit_max_parallelism(tmp_storage_path: str) -> None:
    ckpt = checkpoint(tmp_storage_path, keyed_operator("agg", 2, max_p=64))
    topology = Topology((TopologyOperator("agg", 4, 256),))
    assert effective_topology(topology, ckpt).operator("agg").max_parallelism == 256


def test_effective_topology_derives_by_default_rule_otherwise(tmp_storage_path: str) -> None:
    ckpt = checkpoint(tmp_storage_path, OperatorState("done", 2, 64, fully_finished=True))
    topology = Topology((
        TopologyOperator("done", 2),
        TopologyOperator("new", 100, None, (InputEdge("done", Partitioning.HASH),)),
    ))  # fmt: skip
    effective = effective_topology(topology, ckpt)
    assert effective.operator("done").max_parallelism == 128  # fully finished: nothing to adopt
    assert effective.operator("new").max_parallelism == default_max_parallelism(100) == 256
    assert effective_topology(topology, None).operator("done").max_parallelism == 128
    # Everything else is unchanged.
    assert [(op.uid, op.parallelism, op.inputs) for op in effective] == [
        (op.uid, op.parallelism, op.inputs) for op in topology
    ]


@pytest.mark.parametrize(
    "old",
    [OperatorState("map", 2, 128), OperatorState("map", 2, 128, subtasks=(SubtaskState(0, finished=True),))],
    ids=["stateless", "only_finished_marker"],
)
def test_effective_topology_of_operator_without_state_above_old_max_parallelism(
    tmp_storage_path: str, old: OperatorState
) -> None:
    # check_restore accepts this (no state to map), so the runtime must be able to build the topology.
    topology = Topology((TopologyOperator("map", 200),))
    assert check_restore(checkpoint(tmp_storage_path, old).metadata, topology).compatible
    effective = effective_topology(topology, checkpoint(tmp_storage_path, old))
    assert effective.operator("map").max_parallelism == default_max_parallelism(200)
    result = subtasks_of(assign_state(checkpoint(tmp_storage_path, old), effective.operators), "map")
    assert len(result) == 200
    assert all(r.keyed == [] and r.operator == [] for r in result)
