"""Restore compatibility rules: can this checkpoint be restored into this topology? (DESIGN.md section 7)

One function, :func:`check_restore`, used both by the runtime before it restores and by
``keystate check-restore`` in CI. The rules follow Flink's ``Checkpoints.loadAndValidateCheckpoint``,
``VertexFinishedStateChecker`` and ``StateAssignmentOperation`` (reference section (c), V2-V5);
keystate has no chaining, so Flink's per-vertex "mixed finished state" check cannot fire and is left out.

Each operator of the new topology is judged with the status its uid has in the checkpoint (absent =
running):

========================================  =====================================================================
rule                                      rejected when
========================================  =====================================================================
``finished-predecessor``                  a fully finished operator has a predecessor that is not fully finished
``partial-all-to-all-predecessor``        a partially finished operator has an all-to-all predecessor that is
                                          not fully finished
``partial-running-pointwise-predecessor`` a partially finished operator has a running pointwise predecessor
``non-restored-state``                    an operator with state is missing from the topology (unless allowed)
``max-parallelism-mismatch``              a keyed operator's explicit max parallelism differs from the checkpoint's
``parallelism-exceeds-max``               new parallelism > the checkpoint's max parallelism (operator with state)
========================================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keystate.storage.metadata import CheckpointMetadata, OperatorStatus
from keystate.storage.topology import Partitioning, Topology

__all__ = ["RULES", "RestoreReport", "Violation", "check_restore"]

RULES = (
    "finished-predecessor",
    "partial-all-to-all-predecessor",
    "partial-running-pointwise-predecessor",
    "non-restored-state",
    "max-parallelism-mismatch",
    "parallelism-exceeds-max",
)


@dataclass(frozen=True)
class Violation:
    rule: str
    """One of :data:`RULES`."""
    operator: str
    """The uid the violation is about."""
    message: str
    """A sentence saying what is wrong, where, and what to do."""
    predecessor: str | None = None
    """The offending predecessor's uid, for the predecessor rules."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": self.rule, "operator": self.operator, "message": self.message}
        if self.predecessor is not None:
            d["predecessor"] = self.predecessor
        return d


@dataclass(frozen=True)
class RestoreReport:
    checkpoint_id: int
    violations: tuple[Violation, ...] = field(default_factory=tuple)

    @property
    def compatible(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "checkpoint_id": self.checkpoint_id,
            "violations": [v.to_dict() for v in self.violations],
        }


def _status(metadata: CheckpointMetadata, uid: str) -> OperatorStatus:
    op = metadata.operator(uid)
    return OperatorStatus.RUNNING if op is None else op.status


def check_restore(
    metadata: CheckpointMetadata, topology: Topology, *, allow_non_restored_state: bool = False
) -> RestoreReport:
    """Every rule violation of restoring ``metadata`` into ``topology`` (empty = compatible)."""
    where = f"checkpoint {metadata.checkpoint_id}"
    found: list[Violation] = []
    for op in topology.topological_order():
        status = _status(metadata, op.uid)
        # Several edges from one predecessor: all-to-all wins (Flink's VertexFinishedStateChecker).
        edges: dict[str, bool] = {}
        for edge in op.inputs:
            all_to_all = not edge.partitioning.pointwise
            edges[edge.source] = edges.get(edge.source, False) or all_to_all
        for pred, all_to_all in edges.items():
            pred_status = _status(metadata, pred)
            if status is OperatorStatus.FULLY_FINISHED and pred_status is not OperatorStatus.FULLY_FINISHED:
                found.append(Violation(
                    "finished-predecessor", op.uid,
                    f"operator {op.uid!r} is fully finished in {where} but its predecessor {pred!r} is "
                    f"{pred_status.value.replace('_', ' ')}; a finished operator cannot get a running input: "
                    f"remove {pred!r} from before {op.uid!r}, or give {op.uid!r} a new uid to start it fresh",
                    pred,
                ))  # fmt: skip
            elif (
                status is OperatorStatus.PARTIALLY_FINISHED
                and all_to_all
                and pred_status is not OperatorStatus.FULLY_FINISHED
            ):
                kind = "a partially finished" if pred_status is OperatorStatus.PARTIALLY_FINISHED else "an all running"
                found.append(Violation(
                    "partial-all-to-all-predecessor", op.uid,
                    f"operator {op.uid!r} is partially finished in {where} and its all-to-all predecessor {pred!r} "
                    f"is {kind} operator; connect {pred!r} pointwise (forward/rescale), remove it, or restore "
                    f"from a checkpoint taken before {op.uid!r} started finishing",
                    pred,
                ))  # fmt: skip
            elif (
                status is OperatorStatus.PARTIALLY_FINISHED and not all_to_all and pred_status is OperatorStatus.RUNNING
            ):
                found.append(Violation(
                    "partial-running-pointwise-predecessor", op.uid,
                    f"operator {op.uid!r} is partially finished in {where} but its pointwise predecessor {pred!r} "
                    f"is all running (or new); finished subtasks of {op.uid!r} would receive records again: remove "
                    f"{pred!r} from before {op.uid!r} or restore from an earlier checkpoint",
                    pred,
                ))  # fmt: skip
        old = metadata.operator(op.uid)
        if old is None or old.fully_finished:
            continue  # no subtask state: parallelism and max parallelism checks do not apply (reference E4)
        keyed = old.has_keyed_state or any(e.partitioning is Partitioning.HASH for e in op.inputs)
        if op.max_parallelism is not None and keyed and op.max_parallelism != old.max_parallelism:
            found.append(Violation(
                "max-parallelism-mismatch", op.uid,
                f"{where} was written with max_parallelism {old.max_parallelism} but operator {op.uid!r} now "
                f"declares {op.max_parallelism}; keep {old.max_parallelism} (or leave it unset to adopt it) or "
                "start without state",
            ))  # fmt: skip
        if old.has_state and op.parallelism > old.max_parallelism:
            found.append(Violation(
                "parallelism-exceeds-max", op.uid,
                f"operator {op.uid!r} now has parallelism {op.parallelism}, but the maximum parallelism of its "
                f"state in {where} is {old.max_parallelism}; reduce the parallelism to {old.max_parallelism} or less",
            ))  # fmt: skip
    for old in metadata.operators:
        if old.uid not in topology and old.has_state and not allow_non_restored_state:
            found.append(Violation(
                "non-restored-state", old.uid,
                f"{where} holds state for operator {old.uid!r}, which is not in the new topology; restore its uid "
                "or pass --allow-non-restored-state to drop that state",
            ))  # fmt: skip
    return RestoreReport(metadata.checkpoint_id, tuple(found))
