"""What a Flink ``_metadata`` holds, as frozen classes: checkpoint, operators, subtasks, properties.

Invariants that the reader checks (so that every instance it returns obeys them):

* operator IDs are 32 lowercase hex digits and unique within a checkpoint;
* ``1 <= parallelism <= max_parallelism <= 32768``;
* subtask indexes are unique and ``< parallelism``; a finished subtask carries no handle;
* a fully finished operator has no subtask entries and no coordinator state.

Sizes are Flink's ``getStateSize()``: a handle's size, a subtask's sum over its handles, an operator's sum
over its subtasks plus its coordinator state, and the checkpoint's sum over its operators.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from keystate.storage.format.flink._handles import (
    ByteStreamStateHandle,
    FlinkChannelHandle,
    FlinkKeyedHandle,
    OperatorStreamStateHandle,
)
from keystate.storage.format.flink._murmur import flink_operator_id
from keystate.storage.format.metadata import CheckpointKind, OperatorStatus

__all__ = [
    "FlinkCheckpointMetadata",
    "FlinkCheckpointProperties",
    "FlinkMasterState",
    "FlinkOperatorState",
    "FlinkSubtaskState",
    "FullyFinishedOperatorState",
]


@dataclass(frozen=True, slots=True)
class FlinkMasterState:
    """State of a legacy ``MasterTriggerRestoreHook``: a named, versioned, opaque payload."""

    name: str
    version: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class FlinkCheckpointProperties:
    """The ``CheckpointProperties`` trailer of format 4+, read without running a Java deserializer.

    ``raw`` is the Java serialization stream exactly as in the file. The other fields are primitive and
    string values found while walking that stream's grammar; None where the stream does not hold them.
    """

    raw: bytes
    snapshot_type_class: str | None
    """``org.apache.flink.runtime.checkpoint.CheckpointType`` or ``...SavepointType`` (Flink 1.16+)."""
    type_name: str | None
    """``Checkpoint``, ``Full Checkpoint``, ``Savepoint``, ``Terminate Savepoint``, ``Suspend Savepoint``."""
    sharing_files_strategy: str | None
    """Checkpoints: ``FORWARD_BACKWARD``, ``FORWARD`` or ``NO_SHARING``."""
    savepoint_format: str | None
    """Savepoints: ``CANONICAL`` or ``NATIVE``."""
    post_checkpoint_action: str | None
    """Savepoints: ``NONE``, ``SUSPEND`` or ``TERMINATE``."""
    flags: tuple[tuple[str, bool], ...]
    """The boolean fields of ``CheckpointProperties`` by Java name (``forced``, ``discardSubsumed``, ...)."""

    @property
    def kind(self) -> CheckpointKind | None:
        if self.snapshot_type_class == "org.apache.flink.runtime.checkpoint.SavepointType":
            return CheckpointKind.SAVEPOINT
        if self.snapshot_type_class == "org.apache.flink.runtime.checkpoint.CheckpointType":
            return CheckpointKind.CHECKPOINT
        return None

    def flag(self, name: str) -> bool | None:
        """The boolean field ``name`` (e.g. ``"forced"``), or None if the stream has no such field."""
        return dict(self.flags).get(name)


@dataclass(frozen=True, slots=True)
class FlinkSubtaskState:
    """One subtask's entry: either a finished marker (no handles) or its six state collections."""

    index: int
    finished: bool = False
    """Written as the negative index ``-(index + 1)``; Flink's ``FinishedOperatorSubtaskState``."""
    managed_operator_state: OperatorStreamStateHandle | None = None
    raw_operator_state: OperatorStreamStateHandle | None = None
    managed_keyed_state: FlinkKeyedHandle | None = None
    raw_keyed_state: FlinkKeyedHandle | None = None
    input_channel_state: tuple[FlinkChannelHandle, ...] = ()
    result_subpartition_state: tuple[FlinkChannelHandle, ...] = ()

    def handles(self) -> Iterator[OperatorStreamStateHandle | FlinkKeyedHandle | FlinkChannelHandle]:
        """Every handle of the subtask, in file order."""
        for handle in (self.managed_operator_state, self.raw_operator_state):
            if handle is not None:
                yield handle
        for keyed in (self.managed_keyed_state, self.raw_keyed_state):
            if keyed is not None:
                yield keyed
        yield from self.input_channel_state
        yield from self.result_subpartition_state

    @property
    def has_state(self) -> bool:
        """Flink's ``OperatorSubtaskState.hasState()``: any of the six collections holds a handle."""
        return next(self.handles(), None) is not None

    @property
    def state_size(self) -> int:
        return sum(h.state_size for h in self.handles())


