"""A bounds-checked reader over ``java.io.DataOutputStream`` bytes (big-endian), with error context.

Primitives, as Flink writes them::

    u8    1 byte (type bytes, modes, booleans: 0 = false)
    i16   >h          i32   >i          i64   >q          (two's complement)
    utf   >H byte length | that many bytes of modified UTF-8 (writeUTF: U+0000 as C0 80,
          supplementary characters as two 3-byte surrogates, i.e. CESU-8)

Every read checks the bytes remaining first, so a lying length or count fails here with a typed error
before anything is allocated. ``count()`` also checks that the announced items can fit in the bytes
remaining at their smallest size, so a count of 2**31 in a small file fails at once rather than after
looping. Each error names the file, the path of fields being read (operator, subtask, handle) and the
byte offset.
"""

from __future__ import annotations

import struct
from types import TracebackType

from keystate.storage.format.flink._errors import FlinkMetadataError, TruncatedFlinkMetadataError

__all__ = ["Cursor", "decode_modified_utf8"]

_I32 = struct.Struct(">i")  # >i: counts, flags, indexes, parallelism
_I64 = struct.Struct(">q")  # >q: ids, sizes, offsets
_U16 = struct.Struct(">H")  # >H: the byte length in front of a writeUTF string
_I16 = struct.Struct(">h")  # >h: field counts in Java serialization class descriptors

CORRUPT = (
    "the file is corrupt or not a Flink 1.11-2.3 _metadata: use another checkpoint, or report a keystate bug "
    "if Flink restores from this one"
)
TRUNCATED = (
    "the file is truncated (or a count in it is corrupt): copy it again from the checkpoint storage, or use "
    "another checkpoint"
)


def decode_modified_utf8(raw: bytes) -> str | None:
    """Java's modified UTF-8 (``DataInput.readUTF``) to str, or None if Java would reject the bytes.

    Surrogate pairs are joined into one character; a lone surrogate is kept, as Java keeps it.
    """
    if raw.isascii():
        return raw.decode("ascii")
    if any(b >= 0xF0 for b in raw):  # 4-byte sequences are not modified UTF-8; readUTF rejects them
        return None
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return text


class _Scope:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: Cursor) -> None:
        self._cursor = cursor

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._cursor._path.pop()


class Cursor:
    """Reads primitives from ``data`` from position 0 on; raises only :class:`FlinkMetadataError`."""

    __slots__ = ("_data", "_path", "_pos", "where")

    def __init__(self, data: bytes, where: str) -> None:
        self._data = data
        self._pos = 0
        self._path: list[str] = []
        self.where = where

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def scope(self, name: str) -> _Scope:
        """``with cursor.scope("subtask 1"):`` adds ``name`` to the path that error messages show."""
        self._path.append(name)
        return _Scope(self)

    def describe(self, what: str, at: int) -> str:
        path = " > ".join([*self._path, what])
        return f"{self.where}: {path} (at byte {at})"

    def error(self, what: str, detail: str, *, at: int | None = None, advice: str = CORRUPT) -> FlinkMetadataError:
        """A :class:`FlinkMetadataError` for field ``what`` (at ``at``, default: here) to raise."""
        offset = self._pos if at is None else at
        return FlinkMetadataError(f"{self.describe(what, offset)}: {detail}; {advice}", offset=offset)

    def truncated(self, what: str, detail: str, *, at: int) -> TruncatedFlinkMetadataError:
        """A :class:`TruncatedFlinkMetadataError` for field ``what`` at ``at`` to raise."""
        return TruncatedFlinkMetadataError(f"{self.describe(what, at)}: {detail}; {TRUNCATED}", offset=at)

    def need(self, n: int, what: str) -> None:
        if n > len(self._data) - self._pos:
            raise self.truncated(
                what,
                f"needs {n} bytes but the file ends after {self.remaining} more (file size {len(self._data)})",
                at=self._pos,
            )

    def u8(self, what: str) -> int:
        self.need(1, what)
        value = self._data[self._pos]
        self._pos += 1
        return value

    def boolean(self, what: str) -> bool:
        return self.u8(what) != 0

    def i32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _I32.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(value)

    def i16(self, what: str) -> int:
        self.need(2, what)
        (value,) = _I16.unpack_from(self._data, self._pos)
        self._pos += 2
        return int(value)

    def i64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _I64.unpack_from(self._data, self._pos)
        self._pos += 8
        return int(value)

    def peek_u8(self, what: str) -> int:
        """The next byte, without consuming it."""
        self.need(1, what)
        return self._data[self._pos]

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        start = self._pos
        self._pos += n
        return self._data[start : self._pos]

    def utf(self, what: str) -> str:
        start = self._pos
        self.need(2, f"{what} length")
        (length,) = _U16.unpack_from(self._data, start)
        self._pos += 2
        raw = self.raw(length, what)
        text = decode_modified_utf8(raw)
        if text is None:
            raise self.error(what, f"the {length} bytes are not Java modified UTF-8", at=start)
        return text

    def count(self, what: str, *, item_bytes: int, item: str) -> int:
        """An i32 count of items that each take at least ``item_bytes`` bytes: >= 0 and fitting the file."""
        at = self._pos
        n = self.i32(what)
        if n < 0:
            raise self.error(what, f"expected a non-negative {what}, found {n}", at=at)
        if n * item_bytes > self.remaining:
            each = "" if item_bytes == 1 else f" of at least {item_bytes} bytes each"
            raise self.truncated(what, f"announces {n} {item}{each}, but only {self.remaining} bytes follow", at=at)
        return n

    def i64_array(self, n: int, what: str) -> tuple[int, ...]:
        """``n`` big-endian i64 values (``n`` already checked by :meth:`count`)."""
        self.need(8 * n, what)
        values = struct.unpack_from(f">{n}q", self._data, self._pos)
        self._pos += 8 * n
        return values
