"""Restore compatibility rules: can this checkpoint be restored into this topology?

One function, :func:`check_restore`, used both by the runtime before it restores and by
``keystate check-restore`` in CI, for keystate checkpoints and for Apache Flink checkpoints and savepoints
alike. The rules are Flink's, in Flink's order (rules V2-V6 of docs/flink-rules.md; each rule id is
explained at docs/flink-rules.md#restore-rules):

1. ``Checkpoints.loadAndValidateCheckpoint``, per operator of the checkpoint: its max parallelism, and
   state that the new job would not restore;
2. ``VertexFinishedStateChecker``, per job vertex of the new topology (an operator chain when the
   topology lists ``chains``, else one operator): mixed finished state inside a vertex, then the
   finished-state rules against its predecessor vertices;
3. ``StateAssignmentOperation``, per vertex that gets state assigned: the parallelism precondition.

Operators are matched as Flink matches them: a keystate checkpoint by uid, a Flink checkpoint by operator
ID (the topology's ``operator_id``, else the MurmurHash3 of the uid). An operator absent from the
checkpoint counts as running. Unlike Flink, which stops at the first violation, every violation is
reported.

========================================  =====================================================================
rule                                      rejected when
========================================  =====================================================================
``finished-predecessor``                  a fully finished vertex has a predecessor that is not fully finished
``partial-all-to-all-predecessor``        a partially finished vertex has an all-to-all predecessor that is
                                          not fully finished
``partial-running-pointwise-predecessor`` a partially finished vertex has a running pointwise predecessor
``non-restored-state``                    an operator with state is missing from the topology (unless allowed)
``max-parallelism-mismatch``              an explicit max parallelism differs from the checkpoint's, for any
                                          operator of the checkpoint that the topology has
``parallelism-exceeds-max``               new parallelism > the checkpoint's max parallelism (vertex with state)
``mixed-finished-chain``                  one chain mixes fully finished and other operators
========================================  =====================================================================

Besides the verdict, the report says what the restore would do with state (``dropped_state``,
``starts_empty``) and warns when nothing of the checkpoint would be restored at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keystate.storage.format.flink import FlinkCheckpointMetadata, FlinkOperatorState
from keystate.storage.format.metadata import CheckpointMetadata, OperatorState, OperatorStatus
from keystate.storage.format.topology import Partitioning, Topology, TopologyOperator

__all__ = ["RULES", "RestoreReport", "Violation", "check_restore"]

RULES = (
    "finished-predecessor",
    "partial-all-to-all-predecessor",
    "partial-running-pointwise-predecessor",
    "non-restored-state",
    "max-parallelism-mismatch",
    "parallelism-exceeds-max",
    "mixed-finished-chain",
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
    operator_id: str | None = None
    """Flink checkpoints: the operator ID of ``operator`` (32 hex digits), as Flink's own message names it."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": self.rule, "operator": self.operator, "message": self.message}
        if self.predecessor is not None:
            d["predecessor"] = self.predecessor
        if self.operator_id is not None:
            d["operator_id"] = self.operator_id
        return d


@dataclass(frozen=True)
class RestoreReport:
    checkpoint_id: int
    violations: tuple[Violation, ...] = field(default_factory=tuple)
    dropped_state: tuple[str, ...] = ()
    """Operators of the checkpoint (uid, or operator ID when the checkpoint names no uid) that hold state the
    new topology does not have: a restore drops it, and is allowed only with non-restored state allowed."""
    starts_empty: tuple[str, ...] = ()
    """Operators of the new topology (uid) that the checkpoint does not have: they start without state."""
    warnings: tuple[str, ...] = ()
    """Sentences about a restore that the rules allow but that may not be what was meant."""
    source_format: str = "keystate"
    """``keystate`` or ``flink``: what wrote the checkpoint."""

    @property
    def compatible(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "checkpoint_id": self.checkpoint_id,
            "violations": [v.to_dict() for v in self.violations],
            "dropped_state": list(self.dropped_state),
            "starts_empty": list(self.starts_empty),
            "warnings": list(self.warnings),
            "source_format": self.source_format,
        }


