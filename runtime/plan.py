"""The checkpoint plan: which tasks to trigger, wait for, and notify (rules B1-B5 of docs/flink-rules.md).

With no finished task, every source subtask is triggered and every subtask is awaited. Once some
tasks finished (FLIP-147), the plan triggers exactly the running tasks with no running predecessor:
an all-to-all input blocks triggering if any upstream subtask runs, a pointwise input only through the
upstream subtasks connected to that subtask (Flink's ``DefaultCheckpointPlanCalculator``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from keystate.storage.format.topology import Topology

__all__ = [
    "CheckpointPlan",
    "PlanRejectedError",
    "SubtaskId",
    "SubtaskStatus",
    "calculate_plan",
    "pointwise_sources",
    "pointwise_targets",
]


@dataclass(frozen=True, order=True, slots=True)
class SubtaskId:
    uid: str
    index: int

    def __str__(self) -> str:
        return f"{self.uid}[{self.index}]"


class SubtaskStatus(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    NOT_RUNNING = "not_running"
    """Deploying, failed or canceled: not able to take part in a checkpoint."""


class PlanRejectedError(Exception):
    """The plan cannot be made (Flink ``NOT_ALL_REQUIRED_TASKS_RUNNING``); the message says why."""


def pointwise_sources(index: int, upstream: int, downstream: int) -> list[int]:
    """Upstream subtasks a pointwise consumer ``index`` reads from (rule B5)."""
    if upstream >= downstream:
        return list(range(index * upstream // downstream, (index + 1) * upstream // downstream))
    return [j for j in range(upstream) if index in pointwise_targets(j, upstream, downstream)]


def pointwise_targets(index: int, upstream: int, downstream: int) -> list[int]:
    """Downstream subtasks a pointwise producer ``index`` writes to (rule B5)."""
    if upstream >= downstream:
        return [i for i in range(downstream) if i * upstream // downstream <= index < (i + 1) * upstream // downstream]
    start = (index * downstream + upstream - 1) // upstream
    end = ((index + 1) * downstream + upstream - 1) // upstream
    return list(range(start, end))


@dataclass(frozen=True)
class CheckpointPlan:
    tasks_to_trigger: tuple[SubtaskId, ...]
    tasks_to_wait_for: frozenset[SubtaskId]
    tasks_to_commit_to: frozenset[SubtaskId]
    finished_tasks: frozenset[SubtaskId]
    fully_finished_operators: frozenset[str]


def calculate_plan(
    topology: Topology, status: Mapping[SubtaskId, SubtaskStatus], *, allow_finished: bool = True
) -> CheckpointPlan:
    """Compute the plan from each subtask's status.

    Raises:
        PlanRejectedError: finished tasks while ``allow_finished`` is off, or an awaited task not running.
    """

    def finished(uid: str, index: int) -> bool:
        return status.get(SubtaskId(uid, index)) is SubtaskStatus.FINISHED

    any_finished = any(s is SubtaskStatus.FINISHED for s in status.values())
    if any_finished and not allow_finished:
        raise PlanRejectedError(
            "Some tasks of the job have already finished and checkpointing with finished tasks is not enabled."
        )
    trigger: list[SubtaskId] = []
    wait: set[SubtaskId] = set()
    done: set[SubtaskId] = set()
    fully: set[str] = set()
    for op in topology.topological_order():
        subtasks = [SubtaskId(op.uid, i) for i in range(op.parallelism)]
        if not any_finished:
            wait.update(subtasks)
            if not op.inputs:
                trigger.extend(subtasks)
            continue
        if all(finished(op.uid, i) for i in range(op.parallelism)):
            fully.add(op.uid)
            done.update(subtasks)
            continue
        must_trigger = True
        pointwise: list[tuple[str, int]] = []
        for edge in op.inputs:
            up = topology.operator(edge.source)
            running_up = sum(1 for j in range(up.parallelism) if not finished(up.uid, j))
            if not edge.partitioning.pointwise:
                must_trigger = must_trigger and running_up == 0
            else:
                must_trigger = must_trigger and running_up < up.parallelism
                pointwise.append((up.uid, up.parallelism))
        for sub in subtasks:
            if finished(sub.uid, sub.index):
                done.add(sub)
                continue
            wait.add(sub)
            if must_trigger and all(
                finished(uid, j) for uid, p in pointwise for j in pointwise_sources(sub.index, p, op.parallelism)
            ):
                trigger.append(sub)
    for sub in sorted(wait):
        if status.get(sub) is not SubtaskStatus.RUNNING:
            raise PlanRejectedError(f"Checkpoint triggering task {sub} is not being executed at the moment.")
    return CheckpointPlan(tuple(trigger), frozenset(wait), frozenset(wait), frozenset(done), frozenset(fully))
