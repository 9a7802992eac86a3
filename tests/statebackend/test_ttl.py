"""State time-to-live with an injected clock, on both backends."""

from __future__ import annotations

import pytest

from keystate.statebackend import (
    AggregatingStateDescriptor,
    IntSerializer,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateMigrationError,
    StateVisibility,
    StrSerializer,
    TtlConfig,
    TtlUpdate,
    ValueStateDescriptor,
)
from keystate.storage import CheckpointStorage
from tests.statebackend.support import BackendFactory, ManualClock, checkpoint_backends

TTL = 100
EXPIRING = TtlConfig(TTL)
ON_READ = TtlConfig(TTL, update=TtlUpdate.ON_READ_AND_WRITE)
RETURN_EXPIRED = TtlConfig(TTL, visibility=StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP)


def _value(ttl: TtlConfig | None = EXPIRING, name: str = "v") -> ValueStateDescriptor[int]:
    return ValueStateDescriptor[int](name=name, serializer=IntSerializer(), default=-1, ttl=ttl)


def test_value_expires_exactly_at_ttl(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    v = backend.get_state(_value())
    backend.set_current_key("k")
    v.update(1)
    clock.advance(TTL - 1)
    assert v.value() == 1
    clock.advance(1)
    assert v.value() == -1  # now >= ts + ttl: expired, the default is returned
    assert list(backend.keys("v")) == []  # and the expired value was removed on read


def test_on_create_and_write_is_not_refreshed_by_reads(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    v = backend.get_state(_value())
    backend.set_current_key("k")
    v.update(1)
    clock.advance(40)
    assert v.value() == 1
    clock.advance(40)
    assert v.value() == 1
    clock.advance(20)  # 100 ms after the write: the reads did not extend it
    assert v.value() == -1
    v.update(2)  # a write refreshes
    clock.advance(TTL - 1)
    assert v.value() == 2


def test_on_read_and_write_is_refreshed_by_reads(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    v = backend.get_state(_value(ON_READ))
    backend.set_current_key("k")
    v.update(1)
    for _ in range(5):  # 5 * 60 ms, well past the TTL, but every read extends it
        clock.advance(60)
        assert v.value() == 1
    clock.advance(TTL)
    assert v.value() == -1


def test_return_expired_if_not_cleaned_up(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    never = backend.get_state(_value(TtlConfig(TTL), "never"))
    maybe = backend.get_state(_value(RETURN_EXPIRED, "maybe"))
    backend.set_current_key("k")
    never.update(1)
    maybe.update(2)
    clock.advance(TTL)
    assert never.value() == -1
    assert maybe.value() == 2  # expired but not cleaned up yet: returned once ...
    assert maybe.value() == -1  # ... and removed by that read (Flink's TTL decorator)
    backend.set_current_key("unread")
    maybe.update(3)
    clock.advance(TTL)
    assert backend.purge_expired() == 1  # the unread expired value is cleaned up without a read
    assert maybe.value() == -1


def test_list_elements_expire_one_by_one(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    items = backend.get_state(ListStateDescriptor[str](name="l", serializer=StrSerializer(), ttl=TtlConfig(TTL)))
    backend.set_current_key("k")
    items.add("a")
    clock.advance(30)
    items.add_all(["b", "c"])
    clock.advance(30)
    items.add("d")
    assert items.get() == ["a", "b", "c", "d"]
    clock.advance(40)  # "a" is 100 ms old
    assert items.get() == ["b", "c", "d"]
    clock.advance(30)
    assert items.get() == ["d"]
    clock.advance(30)
    assert items.get() == []
    assert list(backend.keys("l")) == []


def test_list_update_stamps_every_element_now(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    items = backend.get_state(ListStateDescriptor[str](name="l", serializer=StrSerializer(), ttl=TtlConfig(TTL)))
    backend.set_current_key("k")
    items.add("old")
    clock.advance(TTL - 10)
    items.update(["x", "y"])
    clock.advance(TTL - 1)
    assert items.get() == ["x", "y"]


def test_list_on_read_and_write_refreshes_live_elements(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    items = backend.get_state(ListStateDescriptor[str](name="l", serializer=StrSerializer(), ttl=ON_READ))
    backend.set_current_key("k")
    items.add("a")
    for _ in range(4):
        clock.advance(60)
        assert items.get() == ["a"]
    clock.advance(TTL)
    assert items.get() == []


def test_list_return_expired_shows_expired_elements(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    items = backend.get_state(ListStateDescriptor[str](name="l", serializer=StrSerializer(), ttl=RETURN_EXPIRED))
    backend.set_current_key("k")
    items.add("a")
    clock.advance(50)
    items.add("b")
    clock.advance(50)
    assert items.get() == ["a", "b"]  # "a" is shown once, and dropped by that read
    assert items.get() == ["b"]
    items.add("c")
    clock.advance(50)
    assert backend.purge_expired() == 0  # "c" is alive: the list is rewritten without "b", not removed
    assert items.get() == ["c"]


def test_map_entries_expire_one_by_one(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    m = backend.get_state(
        MapStateDescriptor[str, int](
            name="m", serializer=IntSerializer(), key_serializer=StrSerializer(), ttl=TtlConfig(TTL)
        )
    )
    backend.set_current_key("k")
    m.put("a", 1)
    clock.advance(50)
    m.put_all({"b": 2, "c": 3})
    clock.advance(50)
    assert m.get("a") is None
    assert not m.contains("a")
    assert dict(m.items()) == {"b": 2, "c": 3}
    assert list(m.keys()) == ["b", "c"]
    assert list(m.values()) == [2, 3]
    m.put("b", 20)  # rewriting an entry refreshes it alone
    clock.advance(50)
    assert dict(m.items()) == {"b": 20}
    assert not m.is_empty()
    clock.advance(50)
    assert m.is_empty()


def test_map_on_read_and_write_refreshes_read_entries(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    m = backend.get_state(
        MapStateDescriptor[str, int](name="m", serializer=IntSerializer(), key_serializer=StrSerializer(), ttl=ON_READ)
    )
    backend.set_current_key("k")
    m.put_all({"read": 1, "unread": 2})
    for _ in range(3):
        clock.advance(60)
        assert m.get("read") == 1
    assert dict(m.items()) == {"read": 1}


def _add(a: int, b: int) -> int:
    return a + b


class Count:
    def create_accumulator(self) -> int:
        return 0

    def add(self, value: str, accumulator: int) -> int:
        return accumulator + 1

    def get_result(self, accumulator: int) -> int:
        return accumulator


def test_reducing_and_aggregating_start_over_after_expiry(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    total = backend.get_state(
        ReducingStateDescriptor[int](name="r", serializer=IntSerializer(), reduce_function=_add, ttl=TtlConfig(TTL))
    )
    count = backend.get_state(
        AggregatingStateDescriptor[str, int, int](
            name="a", serializer=IntSerializer(), aggregate_function=Count(), ttl=TtlConfig(TTL)
        )
    )
    backend.set_current_key("k")
    total.add(5)
    count.add("x")
    clock.advance(50)
    total.add(5)
    count.add("y")
    assert (total.get(), count.get()) == (10, 2)
    clock.advance(TTL)
    assert (total.get(), count.get()) == (None, None)
    total.add(1)
    count.add("z")
    assert (total.get(), count.get()) == (1, 1)


def test_purge_expired_removes_every_expired_value(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    v = backend.get_state(_value(RETURN_EXPIRED))
    plain = backend.get_state(_value(None, "plain"))
    m = backend.get_state(
        MapStateDescriptor[int, int](
            name="m", serializer=IntSerializer(), key_serializer=IntSerializer(), ttl=RETURN_EXPIRED
        )
    )
    for k in range(20):
        backend.set_current_key(k)
        v.update(k)
        plain.update(k)
        m.put_all({1: 1, 2: 2})
    clock.advance(TTL // 2)
    for k in range(10):
        backend.set_current_key(k)
        v.update(k)  # refreshed: survives the purge
    clock.advance(TTL // 2)
    assert backend.purge_expired() == 10 + 40
    assert sorted(backend.keys("v")) == list(range(10))
    assert sorted(backend.keys("plain")) == list(range(20))  # no TTL: never purged
    assert list(backend.keys("m")) == []
    assert backend.purge_expired() == 0


@pytest.mark.parametrize("visibility", list(StateVisibility))
def test_cleanup_in_snapshot_leaves_expired_values_out(
    new_backend: BackendFactory, clock: ManualClock, storage: CheckpointStorage, visibility: StateVisibility
) -> None:
    ttl = TtlConfig(TTL, visibility=visibility)
    descriptors = (
        _value(ttl),
        ListStateDescriptor[str](name="l", serializer=StrSerializer(), ttl=ttl),
        MapStateDescriptor[str, int](name="m", serializer=IntSerializer(), key_serializer=StrSerializer(), ttl=ttl),
    )
    backend = new_backend(clock=clock)
    v = backend.get_state(descriptors[0])
    items = backend.get_state(descriptors[1])
    m = backend.get_state(descriptors[2])
    for k in ("old", "new"):
        backend.set_current_key(k)
        v.update(1)
        items.add("first")
        m.put("first", 1)
        if k == "old":
            clock.advance(TTL)
    items.add("second")
    m.put("second", 2)
    backend.set_current_key("old")
    items.add("late")
    m.put("late", 3)
    completed, handles = checkpoint_backends(storage, 1, [backend])
    restored = new_backend(clock=ManualClock(clock.now))
    restored.restore([(completed, h) for h in handles if h is not None])
    rv = restored.get_state(descriptors[0])
    ritems = restored.get_state(descriptors[1])
    rm = restored.get_state(descriptors[2])
    restored.set_current_key("old")
    # even RETURN_EXPIRED cannot show them: the snapshot did not contain them
    assert (rv.value(), ritems.get(), dict(rm.items())) == (-1, ["late"], {"late": 3})
    restored.set_current_key("new")
    assert (rv.value(), ritems.get(), dict(rm.items())) == (1, ["first", "second"], {"first": 1, "second": 2})
    assert sorted(restored.keys("v")) == ["new"]


def test_without_cleanup_in_snapshot_expired_values_are_restored(
    new_backend: BackendFactory, clock: ManualClock, storage: CheckpointStorage
) -> None:
    ttl = TtlConfig(TTL, visibility=StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP, cleanup_in_snapshot=False)
    backend = new_backend(clock=clock)
    v = backend.get_state(_value(ttl))
    for key in ("read", "purged"):
        backend.set_current_key(key)
        v.update(7)
    clock.advance(TTL)
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    restored = new_backend(clock=clock)
    restored.restore([(completed, handle)])
    assert sorted(restored.keys("v")) == ["purged", "read"]
    rv = restored.get_state(_value(ttl))
    restored.set_current_key("read")
    assert rv.value() == 7
    assert rv.value() == -1
    assert restored.purge_expired() == 1
    restored.set_current_key("purged")
    assert rv.value() == -1


def test_ttl_timestamps_survive_restore(
    new_backend: BackendFactory, clock: ManualClock, storage: CheckpointStorage
) -> None:
    backend = new_backend(clock=clock)
    backend.set_current_key("k")
    backend.get_state(_value()).update(1)
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    later = ManualClock(clock.now + TTL - 1)
    restored = new_backend(clock=later)
    restored.restore([(completed, handle)])
    rv = restored.get_state(_value())
    restored.set_current_key("k")
    assert rv.value() == 1
    later.advance(1)
    assert rv.value() == -1


@pytest.mark.parametrize(("before", "after"), [(TtlConfig(TTL), None), (None, TtlConfig(TTL))], ids=["off", "on"])
def test_toggling_ttl_on_restore_is_a_migration_error(
    new_backend: BackendFactory,
    clock: ManualClock,
    storage: CheckpointStorage,
    before: TtlConfig | None,
    after: TtlConfig | None,
) -> None:
    backend = new_backend(clock=clock)
    backend.set_current_key("k")
    backend.get_state(_value(before)).update(1)
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    restored = new_backend(clock=clock)
    restored.restore([(completed, handle)])
    with pytest.raises(StateMigrationError, match="TTL was"):
        restored.get_state(_value(after))


def test_changing_the_ttl_duration_on_restore_is_allowed(
    new_backend: BackendFactory, clock: ManualClock, storage: CheckpointStorage
) -> None:
    backend = new_backend(clock=clock)
    backend.set_current_key("k")
    backend.get_state(_value()).update(1)
    completed, (handle,) = checkpoint_backends(storage, 1, [backend])
    assert handle is not None
    restored = new_backend(clock=clock)
    restored.restore([(completed, handle)])
    longer = restored.get_state(_value(TtlConfig(10 * TTL)))
    restored.set_current_key("k")
    clock.advance(5 * TTL)
    assert longer.value() == 1


def test_map_return_expired_shows_an_expired_entry_once(new_backend: BackendFactory, clock: ManualClock) -> None:
    backend = new_backend(clock=clock)
    m = backend.get_state(
        MapStateDescriptor[str, int](
            name="m", serializer=IntSerializer(), key_serializer=StrSerializer(), ttl=RETURN_EXPIRED
        )
    )
    backend.set_current_key("k")
    m.put("old", 1)
    clock.advance(50)
    m.put("new", 2)
    clock.advance(50)
    assert dict(m.items()) == {"old": 1, "new": 2}
    assert dict(m.items()) == {"new": 2}
    assert m.get("old") is None