@dataclass(frozen=True, slots=True)
class _Old:
    """One operator of the checkpoint, as the rules see it, whichever format wrote it."""

    key: str
    """What the topology is matched by: the uid (keystate) or the operator ID (Flink)."""
    label: str
    """How reports name it: the uid, or the operator ID when a Flink checkpoint stores no uid."""
    operator_id: str | None
    status: OperatorStatus
    max_parallelism: int
    has_state: bool
    """Flink's ``hasState()``: coordinator state or a handle in any subtask (what a restore could drop)."""
    assigns_state: bool
    """Whether its vertex gets state assigned on restore, so that the parallelism precondition applies:
    Flink counts any subtask entry (``getNumberCollectedStates() > 0``: finished markers and entries without
    handles too), keystate any state handle (it needs no key-group split for state it does not have)."""

    @classmethod
    def of_keystate(cls, op: OperatorState) -> _Old:
        return cls(op.uid, op.uid, None, op.status, op.max_parallelism, op.has_state, op.has_state)

    @classmethod
    def of_flink(cls, op: FlinkOperatorState) -> _Old:
        label = op.uid or op.operator_id
        entries = bool(op.subtasks)
        return cls(op.operator_id, label, op.operator_id, op.status, op.max_parallelism, op.has_state, entries)

    def name(self) -> str:
        if self.operator_id is None:
            return repr(self.label)
        if self.label == self.operator_id:
            return f"{self.operator_id} (the checkpoint stores no uid for it)"
        return f"{self.label!r} (ID {self.operator_id})"


class _Restore:
    """The checkpoint's operators matched to the topology's, as Flink matches them."""

    def __init__(self, metadata: CheckpointMetadata | FlinkCheckpointMetadata, topology: Topology) -> None:
        self.flink = isinstance(metadata, FlinkCheckpointMetadata)
        if isinstance(metadata, FlinkCheckpointMetadata):
            self.olds = [_Old.of_flink(op) for op in metadata.operators]
        else:
            self.olds = [_Old.of_keystate(op) for op in metadata.operators]
        by_key = {old.key: old for old in self.olds}
        self.old_of: dict[str, _Old | None] = {op.uid: by_key.get(self.key(op)) for op in topology}
        self.new_of: dict[str, TopologyOperator] = {}
        for op in topology:
            old = self.old_of[op.uid]
            if old is not None:
                self.new_of[old.key] = op

    def key(self, op: TopologyOperator) -> str:
        return op.flink_operator_id if self.flink else op.uid

    def status(self, uid: str) -> OperatorStatus:
        old = self.old_of[uid]
        return OperatorStatus.RUNNING if old is None else old.status

    def name(self, op: TopologyOperator, *notes: str) -> str:
        """``'uid'``, for a Flink checkpoint ``'uid' (ID <operator ID>)``, with ``notes`` in the parentheses."""
        parts = [f"ID {op.flink_operator_id}"] if self.flink else []
        parts += notes
        return f"{op.uid!r} ({', '.join(parts)})" if parts else repr(op.uid)


def _words(status: OperatorStatus) -> str:
    return status.value.replace("_", " ")


def check_restore(
    metadata: CheckpointMetadata | FlinkCheckpointMetadata,
    topology: Topology,
    *,
    allow_non_restored_state: bool = False,
) -> RestoreReport:
    """Every rule violation of restoring ``metadata`` into ``topology`` (none = compatible), and what the
    restore would do with the checkpoint's state.

    Args:
        metadata: a keystate checkpoint's metadata, or a parsed Flink ``_metadata``.
        topology: the new job; its ``chains`` and ``operator_id`` matter for Flink checkpoints.
        allow_non_restored_state: whether state of operators the topology no longer has may be dropped.
    """
    restore = _Restore(metadata, topology)
    where = f"checkpoint {metadata.checkpoint_id}"
    found: list[Violation] = []
    _check_mapping(restore, topology, where, allow_non_restored_state, found)
    _check_finished_state(restore, topology, where, found)
    _check_parallelism(restore, topology, where, found)
    dropped = tuple(old.label for old in restore.olds if old.key not in restore.new_of and old.has_state)
    starts_empty = tuple(op.uid for op in topology if restore.old_of[op.uid] is None)
    warnings: list[str] = []
    if restore.olds and not restore.new_of:
        by = "operator ID (the topology's operator_id, else the hash of its uid)" if restore.flink else "uid"
        warnings.append(
            f"no operator of the new topology matches an operator of {where} by {by}: nothing would be restored "
            "and every operator starts empty; is this the checkpoint of another job?"
        )
    if allow_non_restored_state and dropped:
        names = ", ".join(repr(label) for label in dropped)
        warnings.append(f"the state of {len(dropped)} operator(s) of {where} will be dropped: {names}")
    if isinstance(metadata, FlinkCheckpointMetadata):
        warnings += _uid_cross_check(restore, metadata, topology)
        if not topology.chains:
            warnings += _unknown_chains(restore, topology)
    return RestoreReport(
        metadata.checkpoint_id,
        tuple(found),
        dropped,
        starts_empty,
        tuple(warnings),
        "flink" if restore.flink else "keystate",
    )


