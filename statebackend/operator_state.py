"""Operator (non-keyed) list state: split, union and broadcast distribution.

Each subtask holds named lists. A snapshot writes every element as ``>I length | bytes`` into one
state file and records, per name, the distribution mode and the (uncompressed) offset of each
element, as Flink's ``OperatorStateHandle`` does; on restore the runtime redistributes those
offsets with :func:`keystate.statebackend.repartition.repartition_operator_state`.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, TypeVar

from keystate.statebackend.errors import StateError, StateMigrationError, StateRestoreError, StateSnapshotError
from keystate.statebackend.serializers import Serializer
from keystate.statebackend.state import ListState, ListStateDescriptor
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.metadata import DistributionMode, OperatorStateEntry, OperatorStateHandle
from keystate.storage.format.statefile import StateFileReader

__all__ = ["OperatorSnapshot", "OperatorStateBackend", "entry_elements", "stream_elements"]

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
            targets: list[list[bytes]] = []
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
                targets.append(state.elements)
            # Appended into place: only the elements are kept, never the whole stream.
            restored: list[list[bytes]] = [[] for _ in handle.states]
            try:
                for index, element in stream_elements(reader, handle, where):
                    restored[index].append(element)
            except StateRestoreError:
                raise
            except KeystateError as exc:
                raise StateRestoreError(f"{where}: {exc}") from exc
            for target, elements in zip(targets, restored, strict=True):
                target.extend(elements)


class _NamedPassthrough(Serializer[bytes]):
    """Holds restored bytes of a state nobody has asked for yet, keeping its serializer's name."""

    safe = True

    def __init__(self, name: str) -> None:
        self.name = name

    def serialize(self, value: bytes) -> bytes:
        return value

    def deserialize(self, data: bytes) -> bytes:
        return data


def stream_elements(reader: StateFileReader, handle: OperatorStateHandle, where: str) -> Iterator[tuple[int, bytes]]:
    """``(index into handle.states, element)`` for every element of an operator-state handle, reading its
    state file block by block.

    The framing is :func:`entry_elements`'s (``>I element length | element`` at each offset), decoded
    as the blocks arrive, in the order of the offsets (so each state's elements in its own order). Only
    the current block and the element being gathered are held besides what is returned, and elements
    may not overlap (each ends at or before the next offset; equal offsets name one element), so what is
    returned is at most the stream's raw bytes. The whole file is read, so its size, trailer and
    whole-file checksum are verified, after the last element.

    Raises:
        StateRestoreError: an offset lies past the end of the stream, or an element runs past it or
            into the next element.
        StateFileError: the state file is damaged (checked as its blocks arrive).
    """
    raw_size = handle.stream.raw_size
    blocks = reader.iter_blocks()
    buf = bytearray()
    buf_start = 0  # stream position of buf[0]
    read = 0  # stream position after the blocks taken so far

    def gather(start: int, stop: int) -> None:
        """Hold the stream's bytes ``start..stop`` in ``buf``, dropping what precedes ``start``."""
        nonlocal buf_start, read
        if start > buf_start:
            drop = min(start, read) - buf_start
            del buf[:drop]
            buf_start += drop
        while read < stop:
            block = next(blocks, None)
            if block is None:  # cannot happen: iter_blocks checked the file's raw size against the handle's
                raise StateRestoreError(f"{where}: the stream ends at {read} bytes, before {stop}")
            if read < start:  # ``buf`` is empty here
                if read + len(block) > start:
                    buf.extend(memoryview(block)[start - read :])
                    buf_start = start
                else:  # wholly before what is wanted: not copied
                    buf_start = read + len(block)
            else:
                buf.extend(block)
            read += len(block)

    previous = -1  # offset of the previous element
    element = b""
    previous_end = 0
    elements = heapq.merge(*(zip(entry.offsets, repeat(i)) for i, entry in enumerate(handle.states)))
    for offset, index in elements:
        name = handle.states[index].name
        if offset != previous:
            if offset < previous_end:
                raise StateRestoreError(
                    f"{where}: operator state {name!r}: element offset {offset} lies inside the element at "
                    f"{previous} (bytes {previous}..{previous_end - 1}); elements may not overlap"
                )
            if offset + _LEN.size > raw_size:
                raise StateRestoreError(
                    f"{where}: operator state {name!r}: element offset {offset} is beyond the {raw_size}-byte stream"
                )
            gather(offset, offset + _LEN.size)
            (n,) = _LEN.unpack_from(buf, offset - buf_start)
            end = offset + _LEN.size + n
            if end > raw_size:
                raise StateRestoreError(
                    f"{where}: operator state {name!r}: element at offset {offset} claims {n} bytes, past the end "
                    "of the stream"
                )
            gather(offset, end)
            element = bytes(memoryview(buf)[offset + _LEN.size - buf_start : end - buf_start])
            previous, previous_end = offset, end
        yield index, element
    buf.clear()
    for _ in blocks:  # the rest of the file: its blocks, trailer and whole-file checksum are verified
        pass


def entry_elements(data: bytes, entry: OperatorStateEntry, where: str) -> Iterator[bytes]:
    """The elements of one named state in the raw (uncompressed) bytes of its operator-state stream.

    The framing a restore decodes, and nothing more: at each of ``entry.offsets``, ``>I element length |
    element``, within ``data``. Pure, for a stream already in memory; :meth:`OperatorStateBackend.restore`
    and the offline readers (``keystate.statebackend.inspection``, ``keystate verify``) decode the same
    framing from the state file block by block with :func:`stream_elements`, which also refuses
    overlapping elements.

    Args:
        data: every raw byte of the stream (``StateFileReader.read_all``).
        entry: the state's name and element offsets, from its handle.
        where: names the state file in error messages.

    Raises:
        StateRestoreError: an offset lies past the end, or an element runs past it.
    """
    for offset in entry.offsets:
        yield _element_at(data, offset, f"{where}: operator state {entry.name!r}")


def _element_at(data: bytes, offset: int, where: str) -> bytes:
    if offset + _LEN.size > len(data):
        raise StateRestoreError(f"{where}: element offset {offset} is beyond the {len(data)}-byte stream")
    (n,) = _LEN.unpack_from(data, offset)
    if offset + _LEN.size + n > len(data):
        raise StateRestoreError(f"{where}: element at offset {offset} claims {n} bytes, past the end of the stream")
    return data[offset + _LEN.size : offset + _LEN.size + n]
