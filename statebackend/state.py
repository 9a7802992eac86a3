"""The state-backend interfaces: descriptors, state objects and the pluggable keyed backend.

A runtime (ours or an embedder's) creates one keyed backend per keyed operator subtask with
:meth:`StateBackend.create_keyed_backend`, sets the current key before each record, and gets state
objects from descriptors. Snapshots are two-phase: :meth:`KeyedStateBackend.snapshot` is the
synchronous part (O(1), processing may continue right after), and the returned
:class:`KeyedSnapshot` writes the state into checkpoint storage from any thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, overload

from keystate.statebackend.serializers import PickleSerializer, Serializer
from keystate.statebackend.ttl import TtlConfig
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import KeyedStateHandle

__all__ = [
    "AggregateFunction",
    "AggregatingState",
    "AggregatingStateDescriptor",
    "KeyedSnapshot",
    "KeyedStateBackend",
    "ListState",
    "ListStateDescriptor",
    "MapState",
    "MapStateDescriptor",
    "ReducingState",
    "ReducingStateDescriptor",
    "SnapshotOptions",
    "State",
    "StateDescriptor",
    "StateKind",
    "ValueState",
    "ValueStateDescriptor",
]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
IN = TypeVar("IN")
ACC = TypeVar("ACC")
OUT = TypeVar("OUT")
IN_contra = TypeVar("IN_contra", contravariant=True)
OUT_co = TypeVar("OUT_co", covariant=True)


class StateKind(StrEnum):
    VALUE = "value"
    LIST = "list"
    MAP = "map"
    REDUCING = "reducing"
    AGGREGATING = "aggregating"


class AggregateFunction(Protocol[IN_contra, ACC, OUT_co]):
    """Flink's ``AggregateFunction``: an accumulator built up value by value."""

    def create_accumulator(self) -> ACC: ...

    def add(self, value: IN_contra, accumulator: ACC) -> ACC: ...

    def get_result(self, accumulator: ACC) -> OUT_co: ...


@dataclass(frozen=True, kw_only=True)
class StateDescriptor(Generic[T]):
    """Names a state and says how its values are serialized (and whether they expire).

    Attributes:
        name: unique per operator; it identifies the state in snapshots.
        serializer: for the stored values (list elements, map values, accumulators).
        ttl: time-to-live of the values; ``None`` means they never expire.
    """

    name: str
    serializer: Serializer[Any] = field(default_factory=PickleSerializer)
    ttl: TtlConfig | None = None
    kind: StateKind = field(init=False, default=StateKind.VALUE)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 1024:
            raise ValueError(f"state name must have 1..1024 characters, found {self.name!r}")


@dataclass(frozen=True, kw_only=True)
class ValueStateDescriptor(StateDescriptor[T]):
    """A single value per key; ``default`` is returned when nothing is stored."""

    default: T | None = None


@dataclass(frozen=True, kw_only=True)
class ListStateDescriptor(StateDescriptor[T]):
    """A list of values per key (``serializer`` is the element serializer)."""

    kind: StateKind = field(init=False, default=StateKind.LIST)


@dataclass(frozen=True, kw_only=True)
class MapStateDescriptor(StateDescriptor[V], Generic[K, V]):
    """A map per key; iteration is in the byte order of the serialized user keys."""

    key_serializer: Serializer[Any] = field(default_factory=PickleSerializer)
    kind: StateKind = field(init=False, default=StateKind.MAP)


@dataclass(frozen=True, kw_only=True)
class ReducingStateDescriptor(StateDescriptor[T]):
    """A value per key combined with ``reduce_function(old, new)`` on every add."""

    reduce_function: Callable[[T, T], T]
    kind: StateKind = field(init=False, default=StateKind.REDUCING)


@dataclass(frozen=True, kw_only=True)
class AggregatingStateDescriptor(StateDescriptor[ACC], Generic[IN, ACC, OUT]):
    """An accumulator per key (``serializer`` serializes the accumulator)."""

    aggregate_function: AggregateFunction[IN, ACC, OUT]
    kind: StateKind = field(init=False, default=StateKind.AGGREGATING)