def _check_mapping(
    restore: _Restore, topology: Topology, where: str, allow_non_restored_state: bool, found: list[Violation]
) -> None:
    """``Checkpoints.loadAndValidateCheckpoint``: every operator of the checkpoint, in the checkpoint's order.

    Max parallelism is Flink's per job vertex (the chain head's): an explicit one must equal the checkpoint's
    for every operator found in the new job, fully finished and stateless ones included; a derived one
    adopts the checkpoint's.
    """
    for old in restore.olds:
        new = restore.new_of.get(old.key)
        if new is None:
            if old.has_state and not allow_non_restored_state:
                found.append(Violation(
                    "non-restored-state", old.label,
                    f"{where} holds state for operator {old.name()}, which is not in the new topology; restore "
                    "its uid or pass --allow-non-restored-state to drop that state",
                    operator_id=old.operator_id,
                ))  # fmt: skip
            continue
        head = topology.vertex(new.uid)[0]
        explicit = head.max_parallelism
        if explicit is not None and explicit != old.max_parallelism:
            chained = f" (the max parallelism of its chain head {head.uid!r})" if head is not new else ""
            notes = () if old.status is OperatorStatus.RUNNING else (_words(old.status),)
            found.append(Violation(
                "max-parallelism-mismatch", new.uid,
                f"{where} was written with max_parallelism {old.max_parallelism} but operator "
                f"{restore.name(new, *notes)} now declares {explicit}{chained}; keep {old.max_parallelism} (or "
                "leave it unset to adopt it) or start without state",
                operator_id=old.operator_id,
            ))  # fmt: skip


def _check_finished_state(restore: _Restore, topology: Topology, where: str, found: list[Violation]) -> None:
    """``VertexFinishedStateChecker``: one finished state per vertex, then each vertex against its inputs."""
    order = list(OperatorStatus)  # running < partially finished < fully finished, as Flink sorts them
    vertex_status: dict[str, OperatorStatus | None] = {}
    for vertex in topology.vertices():
        head = vertex[0]
        statuses = sorted({restore.status(op.uid) for op in vertex}, key=order.index)
        vertex_status[head.uid] = statuses[0] if len(statuses) == 1 else None
        if len(statuses) > 1:
            groups = []
            for state in statuses:
                ops = [op for op in vertex if restore.status(op.uid) is state]
                new = " (new)" if any(restore.old_of[op.uid] is None for op in ops) else ""
                verb = "is" if len(ops) == 1 else "are"
                groups.append(f"{', '.join(restore.name(op) for op in ops)} {verb} {_words(state)}{new}")
            parts = "; ".join(groups)
            chain = " -> ".join(repr(op.uid) for op in vertex)
            found.append(Violation(
                "mixed-finished-chain", head.uid,
                f"the chain {chain} is one Flink job vertex, but its operators are not in one finished state in "
                f"{where}: {parts}; a vertex restores as a whole: do not chain running operators with fully "
                "finished ones (move them out with startNewChain()/disableChaining(), after the finished "
                "operators, not before), or give the finished operators new uids to start them fresh",
                operator_id=head.flink_operator_id if restore.flink else None,
            ))  # fmt: skip
    for vertex in topology.vertices():
        status = vertex_status[vertex[0].uid]
        if status is None or status is OperatorStatus.RUNNING:
            continue  # mixed (reported above), or running: a running vertex may follow anything
        members = {op.uid for op in vertex}
        # Per predecessor vertex: the edge that decides (all-to-all wins over pointwise, as in Flink).
        inputs: dict[str, tuple[bool, TopologyOperator, str]] = {}
        for op in vertex:
            for edge in op.inputs:
                if edge.source in members:
                    continue  # inside the chain
                pred_head = topology.vertex(edge.source)[0].uid
                all_to_all = not edge.partitioning.pointwise
                if pred_head not in inputs or (all_to_all and not inputs[pred_head][0]):
                    inputs[pred_head] = (all_to_all, op, edge.source)
        for pred_head, (all_to_all, op, pred) in inputs.items():
            pred_status = vertex_status[pred_head]
            if pred_status is None:
                continue  # a mixed predecessor is reported by itself
            pred_op = topology.operator(pred)
            if status is OperatorStatus.FULLY_FINISHED and pred_status is not OperatorStatus.FULLY_FINISHED:
                found.append(Violation(
                    "finished-predecessor", op.uid,
                    f"operator {restore.name(op)} is fully finished in {where} but its predecessor "
                    f"{restore.name(pred_op)} is {_words(pred_status)}; a finished operator cannot get a running "
                    f"input: remove {pred!r} from before {op.uid!r}, or give {op.uid!r} a new uid to start it fresh",
                    pred, op.flink_operator_id if restore.flink else None,
                ))  # fmt: skip
            elif status is OperatorStatus.PARTIALLY_FINISHED and all_to_all:
                if pred_status is not OperatorStatus.FULLY_FINISHED:
                    kind = (
                        "a partially finished" if pred_status is OperatorStatus.PARTIALLY_FINISHED else "an all running"
                    )
                    found.append(Violation(
                        "partial-all-to-all-predecessor", op.uid,
                        f"operator {restore.name(op)} is partially finished in {where} and its all-to-all "
                        f"predecessor {restore.name(pred_op)} is {kind} operator; connect {pred!r} pointwise "
                        f"(forward/rescale), remove it, or restore from a checkpoint taken before {op.uid!r} "
                        "started finishing",
                        pred, op.flink_operator_id if restore.flink else None,
                    ))  # fmt: skip
            elif status is OperatorStatus.PARTIALLY_FINISHED and pred_status is OperatorStatus.RUNNING:
                found.append(Violation(
                    "partial-running-pointwise-predecessor", op.uid,
                    f"operator {restore.name(op)} is partially finished in {where} but its pointwise predecessor "
                    f"{restore.name(pred_op)} is all running (or new); finished subtasks of {op.uid!r} would "
                    f"receive records again: remove {pred!r} from before {op.uid!r} or restore from an earlier "
                    "checkpoint",
                    pred, op.flink_operator_id if restore.flink else None,
                ))  # fmt: skip


