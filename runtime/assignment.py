"""State assignment on restore (Flink's ``StateAssignmentOperation``; rules E4-E7, F2-F5 of docs/flink-rules.md).

For each operator of the new job: absent from the checkpoint -> starts empty; ``fully_finished`` ->
every new subtask is deployed finished-on-restore, whatever the new parallelism; otherwise keyed
handles go 1:1 at the same parallelism or by key-group intersection when rescaled, operator list
state is redistributed by :func:`keystate.statebackend.repartition.repartition_operator_state`, and finished
subtask slots contribute nothing (a partially finished operator restores like one with as many
subtasks as were running). A derived max parallelism adopts the checkpoint's value.
"""

from __future__ import annotations

from collections.abc import Iterable

from keystate.runtime.plan import SubtaskId
from keystate.runtime.task import TaskRestore
from keystate.statebackend.repartition import assign_keyed_handles, repartition_operator_state
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import KeyedStateHandle, OperatorStateHandle
from keystate.storage.format.topology import Topology, TopologyOperator

__all__ = ["assign_state", "effective_topology"]


def effective_topology(topology: Topology, checkpoint: CompletedCheckpoint | None) -> Topology:
    """The topology with every max parallelism concrete: explicit, else the checkpoint's (when the
    operator has state there), else Flink's default rule.
    """
    operators = []
    for op in topology.operators:
        max_p = op.max_parallelism
        if max_p is None and checkpoint is not None:
            old = checkpoint.metadata.operator(op.uid)
            # Only state pins the key groups; a stateless operator may exceed the old max parallelism.
            if old is not None and old.has_state:
                max_p = old.max_parallelism
        operators.append(TopologyOperator(op.uid, op.parallelism, max_p or op.effective_max_parallelism, op.inputs))
    return Topology(tuple(operators))


def assign_state(checkpoint: CompletedCheckpoint, topology: Iterable[TopologyOperator]) -> dict[SubtaskId, TaskRestore]:
    """What every subtask of the new job restores (subtasks of operators absent from the checkpoint
    are left out: they start empty).
    """
    result: dict[SubtaskId, TaskRestore] = {}
    metadata = checkpoint.metadata
    for op in topology:
        old = metadata.operator(op.uid)
        if old is None:
            continue
        if old.fully_finished:
            for index in range(op.parallelism):
                result[SubtaskId(op.uid, index)] = TaskRestore(checkpoint, [], [], finished_on_restore=True)
            continue
        keyed: list[list[KeyedStateHandle]] = [[] for _ in range(old.parallelism)]
        operator: list[list[OperatorStateHandle]] = [[] for _ in range(old.parallelism)]
        for st in old.subtasks:
            if not st.finished:
                keyed[st.index] = list(st.keyed)
                operator[st.index] = list(st.operator)
        if old.has_state:
            new_keyed = assign_keyed_handles(keyed, op.parallelism, old.max_parallelism)
            new_operator = repartition_operator_state(operator, op.parallelism)
        else:  # nothing to redistribute; the new parallelism may even exceed the old max parallelism
            new_keyed, new_operator = [[] for _ in range(op.parallelism)], [[] for _ in range(op.parallelism)]
        for index in range(op.parallelism):
            result[SubtaskId(op.uid, index)] = TaskRestore(checkpoint, new_keyed[index], new_operator[index])
    return result