# --- state objects ---------------------------------------------------------------------------------


class State(ABC):
    """A state scoped to the backend's current key (and the state's namespace)."""

    @abstractmethod
    def clear(self) -> None:
        """Remove the current key's value."""

    @abstractmethod
    def set_namespace(self, namespace: bytes) -> None:
        """Scope the state to a namespace (e.g. a window); ``b""`` is the default namespace."""


class ValueState(State, Generic[T]):
    @abstractmethod
    def value(self) -> T | None:
        """The current key's value, or the descriptor's default."""

    @abstractmethod
    def update(self, value: T | None) -> None:
        """Set the current key's value; ``None`` clears it (as in Flink)."""


class ListState(State, Generic[T]):
    @abstractmethod
    def get(self) -> list[T]:
        """The current key's list (empty if nothing is stored)."""

    @abstractmethod
    def add(self, value: T) -> None: ...

    @abstractmethod
    def add_all(self, values: Iterable[T]) -> None: ...

    @abstractmethod
    def update(self, values: Iterable[T]) -> None:
        """Replace the list."""


class MapState(State, Generic[K, V]):
    @abstractmethod
    def get(self, key: K) -> V | None: ...

    @abstractmethod
    def put(self, key: K, value: V) -> None: ...

    @abstractmethod
    def put_all(self, items: Iterable[tuple[K, V]] | dict[K, V]) -> None: ...

    @abstractmethod
    def remove(self, key: K) -> None: ...

    @abstractmethod
    def contains(self, key: K) -> bool: ...

    @abstractmethod
    def items(self) -> Iterator[tuple[K, V]]:
        """Entries in the byte order of the serialized user keys."""

    @abstractmethod
    def keys(self) -> Iterator[K]: ...

    @abstractmethod
    def values(self) -> Iterator[V]: ...

    @abstractmethod
    def is_empty(self) -> bool: ...


class ReducingState(State, Generic[T]):
    @abstractmethod
    def get(self) -> T | None: ...

    @abstractmethod
    def add(self, value: T) -> None: ...


class AggregatingState(State, Generic[IN, OUT]):
    @abstractmethod
    def get(self) -> OUT | None: ...

    @abstractmethod
    def add(self, value: IN) -> None: ...


# --- the backend -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotOptions:
    """How :meth:`KeyedStateBackend.snapshot` snapshots (docs/statebackend.md, "Incremental snapshots").

    Attributes:
        incremental: write only the keys changed since the backend's last completed checkpoint (a delta
            file under the job's ``shared/`` directory) and reference the earlier files still needed.
            ``False`` (the default, and always for savepoints): a full, self-contained snapshot that leaves
            the backend's chain alone.
        max_chain_length: materialize (write a full snapshot as the new base) once the chain to extend
            already has this many deltas: a restore reads at most this many deltas.
        max_delta_ratio: materialize too once the chain's deltas hold more than this multiple of its
            base's stored bytes.
    """

    incremental: bool = False
    max_chain_length: int = 10
    max_delta_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.max_chain_length < 1 or not self.max_delta_ratio > 0:
            raise ValueError(
                f"max_chain_length must be >= 1 and max_delta_ratio positive, found {self.max_chain_length} "
                f"and {self.max_delta_ratio}"
            )


class KeyedSnapshot(ABC):
    """The asynchronous part of a keyed snapshot. Call :meth:`write` (from any thread) or :meth:`release`.

    Attributes:
        based_on: the completed checkpoint whose chain this snapshot extends (its handle references that
            checkpoint's files and adds a delta); ``None`` for a full snapshot. Known when the snapshot is
            taken; it only ever moves forward between a backend's snapshots (a lower bound for later ones).
            :meth:`write` may still write a full base instead (then it sets ``based_on`` to ``None``): a
            restored chain is continued only by a checkpoint writer of the same job and job directory as
            the checkpoint restored (never after a savepoint).
    """

    based_on: int | None = None

    @abstractmethod
    def write(self, writer: CheckpointWriter, hint: str) -> KeyedStateHandle | None:
        """Stream the snapshot into a state file of ``writer``; ``None`` if there was no state.

        Raises:
            StateSnapshotError: the state could not be read or written.
        """

    @abstractmethod
    def release(self) -> None:
        """Free the snapshot's resources without writing (idempotent; :meth:`write` calls it)."""


