"""The checkpoint plan (rules B1-B5 of docs/flink-rules.md): Flink's DefaultCheckpointPlanCalculatorTest, ported.

Notation of the scenarios: ``A2A`` = an all-to-all edge (hash, rebalance or broadcast), ``PW`` = a
pointwise edge (forward at equal parallelism, rescale otherwise); ``v(p){i, j}`` = parallelism ``p``
with subtasks ``i`` and ``j`` FINISHED.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.runtime.plan import (
    CheckpointPlan,
    PlanRejectedError,
    SubtaskId,
    SubtaskStatus,
    calculate_plan,
    pointwise_sources,
    pointwise_targets,
)
from keystate.storage.format.topology import InputEdge, Partitioning, Topology, TopologyOperator

A2A = [Partitioning.HASH, Partitioning.REBALANCE, Partitioning.BROADCAST]
EQUAL_PW = [Partitioning.FORWARD, Partitioning.RESCALE]


def vertex(uid: str, parallelism: int, *inputs: tuple[str, Partitioning]) -> TopologyOperator:
    return TopologyOperator(uid, parallelism, None, tuple(InputEdge(src, kind) for src, kind in inputs))


def subtasks(uid: str, indices: Iterable[int]) -> set[SubtaskId]:
    return {SubtaskId(uid, i) for i in indices}


def statuses(topology: Topology, finished: Mapping[str, Iterable[int]]) -> dict[SubtaskId, SubtaskStatus]:
    done = {SubtaskId(uid, i) for uid, indices in finished.items() for i in indices}
    return {
        SubtaskId(op.uid, i): SubtaskStatus.FINISHED if SubtaskId(op.uid, i) in done else SubtaskStatus.RUNNING
        for op in topology
        for i in range(op.parallelism)
    }


def check_plan(
    topology: Topology,
    finished: Mapping[str, Iterable[int]],
    trigger: set[SubtaskId],
    fully_finished: set[str],
) -> CheckpointPlan:
    """Compute the plan and check all of it, as Flink's ``checkComputedPlan`` does: the triggered
    tasks, the awaited (= notified) tasks = every running task, the finished tasks and the fully
    finished operators.
    """
    status = statuses(topology, finished)
    plan = calculate_plan(topology, status)
    running = {sub for sub, s in status.items() if s is SubtaskStatus.RUNNING}
    done = {sub for sub, s in status.items() if s is SubtaskStatus.FINISHED}
    assert set(plan.tasks_to_trigger) == trigger
    assert len(plan.tasks_to_trigger) == len(trigger), "a task is triggered twice"
    assert plan.tasks_to_wait_for == running
    assert plan.tasks_to_commit_to == running
    assert plan.finished_tasks == done
    assert plan.fully_finished_operators == fully_finished
    return plan


@pytest.mark.parametrize("a2a", A2A)
def test_compute_all_running_graph(a2a: Partitioning) -> None:
    topology = Topology((
        vertex("v0", 3),
        vertex("v1", 4),
        vertex("v2", 5, ("v0", a2a), ("v1", Partitioning.RESCALE)),
        vertex("v3", 6, ("v2", a2a)),
    ))  # fmt: skip
    plan = check_plan(topology, {}, subtasks("v0", range(3)) | subtasks("v1", range(4)), set())
    assert len(plan.tasks_to_wait_for) == 3 + 4 + 5 + 6


@pytest.mark.parametrize("a2a", A2A)
def test_all_to_all_edge_with_some_sources_finished(a2a: Partitioning) -> None:
    topology = Topology((vertex("v0", 3), vertex("v1", 4, ("v0", a2a))))
    check_plan(topology, {"v0": {0, 1}}, {SubtaskId("v0", 2)}, set())


@pytest.mark.parametrize("pw", EQUAL_PW)
def test_one_to_one_edge_with_some_sources_finished(pw: Partitioning) -> None:
    topology = Topology((vertex("v0", 4), vertex("v1", 4, ("v0", pw))))
    check_plan(topology, {"v0": {0, 1}}, subtasks("v0", [2, 3]) | subtasks("v1", [0, 1]), set())


@pytest.mark.parametrize("pw", EQUAL_PW)
def test_one_to_one_edge_with_some_sources_and_targets_finished(pw: Partitioning) -> None:
    topology = Topology((vertex("v0", 4), vertex("v1", 4, ("v0", pw))))
    check_plan(topology, {"v0": {0, 1}, "v1": {0}}, subtasks("v0", [2, 3]) | {SubtaskId("v1", 1)}, set())


@pytest.mark.parametrize("a2a", A2A)
def test_compute_with_multiple_inputs(a2a: Partitioning) -> None:
    topology = Topology((
        vertex("v0", 3),
        vertex("v1", 5),
        vertex("v2", 5),
        vertex("v3", 5, ("v0", a2a), ("v1", Partitioning.FORWARD), ("v2", Partitioning.FORWARD)),
    ))  # fmt: skip
    finished = {"v0": range(3), "v1": {0, 2, 3}, "v2": {2, 4}, "v3": {2}}
    plan = check_plan(topology, finished, subtasks("v1", [1, 4]) | subtasks("v2", [0, 1, 3]), {"v0"})
    assert not any(sub.uid == "v3" for sub in plan.tasks_to_trigger)


@pytest.mark.parametrize(
    ("pw", "a2a"), [(Partitioning.FORWARD, Partitioning.HASH), (Partitioning.RESCALE, Partitioning.BROADCAST)]
)
def test_compute_with_multiple_levels(pw: Partitioning, a2a: Partitioning) -> None:
    topology = Topology((
        vertex("v0", 16),
        vertex("v1", 16),
        vertex("v2", 16, ("v0", pw), ("v1", a2a)),
        vertex("v3", 16, ("v0", pw), ("v1", pw)),
        vertex("v4", 16, ("v2", pw), ("v3", a2a)),
    ))  # fmt: skip
    finished = {"v0": range(4), "v1": range(16), "v2": {0, 1}}
    trigger = subtasks("v0", range(4, 16)) | subtasks("v2", [2, 3]) | subtasks("v3", range(4))
    check_plan(topology, finished, trigger, {"v1"})


def test_triggered_tasks_come_in_topological_order() -> None:
    topology = Topology((vertex("down", 2, ("up", Partitioning.FORWARD)), vertex("up", 2)))
    plan = calculate_plan(topology, statuses(topology, {"up": {0}}))
    assert plan.tasks_to_trigger == (SubtaskId("up", 1), SubtaskId("down", 0))


def test_pointwise_rescale_upstream_connection_blocks_triggering() -> None:
    # 2 -> 4 rescale: up[0] feeds down[0, 1], up[1] feeds down[2, 3]; only down[0, 1] lost their input.
    topology = Topology((vertex("up", 2), vertex("down", 4, ("up", Partitioning.RESCALE))))
    check_plan(topology, {"up": {0}}, {SubtaskId("up", 1)} | subtasks("down", [0, 1]), set())
    # 4 -> 2 rescale: down[0] reads up[0, 1]; it is triggered only once both finished.
    topology = Topology((vertex("up", 4), vertex("down", 2, ("up", Partitioning.RESCALE))))
    check_plan(topology, {"up": {0}}, subtasks("up", [1, 2, 3]), set())
    check_plan(topology, {"up": {0, 1}}, subtasks("up", [2, 3]) | {SubtaskId("down", 0)}, set())


def test_fully_finished_graph_awaits_nothing() -> None:
    topology = Topology((vertex("a", 2), vertex("b", 3, ("a", Partitioning.HASH))))
    check_plan(topology, {"a": range(2), "b": range(3)}, set(), {"a", "b"})


# --- tasks that are not running (rule B2) -----------------------------------------------------------


def _two_vertices() -> Topology:
    return Topology((vertex("src", 2), vertex("map", 2, ("src", Partitioning.HASH))))


@pytest.mark.parametrize("missing", [False, True], ids=["not_running", "no_status"])
@pytest.mark.parametrize(
    ("target", "finished"),
    [
        (SubtaskId("src", 1), {}),
        (SubtaskId("map", 0), {}),
        (SubtaskId("src", 1), {"src": {0}}),
        (SubtaskId("map", 1), {"src": {0, 1}}),
        (SubtaskId("map", 1), {"src": {0, 1}, "map": {0}}),
    ],
    ids=["source", "non_source", "source_some_finished", "non_source_sources_finished", "rest_of_vertex_finished"],
)
def test_plan_calculation_when_one_task_not_running(
    target: SubtaskId, finished: dict[str, set[int]], missing: bool
) -> None:
    topology = _two_vertices()
    status = statuses(topology, finished)
    if missing:
        del status[target]
    else:
        status[target] = SubtaskStatus.NOT_RUNNING
    with pytest.raises(
        PlanRejectedError, match=rf"Checkpoint triggering task {target.uid}\[{target.index}\] is not being executed"
    ):
        calculate_plan(topology, status)


def test_finished_tasks_rejected_when_checkpoints_after_finish_disabled() -> None:
    topology = _two_vertices()
    with pytest.raises(
        PlanRejectedError,
        match=r"^Some tasks of the job have already finished and checkpointing with finished tasks is not enabled\.$",
    ):
        calculate_plan(topology, statuses(topology, {"src": {0}}), allow_finished=False)


def test_all_running_plan_unaffected_when_checkpoints_after_finish_disabled() -> None:
    topology = _two_vertices()
    plan = calculate_plan(topology, statuses(topology, {}), allow_finished=False)
    assert set(plan.tasks_to_trigger) == subtasks("src", range(2))
    assert plan.finished_tasks == frozenset()


# --- pointwise subtask mapping (rule B5) ------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def b5_consumer_reads(index: int, s: int, t: int) -> list[int]:
    """s >= t: consumer i reads upstream [floor(i*s/t), floor((i+1)*s/t) - 1]."""
    return list(range(index * s // t, (index + 1) * s // t))


def b5_producer_feeds(index: int, s: int, t: int) -> list[int]:
    """s < t: upstream j feeds consumers [ceil(j*t/s), ceil((j+1)*t/s) - 1]."""
    return list(range(_ceil_div(index * t, s), _ceil_div((index + 1) * t, s)))


@pytest.mark.parametrize(
    ("s", "t", "sources", "targets"),
    [
        (4, 4, [[0], [1], [2], [3]], [[0], [1], [2], [3]]),
        (4, 5, [[0], [0], [1], [2], [3]], [[0, 1], [2], [3], [4]]),
        (5, 2, [[0, 1], [2, 3, 4]], [[0], [0], [1], [1], [1]]),
        (6, 4, [[0], [1, 2], [3], [4, 5]], [[0], [1], [1], [2], [3], [3]]),
        (1, 3, [[0], [0], [0]], [[0, 1, 2]]),
        (3, 1, [[0, 1, 2]], [[0], [0], [0]]),
    ],
)
def test_pointwise_mapping_examples(s: int, t: int, sources: list[list[int]], targets: list[list[int]]) -> None:
    assert [pointwise_sources(i, s, t) for i in range(t)] == sources
    assert [pointwise_targets(j, s, t) for j in range(s)] == targets


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 160), st.integers(1, 160), st.data())
def test_pointwise_mapping_matches_b5(s: int, t: int, data: st.DataObject) -> None:
    consumer = data.draw(st.integers(0, t - 1), label="consumer")
    producer = data.draw(st.integers(0, s - 1), label="producer")
    if s >= t:
        assert pointwise_sources(consumer, s, t) == b5_consumer_reads(consumer, s, t)
        assert len(pointwise_targets(producer, s, t)) == 1  # each upstream feeds exactly one consumer
    else:
        assert pointwise_targets(producer, s, t) == b5_producer_feeds(producer, s, t)
        assert len(pointwise_sources(consumer, s, t)) == 1  # each consumer reads exactly one upstream


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64))
def test_pointwise_sources_and_targets_are_inverse(s: int, t: int) -> None:
    reads = {(j, i) for i in range(t) for j in pointwise_sources(i, s, t)}
    feeds = {(j, i) for j in range(s) for i in pointwise_targets(j, s, t)}
    assert reads == feeds
    # Every subtask on both sides is connected, each list is ascending and contiguous.
    assert {j for j, _ in reads} == set(range(s))
    assert {i for _, i in reads} == set(range(t))
    for lst in [pointwise_sources(i, s, t) for i in range(t)] + [pointwise_targets(j, s, t) for j in range(s)]:
        assert lst == list(range(lst[0], lst[0] + len(lst)))
