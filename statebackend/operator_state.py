"""Operator (non-keyed) list state: split, union and broadcast distribution.

Each subtask holds named lists. A snapshot writes every element as ``>I length | bytes`` into one
state file and records, per name, the distribution mode and the (uncompressed) offset of each
element, as Flink's ``OperatorStateHandle`` does; on restore the runtime redistributes those
offsets with :func:`keystate.statebackend.repartition.repartition_operator_state`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from keystate.statebackend.errors import StateError, StateMigrationError, StateRestoreError, StateSnapshotError
from keystate.statebackend.serializers import Serializer
from keystate.statebackend.state import ListState, ListStateDescriptor
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.metadata import DistributionMode, OperatorStateEntry, OperatorStateHandle

__all__ = ["OperatorSnapshot", "OperatorStateBackend"]

T = TypeVar("T")
_LEN = struct.Struct(">I")  # >I element length | element bytes


class _OperatorListState(ListState[Any]):
    def __init__(self, name: str, mode: DistributionMode, serializer: Serializer[Any]) -> None:
        self.name = name
        self.mode = mode
        self.serializer = serializer
        self.elements: list[bytes] = []

    def get(self) -> list[Any]:
        return [self.serializer.deserialize(e) for e in self.elements]

    def add(self, value: Any) -> None:
        self.elements.append(self.serializer.serialize(value))

    def add_all(self, values: Iterable[Any]) -> None:
        self.elements.extend(self.serializer.serialize(v) for v in values)

    def update(self, values: Iterable[Any]) -> None:
        self.elements = [self.serializer.serialize(v) for v in values]

    def clear(self) -> None:
        self.elements = []

    def set_namespace(self, namespace: bytes) -> None:
        raise StateError(f"operator state {self.name!r} has no namespaces (it is not keyed)")


@dataclass(frozen=True, slots=True)
class _Frozen:
    name: str
    mode: DistributionMode
    serializer: str
    elements: tuple[bytes, ...]


class OperatorSnapshot:
    """An operator-state snapshot: taken synchronously, written by :meth:`write` from any thread."""

    def __init__(self, operator_uid: str, subtask_index: int, states: tuple[_Frozen, ...]) -> None:
        self._uid = operator_uid
        self._index = subtask_index
        self._states = states

    def write(self, writer: CheckpointWriter, hint: str) -> OperatorStateHandle | None:
        """Write the snapshot; ``None`` if there is no operator state at all."""
        if not self._states:
            return None
        try:
            with writer.open_stream(hint) as stream:
                entries: list[OperatorStateEntry] = []
                for state in self._states:
                    offsets: list[int] = []
                    for element in state.elements:
                        offsets.append(stream.tell())
                        stream.write(_LEN.pack(len(element)) + element)
                    entries.append(OperatorStateEntry(state.name, state.mode, tuple(offsets), state.serializer))
                handle = stream.close()
        except KeystateError as exc:
            raise StateSnapshotError(
                f"operator {self._uid!r} subtask {self._index}: operator-state snapshot failed: {exc}"
            ) from exc
        return OperatorStateHandle(tuple(entries), handle)


class OperatorStateBackend:
    """Named operator list states of one subtask."""

    def __init__(self, operator_uid: str, subtask_index: int) -> None:
        self.operator_uid = operator_uid
        self.subtask_index = subtask_index
        self._states: dict[str, _OperatorListState] = {}
        self._restored: dict[str, tuple[DistributionMode, str]] = {}

    def _get(self, descriptor: ListStateDescriptor[T], mode: DistributionMode) -> ListState[T]:
        state = self._states.get(descriptor.name)
        if state is None:
            state = self._states[descriptor.name] = _OperatorListState(descriptor.name, mode, descriptor.serializer)
            return state
        if state.mode is not mode or state.serializer.name != descriptor.serializer.name:
            raise StateMigrationError(
                f"operator {self.operator_uid!r}: operator state {descriptor.name!r} is {state.mode.value} state "
                f"with serializer {state.serializer.name!r} (as registered or restored) but is requested as "
                f"{mode.value} with {descriptor.serializer.name!r}; keep both or use a new state name"
            )
        state.serializer = descriptor.serializer  # a restored state's bytes get their real serializer
        return state

    def get_list_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]:
        """A split-distributed list: on rescale the elements are dealt out among the new subtasks."""
        return self._get(descriptor, DistributionMode.SPLIT)

    def get_union_list_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]:
        """A union list: on restore every subtask receives every subtask's elements."""
        return self._get(descriptor, DistributionMode.UNION)

    def get_broadcast_list_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]:
        """A broadcast list: every subtask holds the same elements; restore gives each one copy."""
        return self._get(descriptor, DistributionMode.BROADCAST)

    def uses_union_state(self) -> bool:
        return any(s.mode is DistributionMode.UNION for s in self._states.values())

    def snapshot(self) -> OperatorSnapshot:
        """Synchronous part: freezes the current element lists (shallow, the elements are bytes)."""
        states = tuple(
            _Frozen(s.name, s.mode, s.serializer.name, tuple(s.elements))
            for s in sorted(self._states.values(), key=lambda s: s.name)
        )
        return OperatorSnapshot(self.operator_uid, self.subtask_index, states)

    def restore(self, handles: Sequence[tuple[CompletedCheckpoint, OperatorStateHandle]]) -> None:
        """Load the (already redistributed) handles.

        Raises:
            StateRestoreError: a state file is damaged or an offset does not point at an element.
        """
        for checkpoint, handle in handles:
            reader = checkpoint.open_state(handle.stream)
            where = f"operator {self.operator_uid!r}: state file {reader.name}"
            try:
                data = reader.read_all()
            except KeystateError as exc:
                raise StateRestoreError(f"{where}: {exc}") from exc
            for entry in handle.states:
                previous = self._restored.setdefault(entry.name, (entry.mode, entry.serializer))
                if previous != (entry.mode, entry.serializer):
                    raise StateRestoreError(
                        f"{where}: operator state {entry.name!r} is {entry.mode.value}/{entry.serializer} here but "
                        f"{previous[0].value}/{previous[1]} in another handle"
                    )
                state = self._states.get(entry.name)
                if state is None:
                    # Restored bytes keep their serializer's name until a descriptor asks for the state.
                    state = _OperatorListState(entry.name, entry.mode, _NamedPassthrough(entry.serializer))
                    self._states[entry.name] = state
                for offset in entry.offsets:
                    state.elements.append(_element_at(data, offset, f"{where}: operator state {entry.name!r}"))


class _NamedPassthrough(Serializer[bytes]):
    """Holds restored bytes of a state nobody has asked for yet, keeping its serializer's name."""

    safe = True

    def __init__(self, name: str) -> None:
        self.name = name

    def serialize(self, value: bytes) -> bytes:
        return value

    def deserialize(self, data: bytes) -> bytes:
        return data


def _element_at(data: bytes, offset: int, where: str) -> bytes:
    if offset + _LEN.size > len(data):
        raise StateRestoreError(f"{where}: element offset {offset} is beyond the {len(data)}-byte stream")
    (n,) = _LEN.unpack_from(data, offset)
    if offset + _LEN.size + n > len(data):
        raise StateRestoreError(f"{where}: element at offset {offset} claims {n} bytes, past the end of the stream")
    return data[offset + _LEN.size : offset + _LEN.size + n]