class KeyedStateBackend(ABC):
    """Keyed state of one operator subtask: the key groups in ``key_groups`` of ``max_parallelism``.

    Not thread-safe: one thread (the task's) sets keys and uses state; only
    :meth:`KeyedSnapshot.write` may run on another thread.
    """

    operator_uid: str
    subtask_index: int
    max_parallelism: int
    key_groups: KeyGroupRange

    @abstractmethod
    def set_current_key(self, key: Any) -> None:
        """Scope all state objects to ``key``.

        Raises:
            KeyGroupOutOfRangeError: the key's key group is not in this backend's range.
        """

    @property
    @abstractmethod
    def current_key(self) -> Any: ...

    @overload
    def get_state(self, descriptor: ValueStateDescriptor[T]) -> ValueState[T]: ...
    @overload
    def get_state(self, descriptor: ListStateDescriptor[T]) -> ListState[T]: ...
    @overload
    def get_state(self, descriptor: MapStateDescriptor[K, V]) -> MapState[K, V]: ...
    @overload
    def get_state(self, descriptor: ReducingStateDescriptor[T]) -> ReducingState[T]: ...
    @overload
    def get_state(self, descriptor: AggregatingStateDescriptor[IN, ACC, OUT]) -> AggregatingState[IN, OUT]: ...

    def get_state(self, descriptor: StateDescriptor[Any]) -> State:
        """The state object for a descriptor (the same object for the same name).

        Raises:
            StateMigrationError: the name was registered or restored with another kind or serializer.
        """
        return self._get_state(descriptor)

    @abstractmethod
    def _get_state(self, descriptor: StateDescriptor[Any]) -> State: ...

    @abstractmethod
    def keys(self, state_name: str, namespace: bytes = b"") -> Iterator[Any]:
        """Every key with a value in the named state and namespace, key group by key group."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Remove every expired TTL value now (compaction-style cleanup); returns how many."""

    incremental_default: bool = False
    """Whether a runtime takes incremental snapshots of this backend when its configuration leaves it open."""

    @abstractmethod
    def snapshot(self, checkpoint_id: int | None = None, options: SnapshotOptions | None = None) -> KeyedSnapshot:
        """The synchronous part of a snapshot: O(1); state may change right after it returns.

        Args:
            checkpoint_id: the checkpoint the snapshot is for (required when ``options.incremental``).
            options: full (the default) or incremental; see :class:`SnapshotOptions`.

        Raises:
            ValueError: an incremental snapshot without a checkpoint id.
            StateError: the backend is closed.
        """

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:  # noqa: B027 -- optional hook
        """Checkpoint ``checkpoint_id`` completed: an incremental backend confirms its chain (later deltas
        build on it). Cheap; call it on the task's thread. A no-op for checkpoints it did not snapshot."""

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:  # noqa: B027 -- optional hook
        """Checkpoint ``checkpoint_id`` will never complete: its changes go into the next delta."""

    @abstractmethod
    def restore(self, handles: Sequence[tuple[CompletedCheckpoint, KeyedStateHandle]]) -> None:
        """Load state from snapshot handles, reading only the key groups this backend owns.

        Call on a fresh backend, before any state access. The result is exactly the handles' state: an
        LMDB backend whose directory still holds an earlier owner's environment (a crashed worker's, say)
        discards it first, also when no handle has entries for it, as Flink's RocksDB backend restores into
        a fresh instance directory.

        Raises:
            StateRestoreError: a handle is corrupted, truncated or does not fit.
            StateMigrationError: restored state does not match this backend (key serializer, hash,
                or the max parallelism: :class:`~keystate.statebackend.errors.MaxParallelismMismatchError`).
            LmdbError: the local LMDB environment failed (disk full, map cannot grow, ...).
        """

    @abstractmethod
    def close(self) -> None:
        """Release local resources (files, environments). The backend cannot be used afterwards."""
