"""Semantics of every keyed state type, run against the LMDB and the heap backend."""

from __future__ import annotations

import pytest

from keystate.statebackend import (
    AggregatingStateDescriptor,
    IntSerializer,
    JsonSerializer,
    KeyGroupOutOfRangeError,
    KVKeyedStateBackend,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateError,
    StateMigrationError,
    StrSerializer,
    TtlConfig,
    ValueStateDescriptor,
)
from keystate.storage import KeyGroupRange
from tests.statebackend.support import BackendFactory, key_group_of

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0)
NAME = ValueStateDescriptor[str](name="name", serializer=StrSerializer())
ITEMS = ListStateDescriptor[str](name="items", serializer=StrSerializer())
SCORES = MapStateDescriptor[int, str](name="scores", serializer=StrSerializer(), key_serializer=IntSerializer())


def _add(a: int, b: int) -> int:
    return a + b


TOTAL = ReducingStateDescriptor[int](name="total", serializer=IntSerializer(), reduce_function=_add)


class Average:
    """An AggregateFunction computing an average; the accumulator is [sum, count]."""

    def create_accumulator(self) -> list[float]:
        return [0.0, 0]

    def add(self, value: float, accumulator: list[float]) -> list[float]:
        return [accumulator[0] + value, accumulator[1] + 1]

    def get_result(self, accumulator: list[float]) -> float:
        return accumulator[0] / accumulator[1]


AVERAGE = AggregatingStateDescriptor[float, list[float], float](
    name="average", serializer=JsonSerializer(), aggregate_function=Average()
)


def test_value_state_is_per_key_with_default(backend: KVKeyedStateBackend) -> None:
    count = backend.get_state(COUNT)
    name = backend.get_state(NAME)
    backend.set_current_key("alice")
    assert count.value() == 0
    assert name.value() is None
    count.update(5)
    name.update("Alice")
    backend.set_current_key("bob")
    assert count.value() == 0
    assert name.value() is None
    count.update(7)
    backend.set_current_key("alice")
    assert backend.current_key == "alice"
    assert (count.value(), name.value()) == (5, "Alice")
    backend.set_current_key("bob")
    assert count.value() == 7


def test_value_update_none_and_clear_remove_the_value(backend: KVKeyedStateBackend) -> None:
    count = backend.get_state(COUNT)
    backend.set_current_key(1)
    count.update(3)
    count.update(None)
    assert count.value() == 0
    count.update(4)
    count.clear()
    assert count.value() == 0
    assert list(backend.keys("count")) == []


def test_empty_serialized_values_are_values(backend: KVKeyedStateBackend) -> None:
    name = backend.get_state(NAME)
    items = backend.get_state(ITEMS)
    words = backend.get_state(
        MapStateDescriptor[str, str](name="w", serializer=StrSerializer(), key_serializer=StrSerializer())
    )
    for key in range(10):  # crosses LMDB flushes
        backend.set_current_key(key)
        name.update("")
        items.add("")
        words.put("", "")
    for key in range(10):
        backend.set_current_key(key)
        assert name.value() == ""
        assert items.get() == [""]
        assert words.get("") == ""
        assert words.contains("")
        assert list(words.items()) == [("", "")]
    assert sorted(backend.keys("name")) == list(range(10))


def test_states_are_isolated_between_keys_states_and_namespaces(backend: KVKeyedStateBackend) -> None:
    a = backend.get_state(ValueStateDescriptor[int](name="a", serializer=IntSerializer()))
    b = backend.get_state(ValueStateDescriptor[int](name="b", serializer=IntSerializer()))
    items = backend.get_state(ITEMS)
    scores = backend.get_state(SCORES)
    backend.set_current_key("k")
    a.update(1)
    b.update(2)
    items.add("x")
    scores.put(1, "one")
    a.set_namespace(b"window-1")
    items.set_namespace(b"window-1")
    scores.set_namespace(b"window-1")
    assert a.value() is None
    assert items.get() == []
    assert scores.is_empty()
    a.update(10)
    items.add("y")
    scores.put(1, "uno")
    a.set_namespace(b"window-10")  # a longer namespace with the same prefix is a different namespace
    assert a.value() is None
    a.set_namespace(b"")
    items.set_namespace(b"")
    scores.set_namespace(b"")
    assert (a.value(), b.value(), items.get(), scores.get(1)) == (1, 2, ["x"], "one")
    a.set_namespace(b"window-1")
    scores.set_namespace(b"window-1")
    assert a.value() == 10
    assert scores.get(1) == "uno"
    scores.clear()  # clears only this namespace's map
    scores.set_namespace(b"")
    assert scores.get(1) == "one"
    backend.set_current_key("k2")  # a longer key sharing a prefix with "k"
    assert b.value() is None
    assert items.get() == []