@dataclass(frozen=True, slots=True)
class FlinkOperatorState:
    """One operator's state (Flink's ``OperatorState``): an ID, its parallelism and its subtask entries."""

    operator_id: str
    """32 lowercase hex digits, the 16 ID bytes in file order (``OperatorID.toHexString()``)."""
    name: str | None
    """Format 5+: the operator's name (``Source: bounded-source``); None in formats 3-4 or when unset."""
    uid: str | None
    """Format 5+: the user's uid; None in formats 3-4 or when the operator had no uid."""
    parallelism: int
    max_parallelism: int
    """The effective max parallelism; the file cannot tell configured from derived."""
    coordinator_state: ByteStreamStateHandle | None
    subtasks: tuple[FlinkSubtaskState, ...]
    """The entries written, sorted by index; subtasks without an entry had no state."""

    @property
    def fully_finished(self) -> bool:
        return False

    @property
    def finished_subtasks(self) -> tuple[int, ...]:
        return tuple(s.index for s in self.subtasks if s.finished)

    @property
    def status(self) -> OperatorStatus:
        if self.fully_finished:
            return OperatorStatus.FULLY_FINISHED
        if any(s.finished for s in self.subtasks):
            return OperatorStatus.PARTIALLY_FINISHED
        return OperatorStatus.RUNNING

    @property
    def has_state(self) -> bool:
        """As Flink's restore checks it: coordinator state, or any subtask with state."""
        return self.coordinator_state is not None or any(s.has_state for s in self.subtasks)

    @property
    def has_keyed_state(self) -> bool:
        return any(s.managed_keyed_state is not None or s.raw_keyed_state is not None for s in self.subtasks)

    @property
    def state_size(self) -> int:
        coordinator = 0 if self.coordinator_state is None else self.coordinator_state.state_size
        return coordinator + sum(s.state_size for s in self.subtasks)

    def subtask(self, index: int) -> FlinkSubtaskState | None:
        """The entry of subtask ``index``, or None if the file has none for it."""
        for entry in self.subtasks:
            if entry.index == index:
                return entry
        return None


@dataclass(frozen=True, slots=True)
class FullyFinishedOperatorState(FlinkOperatorState):
    """An operator whose every subtask had finished (FLIP-147), written as subtask count -1: no state."""

    @property
    def fully_finished(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class FlinkCheckpointMetadata:
    """A parsed Flink ``_metadata``: checkpoint ID, format version, master states, operators, properties.

    The file holds no job ID, timestamp, chaining or edges: the job ID is the ``<jobId>`` directory
    above ``chk-N``, and a format-3 file tells a savepoint from a checkpoint only by its directory name.
    """

    format_version: int
    checkpoint_id: int
    master_states: tuple[FlinkMasterState, ...]
    operators: tuple[FlinkOperatorState, ...]
    """In file order (the writer's hash-map order: neither sorted nor topological)."""
    properties: FlinkCheckpointProperties | None
    """Format 4+; None for format 3, which has no trailer."""
    location: str = ""
    """Where the bytes came from, as the caller named it; used in messages only."""

    @property
    def kind(self) -> CheckpointKind | None:
        """Checkpoint or savepoint, from the properties; None for format 3 (use the directory name)."""
        return None if self.properties is None else self.properties.kind

    @property
    def state_size(self) -> int:
        return sum(op.state_size for op in self.operators)

    def operator(self, operator_id: str) -> FlinkOperatorState:
        """The operator with this 32-hex-digit ID; KeyError if the checkpoint has none."""
        wanted = operator_id.lower()
        for op in self.operators:
            if op.operator_id == wanted:
                return op
        raise KeyError(f"the checkpoint has no operator {operator_id}")

    def operator_for_uid(self, uid: str) -> FlinkOperatorState | None:
        """The operator whose ID is the hash of ``uid`` (how Flink matches a uid to state), or None."""
        wanted = flink_operator_id(uid)
        return next((op for op in self.operators if op.operator_id == wanted), None)