def _check_parallelism(restore: _Restore, topology: Topology, where: str, found: list[Violation]) -> None:
    """``StateAssignmentOperation.checkParallelismPreconditions``, for each vertex that gets state assigned
    (never a fully finished one, which is deployed finished-on-restore with no state, rule E4)."""
    for vertex in topology.vertices():
        olds = [(op, restore.old_of[op.uid]) for op in vertex]
        if not any(old is not None and old.assigns_state for _, old in olds):
            continue
        parallelism = vertex[0].parallelism
        for op, old in olds:
            if old is not None and parallelism > old.max_parallelism:
                found.append(Violation(
                    "parallelism-exceeds-max", op.uid,
                    f"operator {restore.name(op)} now has parallelism {parallelism}, but {where} recorded max "
                    f"parallelism {old.max_parallelism} for it, and its state cannot be split into more subtasks "
                    f"than that; reduce the parallelism to {old.max_parallelism} or less",
                    operator_id=old.operator_id,
                ))  # fmt: skip


def _unknown_chains(restore: _Restore, topology: Topology) -> list[str]:
    """Without ``chains`` every operator is taken as its own vertex, which hides ``mixed-finished-chain``.
    Flink chains an operator to its input by default when that is its only input, a forward edge between
    equal parallelisms: warn where such a pair is not in one finished state."""
    warnings = []
    for op in topology:
        if len(op.inputs) != 1 or op.inputs[0].partitioning is not Partitioning.FORWARD:
            continue
        pred = topology.operator(op.inputs[0].source)
        statuses = (restore.status(pred.uid), restore.status(op.uid))
        if pred.parallelism == op.parallelism and statuses[0] is not statuses[1]:
            warnings.append(
                f"the topology lists no chains, and Flink chains {op.uid!r} to its only input {pred.uid!r} by "
                f"default (a forward edge, equal parallelism), but they are {_words(statuses[1])} and "
                f"{_words(statuses[0])}: if they are chained, Flink rejects the restore (mixed-finished-chain); "
                "give the topology's chains (export them from the job) to know"
            )
    return warnings


def _uid_cross_check(restore: _Restore, metadata: FlinkCheckpointMetadata, topology: Topology) -> list[str]:
    """Formats 5+ store uids: a topology uid found in the checkpoint under another operator ID is matched
    by ID (as Flink does), so its state is not restored; that is worth a warning."""
    stored = {op.uid: op.operator_id for op in metadata.operators if op.uid}
    warnings = []
    for op in topology:
        oid = stored.get(op.uid)
        if oid is not None and restore.old_of[op.uid] is None and oid not in restore.new_of:
            warnings.append(
                f"operator {op.uid!r} has operator ID {op.flink_operator_id} in the new topology, but checkpoint "
                f"{metadata.checkpoint_id} holds uid {op.uid!r} under operator ID {oid}; Flink matches by operator "
                f"ID, so that state is not restored: set its operator_id to {oid} (or remove it) if it is the "
                "same operator"
            )
    return warnings
