"""Serializers: how keys, values and namespaces become bytes.

Every serializer has a stable ``name`` that is written into snapshots, so tools can decode state
without running the job and a restore can check it reads what was written. Serializers whose
``safe`` flag is true can decode untrusted bytes (``keystate dump`` uses only those); ``pickle`` is
never decoded by the tools unless the user passes an explicit unsafe flag.

Defaults: keys use :class:`KeySerializer` (deterministic and type-tagged, so the key-group hash of a
key never changes across processes or Python versions); values use :class:`PickleSerializer` for
generality (like Flink's Kryo fallback); choose ``json``/``int64``/``str``/``bytes`` for state you
want to read with the tools.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import sys
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from keystate.statebackend.errors import SerializationError

__all__ = [
    "BytesSerializer",
    "FloatSerializer",
    "IntSerializer",
    "JsonSerializer",
    "KeySerializer",
    "PickleSerializer",
    "Serializer",
    "StrSerializer",
    "safe_serializer",
]

T = TypeVar("T")

_I64 = struct.Struct(">Q")  # sortable int64: two's complement with the sign bit flipped
_F64 = struct.Struct(">d")
_U16 = struct.Struct(">H")
_SIGN = 1 << 63


class Serializer(ABC, Generic[T]):
    """Turns values into bytes and back. Implementations must be deterministic and thread-safe."""

    name: str = ""
    """Stable identifier written into snapshots."""
    safe: bool = True
    """Whether :meth:`deserialize` is safe on untrusted bytes."""

    @abstractmethod
    def serialize(self, value: T) -> bytes: ...

    @abstractmethod
    def deserialize(self, data: bytes) -> T: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class BytesSerializer(Serializer[bytes]):
    """Bytes as they are."""

    name = "bytes"

    def serialize(self, value: bytes | bytearray | memoryview) -> bytes:
        if value.__class__ is bytes:
            return value  # exactly bytes: no copy
        if not isinstance(value, bytes | bytearray | memoryview):
            raise SerializationError(f"bytes serializer expects bytes, found {type(value).__name__}")
        return bytes(value)

    def deserialize(self, data: bytes) -> bytes:
        return bytes(data)


class StrSerializer(Serializer[str]):
    """UTF-8 text."""

    name = "str"

    def serialize(self, value: str) -> bytes:
        if not isinstance(value, str):
            raise SerializationError(f"str serializer expects str, found {type(value).__name__}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError(_not_unicode("str serializer", exc)) from exc

    def deserialize(self, data: bytes) -> str:
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SerializationError(f"str serializer: stored bytes are not UTF-8 ({exc})") from exc


class IntSerializer(Serializer[int]):
    """A signed 64-bit integer, 8 bytes big-endian with the sign bit flipped (byte order = numeric order)."""

    name = "int64"

    def serialize(self, value: int) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int) or not -_SIGN <= value < _SIGN:
            raise SerializationError(f"int64 serializer expects an int in [-2**63, 2**63), found {value!r}")
        return _I64.pack(value ^ _SIGN if value >= 0 else value + _SIGN)

    def deserialize(self, data: bytes) -> int:
        if len(data) != 8:
            raise SerializationError(f"int64 serializer: expected 8 bytes, found {len(data)}")
        raw: int = _I64.unpack(data)[0]
        return raw ^ _SIGN if raw >= _SIGN else raw - _SIGN


class FloatSerializer(Serializer[float]):
    """An IEEE-754 double, 8 bytes big-endian."""

    name = "float64"

    def serialize(self, value: float) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SerializationError(f"float64 serializer expects a float, found {type(value).__name__}")
        try:
            return _F64.pack(value)
        except (struct.error, OverflowError) as exc:  # an int beyond the float range
            raise SerializationError(
                f"float64 serializer cannot encode an int of {int(value).bit_length()} bits: it is outside the range "
                "of a double; "
                "use the int64 serializer for ints, or json or pickle for larger ones"
            ) from exc

    def deserialize(self, data: bytes) -> float:
        if len(data) != 8:
            raise SerializationError(f"float64 serializer: expected 8 bytes, found {len(data)}")
        return float(_F64.unpack(data)[0])


class JsonSerializer(Serializer[Any]):
    """JSON (UTF-8, compact, sorted keys): None, bool, int, float, str, lists and str-keyed dicts."""

    name = "json"

    def serialize(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"json serializer cannot encode {type(value).__name__}: {exc}") from exc
        except RecursionError as exc:
            raise SerializationError(_too_deep("json", value)) from exc

    def deserialize(self, data: bytes) -> Any:
        try:
            return json.loads(bytes(data), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise SerializationError(f"json serializer: stored bytes are not valid JSON ({exc})") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # never written by serialize (allow_nan=False)


def _not_unicode(what: str, exc: UnicodeEncodeError) -> str:
    bad = exc.object[exc.start : exc.end]
    return (
        f"{what} cannot encode {bad!r} at position {exc.start} of a {len(exc.object)}-character string: a lone "
        "surrogate is not Unicode text and has no UTF-8 form (it usually comes from bytes decoded with "
        "errors='surrogateescape'); clean the text (e.g. .encode('utf-8', 'replace').decode()) or keep bytes"
    )


def _too_long_key(what: str) -> str:
    return f"the default key serializer cannot encode {what}: keys are at most 400 bytes; use a shorter key (a hash)"


def _too_deep(what: str, value: object) -> str:
    return (
        f"{what} serializer cannot encode {type(value).__name__}: it is nested more deeply than Python's recursion "
        f"limit ({sys.getrecursionlimit()}) allows; flatten the value or store it in smaller parts"
    )


class PickleSerializer(Serializer[Any]):
    """Any picklable object (protocol 5). Not safe on untrusted bytes: the tools never decode it."""

    name = "pickle"
    safe = False

    def serialize(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=5)
        except RecursionError as exc:
            raise SerializationError(_too_deep("pickle", value)) from exc
        except Exception as exc:  # pickling runs the value's own code (__reduce__, __getstate__): anything can fail
            raise SerializationError(
                f"pickle serializer cannot encode {type(value).__name__}: {type(exc).__name__}: {exc}; make the "
                "value picklable or give the descriptor another serializer"
            ) from exc

    def deserialize(self, data: bytes) -> Any:
        try:
            # State written by this job itself; the tools never decode pickle (not a safe serializer).
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"pickle serializer: cannot decode stored bytes ({exc})") from exc


# Type tags of KeySerializer: the first byte of every encoded key (and of every tuple element).
_TAG_NONE, _TAG_FALSE, _TAG_TRUE, _TAG_INT, _TAG_BIGINT, _TAG_FLOAT, _TAG_STR, _TAG_BYTES, _TAG_TUPLE = range(9)


class KeySerializer(Serializer[Any]):
    """The default key serializer: deterministic, type-tagged bytes for None, bool, int, float, str,
    bytes and tuples of those (``key-v1``).

    Layout: one tag byte, then ``int`` as sortable int64 (ints outside int64: tag 4, ``>H`` length,
    signed big-endian bytes), ``float`` as ``>d`` (NaN rejected), ``str`` as UTF-8, ``bytes`` raw,
    ``tuple`` as a sequence of ``>H`` length + encoded element. The same key always gives the same
    bytes, so its key group never changes; ``1``, ``1.0``, ``True`` and ``"1"`` are different keys.
    """

    name = "key-v1"

    def serialize(self, value: Any) -> bytes:
        t = type(value)
        if t is str:
            text: str = value
            try:
                return b"\x06" + text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SerializationError(_not_unicode("the default key serializer", exc)) from exc
        if t is int:
            if -_SIGN <= value < _SIGN:
                return b"\x03" + _I64.pack(value ^ _SIGN if value >= 0 else value + _SIGN)
            big: int = value
            raw = big.to_bytes((big.bit_length() + 8) // 8, "big", signed=True)
            if len(raw) > 0xFFFF:
                raise SerializationError(_too_long_key(f"an int of {len(raw)} bytes"))
            return b"\x04" + _U16.pack(len(raw)) + raw
        if t is bytes:
            raw_key: bytes = value
            return b"\x07" + raw_key
        if value is None:
            return b"\x00"
        if t is bool:
            return b"\x02" if value else b"\x01"
        if t is float:
            if math.isnan(value):
                raise SerializationError("NaN cannot be a key (it is not equal to itself)")
            return b"\x05" + _F64.pack(value)
        if t is tuple:
            parts = [b"\x08"]
            try:
                for element in value:
                    encoded = self.serialize(element)
                    if len(encoded) > 0xFFFF:
                        raise SerializationError(_too_long_key(f"a tuple element of {len(encoded)} bytes"))
                    parts.append(_U16.pack(len(encoded)))
                    parts.append(encoded)
            except RecursionError:
                raise SerializationError(
                    "the default key serializer cannot encode a tuple nested more deeply than Python's recursion "
                    f"limit ({sys.getrecursionlimit()}) allows; use a flat key (keys are at most 400 bytes anyway)"
                ) from None
            return b"".join(parts)
        raise SerializationError(
            f"the default key serializer handles None, bool, int, float, str, bytes and tuples; found "
            f"{t.__name__}: give the descriptor or backend a key serializer for it"
        )

    def deserialize(self, data: bytes) -> Any:
        try:
            value, end = self._decode(bytes(data), 0, len(data))
        except RecursionError:
            raise SerializationError("key-v1: tuples nested too deeply") from None
        if end != len(data):
            raise SerializationError(f"key-v1: {len(data) - end} trailing bytes after the key")
        return value

    def _decode(self, data: bytes, pos: int, end: int) -> tuple[Any, int]:
        if pos >= end:
            raise SerializationError("key-v1: empty key bytes")
        tag = data[pos]
        pos += 1
        if tag == _TAG_NONE:
            return None, pos
        if tag in (_TAG_FALSE, _TAG_TRUE):
            return tag == _TAG_TRUE, pos
        if tag == _TAG_INT:
            if end - pos < 8:
                raise SerializationError("key-v1: truncated int")
            (raw,) = _I64.unpack_from(data, pos)
            return (raw ^ _SIGN if raw >= _SIGN else raw - _SIGN), pos + 8
        if tag == _TAG_BIGINT:
            if end - pos < 2:
                raise SerializationError("key-v1: truncated big int")
            (n,) = _U16.unpack_from(data, pos)
            if end - pos - 2 < n:
                raise SerializationError("key-v1: truncated big int")
            big = int.from_bytes(data[pos + 2 : pos + 2 + n], "big", signed=True)
            if -_SIGN <= big < _SIGN or n != (big.bit_length() + 8) // 8:
                # serialize() never writes this: decoding it would give a key with other bytes
                raise SerializationError("key-v1: non-canonical big int")
            return big, pos + 2 + n
        if tag == _TAG_FLOAT:
            if end - pos < 8:
                raise SerializationError("key-v1: truncated float")
            number: float = _F64.unpack_from(data, pos)[0]
            if math.isnan(number):
                raise SerializationError("key-v1: NaN cannot be a key")
            return number, pos + 8
        if tag == _TAG_STR:
            try:
                return data[pos:end].decode("utf-8"), end
            except UnicodeDecodeError as exc:
                raise SerializationError(f"key-v1: string key is not UTF-8 ({exc})") from exc
        if tag == _TAG_BYTES:
            return data[pos:end], end
        if tag == _TAG_TUPLE:
            items: list[Any] = []
            while pos < end:
                if end - pos < 2:
                    raise SerializationError("key-v1: truncated tuple element length")
                (n,) = _U16.unpack_from(data, pos)
                pos += 2
                if end - pos < n:
                    raise SerializationError("key-v1: truncated tuple element")
                item, used = self._decode(data, pos, pos + n)
                if used != pos + n:
                    raise SerializationError("key-v1: tuple element has trailing bytes")
                items.append(item)
                pos += n
            return tuple(items), pos
        raise SerializationError(f"key-v1: unknown type tag {tag}")


_SAFE: dict[str, Serializer[Any]] = {
    s.name: s for s in (BytesSerializer(), StrSerializer(), IntSerializer(), FloatSerializer(), JsonSerializer(),
                        KeySerializer())
}  # fmt: skip


def safe_serializer(name: str) -> Serializer[Any] | None:
    """The built-in serializer with this name if it is safe on untrusted bytes, else ``None``."""
    return _SAFE.get(name)