def test_list_state_operations(backend: KVKeyedStateBackend) -> None:
    items = backend.get_state(ITEMS)
    backend.set_current_key(("user", 1))
    assert items.get() == []
    items.add("a")
    items.add_all(["b", "c"])
    items.add_all([])
    assert items.get() == ["a", "b", "c"]
    items.update(["z", "y"])
    assert items.get() == ["z", "y"]
    items.add("x")
    assert items.get() == ["z", "y", "x"]
    items.update([])
    assert items.get() == []
    assert list(backend.keys("items")) == []
    items.add_all(["q", ""])
    assert items.get() == ["q", ""]
    items.clear()
    assert items.get() == []


def test_map_state_operations(backend: KVKeyedStateBackend) -> None:
    scores = backend.get_state(SCORES)
    backend.set_current_key("m")
    assert scores.is_empty()
    assert scores.get(1) is None
    assert not scores.contains(1)
    scores.put(1, "one")
    scores.put_all({2: "two", 3: "three"})
    scores.put_all([(4, "four"), (2, "TWO")])
    assert scores.get(2) == "TWO"
    assert scores.contains(3)
    assert not scores.is_empty()
    scores.remove(3)
    scores.remove(99)  # removing a missing key is a no-op
    assert not scores.contains(3)
    assert list(scores.items()) == [(1, "one"), (2, "TWO"), (4, "four")]
    assert list(scores.keys()) == [1, 2, 4]
    assert list(scores.values()) == ["one", "TWO", "four"]
    backend.set_current_key("other")
    assert scores.is_empty()
    backend.set_current_key("m")
    scores.clear()
    assert scores.is_empty()
    assert list(scores.items()) == []


def test_map_iterates_in_serialized_key_order(backend: KVKeyedStateBackend) -> None:
    scores = backend.get_state(SCORES)
    words = backend.get_state(
        MapStateDescriptor[str, int](name="w", serializer=IntSerializer(), key_serializer=StrSerializer())
    )
    backend.set_current_key("k")
    numbers = [5, -1, 0, 2**40, -(2**63), 2**63 - 1, -300, 17, 1]
    for n in numbers:
        scores.put(n, str(n))
    assert list(scores.keys()) == sorted(numbers)
    assert [int(v) for v in scores.values()] == sorted(numbers)
    for w in ["b", "ab", "a", "é", "B", ""]:
        words.put(w, len(w))
    assert list(words.keys()) == sorted(["b", "ab", "a", "é", "B", ""], key=lambda s: s.encode())


def test_reducing_state(backend: KVKeyedStateBackend) -> None:
    total = backend.get_state(TOTAL)
    backend.set_current_key("r")
    assert total.get() is None
    for v in (3, 4, 5):
        total.add(v)
    assert total.get() == 12
    backend.set_current_key("s")
    total.add(-2)
    assert total.get() == -2
    backend.set_current_key("r")
    total.clear()
    assert total.get() is None


def test_aggregating_state_computes_an_average(backend: KVKeyedStateBackend) -> None:
    average = backend.get_state(AVERAGE)
    backend.set_current_key("sensor-1")
    assert average.get() is None
    for v in (1.0, 2.0, 6.0):
        average.add(v)
    assert average.get() == pytest.approx(3.0)
    backend.set_current_key("sensor-2")
    average.add(10.0)
    assert average.get() == pytest.approx(10.0)
    backend.set_current_key("sensor-1")
    average.add(3.0)
    assert average.get() == pytest.approx(3.0)
    average.clear()
    assert average.get() is None


def test_backend_keys_lists_every_key_with_a_value(backend: KVKeyedStateBackend) -> None:
    count = backend.get_state(COUNT)
    scores = backend.get_state(SCORES)
    keys: list[object] = [*(f"k{i}" for i in range(40)), *range(40), (1, "t")]
    for k in keys:
        backend.set_current_key(k)
        count.update(1)
        scores.put(1, "a")
        scores.put(2, "b")  # two map entries under one key: the key is listed once
    backend.set_current_key("k3")
    count.clear()
    scores.set_namespace(b"ns")
    backend.set_current_key("only-in-ns")
    scores.put(7, "x")
    listed = list(backend.keys("count"))
    assert len(listed) == len(keys) - 1
    assert set(map(repr, listed)) == {repr(k) for k in keys if k != "k3"}
    assert sorted(map(repr, backend.keys("scores"))) == sorted(repr(k) for k in keys)
    assert list(backend.keys("scores", b"ns")) == ["only-in-ns"]
    assert list(backend.keys("scores", b"n")) == []
    assert list(backend.keys("never-registered")) == []
    groups = [key_group_of(k) for k in backend.keys("count")]
    assert groups == sorted(groups)  # key group by key group


def test_state_needs_a_current_key(new_backend: BackendFactory) -> None:
    backend = new_backend()
    count = backend.get_state(COUNT)
    items = backend.get_state(ITEMS)
    scores = backend.get_state(SCORES)
    for use in (count.value, lambda: count.update(1), items.get, lambda: scores.put(1, "a"), scores.is_empty):
        with pytest.raises(StateError, match="no current key"):
            use()
    count.set_namespace(b"ns")  # a namespace alone is not a key
    with pytest.raises(StateError, match="no current key"):
        count.value()


