"""keystate state backends: keyed state (LMDB, heap) and operator list state, snapshots and restore.

Embedding without the keystate runtime::

    backend = LmdbStateBackend().create_keyed_backend(
        operator_uid="totals", subtask_index=0, max_parallelism=128,
        key_groups=key_group_range_for_subtask(128, 2, 0))
    count = backend.get_state(ValueStateDescriptor(name="count", serializer=IntSerializer(), default=0))
    backend.set_current_key("alice")
    count.update(count.value() + 1)
    snapshot = backend.snapshot()                       # synchronous part: O(1)
    handle = snapshot.write(writer, "totals/0/keyed")   # asynchronous part, any thread
"""

from keystate.statebackend.backends import HeapStateBackend, LmdbStateBackend, StateBackend, state_backend
from keystate.statebackend.errors import (
    KeyGroupOutOfRangeError,
    SerializationError,
    StateError,
    StateMigrationError,
    StateRestoreError,
    StateSnapshotError,
)
from keystate.statebackend.keyed import HeapKeyedStateBackend, KVKeyedStateBackend, LmdbKeyedStateBackend
from keystate.statebackend.keygroups import (
    KEY_GROUP_HASH,
    KeyGroupRange,
    assign_key_group,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
)
from keystate.statebackend.operator_state import OperatorSnapshot, OperatorStateBackend
from keystate.statebackend.repartition import assign_keyed_handles, repartition_operator_state
from keystate.statebackend.serializers import (
    BytesSerializer,
    FloatSerializer,
    IntSerializer,
    JsonSerializer,
    KeySerializer,
    PickleSerializer,
    Serializer,
    StrSerializer,
    safe_serializer,
)
from keystate.statebackend.state import (
    AggregateFunction,
    AggregatingState,
    AggregatingStateDescriptor,
    KeyedSnapshot,
    KeyedStateBackend,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    SnapshotOptions,
    State,
    StateDescriptor,
    StateKind,
    ValueState,
    ValueStateDescriptor,
)
from keystate.statebackend.ttl import StateVisibility, TtlConfig, TtlUpdate

__all__ = [
    "KEY_GROUP_HASH",
    "AggregateFunction",
    "AggregatingState",
    "AggregatingStateDescriptor",
    "BytesSerializer",
    "FloatSerializer",
    "HeapKeyedStateBackend",
    "HeapStateBackend",
    "IntSerializer",
    "JsonSerializer",
    "KVKeyedStateBackend",
    "KeyGroupOutOfRangeError",
    "KeyGroupRange",
    "KeySerializer",
    "KeyedSnapshot",
    "KeyedStateBackend",
    "ListState",
    "ListStateDescriptor",
    "LmdbKeyedStateBackend",
    "LmdbStateBackend",
    "MapState",
    "MapStateDescriptor",
    "OperatorSnapshot",
    "OperatorStateBackend",
    "PickleSerializer",
    "ReducingState",
    "ReducingStateDescriptor",
    "SerializationError",
    "Serializer",
    "SnapshotOptions",
    "State",
    "StateBackend",
    "StateDescriptor",
    "StateError",
    "StateKind",
    "StateMigrationError",
    "StateRestoreError",
    "StateSnapshotError",
    "StateVisibility",
    "StrSerializer",
    "TtlConfig",
    "TtlUpdate",
    "ValueState",
    "ValueStateDescriptor",
    "assign_key_group",
    "assign_keyed_handles",
    "default_max_parallelism",
    "key_group_range_for_subtask",
    "operator_index_for_key_group",
    "repartition_operator_state",
    "safe_serializer",
    "state_backend",
]

if __name__ != "keystate.statebackend":
    # One import root: this folder is installed as keystate.statebackend. Refusing the bare name keeps every file
    # importable under exactly one module name (two copies of one module mean two copies of its classes).
    raise ImportError(f"import keystate.statebackend, not {__name__!r}: keystate installs a single top-level package")
