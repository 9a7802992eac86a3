"""Value, list, map, reducing and aggregating state over a KV engine, with TTL.

Composite keys (``docs/format.md``, "keyed state entries")::

    >H key group | >H state id | >H key length | key | >H namespace length | namespace | [map user key]

The backend supplies the key group and key parts of the current key (:class:`BackendView`); stored values
are laid out as ``keystate.statebackend._entry_format`` says. A map stores one KV entry per user key, so
its entries iterate in the byte order of the serialized user keys.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from keystate.statebackend._entry_format import (
    LIST_FRAME,
    MAX_STORED_KEY_BYTES,
    TTL_LIST_FRAME,
    encode_frame,
    split_frames,
    split_plain,
)
from keystate.statebackend._kv import KVStore
from keystate.statebackend.errors import StateError
from keystate.statebackend.serializers import BytesSerializer, Serializer
from keystate.statebackend.state import (
    AggregatingState,
    AggregatingStateDescriptor,
    ListState,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    State,
    StateDescriptor,
    StateKind,
    ValueState,
    ValueStateDescriptor,
)
from keystate.statebackend.ttl import TTL_HEADER, Clock, StateVisibility, TtlConfig, TtlUpdate

__all__ = ["BackendView", "make_state"]

_U16 = struct.Struct(">H")
_TS = TTL_HEADER
_EMPTY_NAMESPACE = _U16.pack(0)


class BackendView(Protocol):
    """What the state objects read from the keyed backend that made them (``keyed.KVKeyedStateBackend``)."""

    kv: KVStore
    key_group_prefix: bytes
    """``>H`` key group of the current key."""
    key_part: bytes
    """``>H`` key length | serialized current key (empty before the first key). The states cache composite
    keys by the identity of this object, so another key must come as another object."""
    clock: Clock

    @property
    def current_key(self) -> Any: ...


class _Base(State):
    """Shared plumbing: the composite key of the current key, TTL wrapping and unwrapping."""

    def __init__(self, backend: BackendView, sid: int, descriptor: StateDescriptor[Any]) -> None:
        self._b = backend
        self._kv = backend.kv
        self._get = backend.kv.get
        self._put = backend.kv.put
        self._sid = _U16.pack(sid)
        self._ns = _EMPTY_NAMESPACE
        # The composite key for the backend's key_part object: hot paths test `key_part is
        # _last_key_part` inline (None never matches) and call _key() only when it changed.
        self._last_key_part: bytes | None = None
        self._last_key = b""
        self._ser: Serializer[Any] = descriptor.serializer
        self._serialize = descriptor.serializer.serialize
        # BytesSerializer.deserialize is bytes(data): call the builtin directly (no Python frame)
        self._deserialize: Callable[[bytes], Any] = (
            bytes if type(descriptor.serializer) is BytesSerializer else descriptor.serializer.deserialize
        )
        self._ttl: TtlConfig | None = descriptor.ttl
        self.name = descriptor.name

    def set_namespace(self, namespace: bytes) -> None:
        if len(namespace) > 0xFFFF:
            raise StateError(f"state {self.name!r}: namespace of {len(namespace)} bytes is over 65535")
        self._ns = _U16.pack(len(namespace)) + namespace
        self._last_key_part = None

    def _key(self) -> bytes:
        """The composite key of the current key; cached until the key or namespace changes."""
        b = self._b
        key_part = b.key_part
        if key_part is self._last_key_part:
            return self._last_key
        if not key_part:
            raise StateError(f"state {self.name!r} used with no current key; call set_current_key() first")
        key = b.key_group_prefix + self._sid + key_part + self._ns
        if len(key) > MAX_STORED_KEY_BYTES:
            raise self._too_long(len(key), "")
        self._last_key_part = key_part
        self._last_key = key
        return key

    def _too_long(self, size: int, what: str) -> StateError:
        return StateError(
            f"state {self.name!r}: key {str(self._b.current_key)[:40]!r} with namespace of {len(self._ns) - 2} "
            f"bytes{what} makes a stored key of {size} bytes, more than {MAX_STORED_KEY_BYTES}; use a shorter "
            "key, namespace or map key"
        )

    def _wrap(self, payload: bytes) -> bytes:
        if self._ttl is None:
            return payload
        return _TS.pack(self._b.clock()) + payload

    def _unwrap(self, raw: bytes, key: bytes) -> bytes | None:
        """The live payload of a stored value, applying TTL rules (may delete or refresh it)."""
        ttl = self._ttl
        if ttl is None:
            return raw
        (ts,) = _TS.unpack_from(raw)
        now = self._b.clock()
        if now >= ts + ttl.ttl_ms:
            self._kv.delete(key)  # expired values are removed when read (returned once at most)
            if ttl.visibility is StateVisibility.NEVER_RETURN_EXPIRED:
                return None
            return raw[_TS.size :]
        if ttl.update is TtlUpdate.ON_READ_AND_WRITE:
            self._kv.put(key, _TS.pack(now) + raw[_TS.size :])
        return raw[_TS.size :]

    def _stored(self, key: bytes) -> Any:
        """The live value stored under ``key``, deserialized (``None`` if absent or expired)."""
        raw = self._kv.get(key)
        if raw is None:
            return None
        payload = self._unwrap(raw, key)
        return None if payload is None else self._ser.deserialize(payload)

    def clear(self) -> None:
        self._kv.delete(self._key())


class _Value(_Base, ValueState[Any]):
    def __init__(self, backend: BackendView, sid: int, descriptor: ValueStateDescriptor[Any]) -> None:
        super().__init__(backend, sid, descriptor)
        self._default = descriptor.default

    def value(self) -> Any:
        key = self._last_key if self._b.key_part is self._last_key_part else self._key()
        raw = self._get(key)
        if raw is None:
            return self._default
        if self._ttl is not None:
            raw = self._unwrap(raw, key)
            if raw is None:
                return self._default
        return self._deserialize(raw)

    def update(self, value: Any) -> None:
        if value is None:
            self.clear()
            return
        key = self._last_key if self._b.key_part is self._last_key_part else self._key()
        if self._ttl is None:
            self._put(key, self._serialize(value))
        else:
            self._put(key, self._wrap(self._serialize(value)))


class _List(_Base, ListState[Any]):
    def get(self) -> list[Any]:
        key = self._key()
        raw = self._kv.get(key)
        if raw is None:
            return []
        ttl = self._ttl
        if ttl is None:
            return list(map(self._deserialize, split_plain(raw)))
        frames = split_frames(raw, True)
        now = self._b.clock()
        live = [(ts, p) for ts, p in frames if now < ts + ttl.ttl_ms]
        never_expired = ttl.visibility is StateVisibility.NEVER_RETURN_EXPIRED
        shown = live if never_expired else frames
        rewrite = len(live) != len(frames)
        if ttl.update is TtlUpdate.ON_READ_AND_WRITE and live:
            live = [(now, p) for _, p in live]
            rewrite = True
        if rewrite:
            self._store(key, [p for _, p in live], [ts for ts, _ in live])
        return [self._ser.deserialize(p) for _, p in shown]

    def _store(self, key: bytes, payloads: list[bytes], stamps: list[int] | None = None) -> None:
        if not payloads:
            self._kv.delete(key)
            return
        if self._ttl is None:
            self._kv.put(key, b"".join(encode_frame(p, None) for p in payloads))
        else:
            now = self._b.clock()
            ts = stamps or [now] * len(payloads)
            self._kv.put(key, b"".join(encode_frame(p, t) for p, t in zip(payloads, ts, strict=True)))

    def add(self, value: Any) -> None:
        key = self._last_key if self._b.key_part is self._last_key_part else self._key()
        payload = self._serialize(value)
        if self._ttl is None:
            self._kv.append(key, LIST_FRAME.pack(len(payload)) + payload)
        else:
            self._kv.append(key, TTL_LIST_FRAME.pack(self._b.clock(), len(payload)) + payload)

    def add_all(self, values: Iterable[Any]) -> None:
        ts = None if self._ttl is None else self._b.clock()
        data = b"".join(encode_frame(self._ser.serialize(v), ts) for v in values)
        if data:
            self._kv.append(self._key(), data)

    def update(self, values: Iterable[Any]) -> None:
        self._store(self._key(), [self._ser.serialize(v) for v in values])


class _Map(_Base, MapState[Any, Any]):
    def __init__(self, backend: BackendView, sid: int, descriptor: MapStateDescriptor[Any, Any]) -> None:
        super().__init__(backend, sid, descriptor)
        self._key_ser: Serializer[Any] = descriptor.key_serializer
        self._serialize_user_key = descriptor.key_serializer.serialize

    def _entry(self, user_key: Any) -> bytes:
        prefix = self._last_key if self._b.key_part is self._last_key_part else self._key()
        entry = prefix + self._serialize_user_key(user_key)
        if len(entry) > MAX_STORED_KEY_BYTES:
            raise self._too_long(len(entry), f" and map key {str(user_key)[:40]!r}")
        return entry

    def get(self, key: Any) -> Any:
        prefix = self._last_key if self._b.key_part is self._last_key_part else self._key()
        entry = prefix + self._serialize_user_key(key)  # _entry() inlined: the hot path of map reads
        if len(entry) > MAX_STORED_KEY_BYTES:
            raise self._too_long(len(entry), f" and map key {str(key)[:40]!r}")
        raw = self._get(entry)
        if raw is None:
            return None
        if self._ttl is None:
            return self._deserialize(raw)
        payload = self._unwrap(raw, entry)
        return None if payload is None else self._deserialize(payload)

    def put(self, key: Any, value: Any) -> None:
        if self._ttl is None:
            self._put(self._entry(key), self._serialize(value))
        else:
            self._put(self._entry(key), self._wrap(self._serialize(value)))

    def put_all(self, items: Iterable[tuple[Any, Any]] | dict[Any, Any]) -> None:
        pairs = items.items() if isinstance(items, dict) else items
        for k, v in pairs:
            self.put(k, v)

    def remove(self, key: Any) -> None:
        self._kv.delete(self._entry(key))

    def contains(self, key: Any) -> bool:
        entry = self._entry(key)
        raw = self._kv.get(entry)
        return raw is not None and self._unwrap(raw, entry) is not None

    def _live(self) -> Iterator[tuple[bytes, bytes]]:
        prefix = self._key()
        for entry, raw in self._kv.scan(prefix):
            payload = self._unwrap(raw, entry)
            if payload is not None:
                yield entry[len(prefix) :], payload

    def items(self) -> Iterator[tuple[Any, Any]]:
        for uk, payload in self._live():
            yield self._key_ser.deserialize(uk), self._ser.deserialize(payload)

    def keys(self) -> Iterator[Any]:
        for uk, _ in self._live():
            yield self._key_ser.deserialize(uk)

    def values(self) -> Iterator[Any]:
        for _, payload in self._live():
            yield self._ser.deserialize(payload)

    def is_empty(self) -> bool:
        return next(self._live(), None) is None

    def clear(self) -> None:
        self._kv.delete_prefix(self._key())


class _Reducing(_Base, ReducingState[Any]):
    def __init__(self, backend: BackendView, sid: int, descriptor: ReducingStateDescriptor[Any]) -> None:
        super().__init__(backend, sid, descriptor)
        self._reduce = descriptor.reduce_function

    def get(self) -> Any:
        return self._stored(self._key())

    def add(self, value: Any) -> None:
        key = self._key()
        current = self._stored(key)
        result = value if current is None else self._reduce(current, value)
        self._kv.put(key, self._wrap(self._ser.serialize(result)))


class _Aggregating(_Base, AggregatingState[Any, Any]):
    def __init__(self, backend: BackendView, sid: int, descriptor: AggregatingStateDescriptor[Any, Any, Any]) -> None:
        super().__init__(backend, sid, descriptor)
        self._fn = descriptor.aggregate_function

    def get(self) -> Any:
        acc = self._stored(self._key())
        return None if acc is None else self._fn.get_result(acc)

    def add(self, value: Any) -> None:
        key = self._key()
        acc = self._stored(key)
        if acc is None:
            acc = self._fn.create_accumulator()
        self._kv.put(key, self._wrap(self._ser.serialize(self._fn.add(value, acc))))


def make_state(backend: BackendView, sid: int, descriptor: StateDescriptor[Any]) -> State:
    """The state object for a descriptor's kind."""
    if isinstance(descriptor, ValueStateDescriptor):
        return _Value(backend, sid, descriptor)
    if isinstance(descriptor, MapStateDescriptor):
        return _Map(backend, sid, descriptor)
    if isinstance(descriptor, ReducingStateDescriptor):
        return _Reducing(backend, sid, descriptor)
    if isinstance(descriptor, AggregatingStateDescriptor):
        return _Aggregating(backend, sid, descriptor)
    if descriptor.kind is StateKind.LIST:
        return _List(backend, sid, descriptor)
    raise StateError(f"state {descriptor.name!r}: unsupported descriptor type {type(descriptor).__name__}")