def test_key_outside_the_key_group_range_is_rejected(new_backend: BackendFactory) -> None:
    backend = new_backend(key_groups=KeyGroupRange(0, 63))
    count = backend.get_state(COUNT)
    inside = next(k for k in range(1000) if key_group_of(k) <= 63)
    outside = next(k for k in range(1000) if key_group_of(k) >= 64)
    backend.set_current_key(inside)
    count.update(1)
    with pytest.raises(KeyGroupOutOfRangeError) as info:
        backend.set_current_key(outside)
    message = str(info.value)
    assert f"key group {key_group_of(outside)}" in message
    assert "0..63" in message
    assert "'op'" in message
    assert backend.current_key == inside  # the failed call changed nothing
    assert count.value() == 1


@pytest.mark.parametrize("max_parallelism", [1, 7, 128, 32768])
def test_keys_go_to_the_key_group_of_assign_key_group(new_backend: BackendFactory, max_parallelism: int) -> None:
    """``set_current_key`` inlines :func:`assign_key_group` (it runs per record): pin the two together."""
    backend = new_backend(max_parallelism=max_parallelism, key_groups=KeyGroupRange(0, max_parallelism - 1))
    for key in [*range(200), "a", "hello", (1, "x"), b"raw", None, True, 2**70, -7]:
        backend.set_current_key(key)
        assert backend.key_group_prefix == key_group_of(key, max_parallelism).to_bytes(2, "big"), key


def test_too_long_keys_are_rejected(backend: KVKeyedStateBackend) -> None:
    count = backend.get_state(COUNT)
    backend.set_current_key("x" * 399)  # tag byte + 399 = 400 bytes: the limit
    count.update(1)
    with pytest.raises(StateError, match="401 bytes"):
        backend.set_current_key("y" * 400)
    assert count.value() == 1


def test_too_long_stored_keys_fail_at_once_on_both_engines(backend: KVKeyedStateBackend) -> None:
    scores = backend.get_state(
        MapStateDescriptor[str, int](name="m", serializer=IntSerializer(), key_serializer=StrSerializer())
    )
    count = backend.get_state(COUNT)
    backend.set_current_key("k" * 300)
    with pytest.raises(StateError, match="more than 511"):
        scores.put("u" * 300, 1)
    count.set_namespace(b"n" * 300)
    with pytest.raises(StateError, match="more than 511"):
        count.update(1)
    count.set_namespace(b"n" * 10)
    for i in range(20):  # the backend keeps working (LMDB buffers flush every 3 writes)
        scores.put(str(i), i)
        count.update(i)
    assert count.value() == 19
    assert dict(scores.items()) == {str(i): i for i in range(20)}


def test_get_state_twice_returns_the_same_object(backend: KVKeyedStateBackend) -> None:
    assert backend.get_state(COUNT) is backend.get_state(COUNT)
    same = ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0)
    assert backend.get_state(same) is backend.get_state(COUNT)
    assert backend.get_state(SCORES) is backend.get_state(SCORES)


@pytest.mark.parametrize(
    "second",
    [
        ListStateDescriptor[int](name="s", serializer=IntSerializer()),
        ValueStateDescriptor[str](name="s", serializer=StrSerializer()),
        ValueStateDescriptor[int](name="s", serializer=IntSerializer(), ttl=TtlConfig(1000)),
        MapStateDescriptor[int, int](name="s", serializer=IntSerializer(), key_serializer=IntSerializer()),
        ReducingStateDescriptor[int](name="s", serializer=IntSerializer(), reduce_function=_add),
    ],
    ids=["other-kind", "other-serializer", "ttl-enabled", "map", "reducing"],
)
def test_reregistering_a_name_differently_is_a_migration_error(
    backend: KVKeyedStateBackend,
    second: ValueStateDescriptor[int]
    | ListStateDescriptor[int]
    | MapStateDescriptor[int, int]
    | ReducingStateDescriptor[int],
) -> None:
    first = backend.get_state(ValueStateDescriptor[int](name="s", serializer=IntSerializer()))
    backend.set_current_key("k")
    first.update(3)
    with pytest.raises(StateMigrationError, match="'s'"):
        backend.get_state(second)
    assert first.value() == 3


def test_map_user_key_serializer_change_is_a_migration_error(backend: KVKeyedStateBackend) -> None:
    backend.get_state(SCORES)
    other = MapStateDescriptor[str, str](name="scores", serializer=StrSerializer(), key_serializer=StrSerializer())
    with pytest.raises(StateMigrationError, match="key serializer"):
        backend.get_state(other)


def test_closed_backend_refuses_use(new_backend: BackendFactory) -> None:
    backend = new_backend()
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(StateError, match="closed"):
        backend.get_state(COUNT)
    with pytest.raises(StateError, match="closed"):
        backend.snapshot()
