"""Walk one Java serialization stream (the V4+ ``CheckpointProperties`` trailer) without deserializing it.

Nothing here loads a class or builds a Java object: the walker follows the grammar of the Object
Serialization Stream Protocol far enough to know where the top-level object ends (so that truncation
and trailing bytes are detected) and records the primitive, string and enum values it passes. Layout::

    >H magic AC ED | >H version 5 | one content
    object       TC_OBJECT 73 | classDesc | classdata for each class, superclass first
    classDesc    TC_CLASSDESC 72 | utf name | >q serialVersionUID | u8 flags | >h n | n x fieldDesc
                 | annotation | superclass classDesc  ;  or TC_NULL 70  ;  or TC_REFERENCE 71 | >i handle
    fieldDesc    u8 type code | utf name | (for L and [: a string object naming the field's class)
    classdata    the field values in descriptor order | (with SC_WRITE_METHOD 01) annotation
    annotation   contents up to TC_ENDBLOCKDATA 78
    string       TC_STRING 74 | >H length | bytes  ;  TC_LONGSTRING 7C | >q length | bytes (modified UTF-8)
    enum         TC_ENUM 7E | classDesc | string (the constant's name)
    array        TC_ARRAY 75 | classDesc | >i n | n values of the element type
    class        TC_CLASS 76 | classDesc  ;  block data: TC_BLOCKDATA 77 | u8 n | n bytes  (7A: >i n)

Proxy classes, exceptions and resets never occur in Flink's properties and are refused. Every length is
checked against the bytes left, nesting and class hierarchies are bounded, and every step consumes
bytes, so the walk is linear in the trailer's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from keystate.storage.format.flink._cursor import Cursor, decode_modified_utf8
from keystate.storage.format.flink._errors import FlinkMetadataError

__all__ = ["STREAM_MAGIC", "EnumConstant", "JavaObject", "walk_java_stream"]

STREAM_MAGIC = b"\xac\xed\x00\x05"
_MAX_DEPTH = 32
_MAX_HIERARCHY = 64
_BASE_HANDLE = 0x7E0000
_PRIMITIVE_SIZES = {"B": 1, "C": 2, "D": 8, "F": 4, "I": 4, "J": 8, "S": 2, "Z": 1}
_SC_WRITE_METHOD, _SC_EXTERNALIZABLE, _SC_BLOCK_DATA = 0x01, 0x04, 0x08
_TC_NULL, _TC_REFERENCE, _TC_CLASSDESC, _TC_OBJECT, _TC_STRING = 0x70, 0x71, 0x72, 0x73, 0x74
_TC_ARRAY, _TC_CLASS, _TC_BLOCKDATA, _TC_ENDBLOCKDATA = 0x75, 0x76, 0x77, 0x78
_TC_BLOCKDATALONG, _TC_LONGSTRING, _TC_ENUM = 0x7A, 0x7C, 0x7E


@dataclass(frozen=True, slots=True)
class EnumConstant:
    class_name: str
    name: str


@dataclass(frozen=True, slots=True)
class JavaObject:
    """What the walk recorded of one object: its class and its field values (primitives as ints)."""

    class_name: str
    fields: tuple[tuple[str, Value], ...]

    def get(self, name: str) -> Value:
        return next((value for key, value in self.fields if key == name), None)


Value: TypeAlias = bool | int | str | EnumConstant | JavaObject | None


@dataclass(frozen=True, slots=True)
class _ClassDesc:
    name: str
    flags: int
    fields: tuple[tuple[str, str], ...]  # (type code, field name); object and array fields have code "L"
    superclass: _ClassDesc | None


class _Walker:
    __slots__ = ("_cur", "_depth", "_handles")

    def __init__(self, cursor: Cursor) -> None:
        self._cur = cursor
        self._handles: list[_ClassDesc | Value] = []
        self._depth = 0

    def _fail(self, what: str, detail: str, at: int) -> FlinkMetadataError:
        return self._cur.error(f"properties {what}", detail, at=at)

    def _cut(self, what: str, detail: str, at: int) -> FlinkMetadataError:
        return self._cur.truncated(f"properties {what}", detail, at=at)

    def _enter(self, what: str, at: int) -> None:
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise self._fail(what, f"objects nest deeper than {_MAX_DEPTH} levels", at)

    def _new_handle(self) -> int:
        self._handles.append(None)
        return len(self._handles) - 1

    def _reference(self, what: str) -> _ClassDesc | Value:
        at = self._cur.pos
        handle = self._cur.i32(f"properties {what} handle") - _BASE_HANDLE
        if not 0 <= handle < len(self._handles):
            raise self._fail(what, f"handle {handle + _BASE_HANDLE:#x} was never assigned", at)
        return self._handles[handle]

    def _text(self, raw: bytes, what: str, at: int) -> str:
        text = decode_modified_utf8(raw)
        if text is None:
            raise self._fail(what, "the bytes are not Java modified UTF-8", at)
        return text

    # --- class descriptors --------------------------------------------------------------------------

    def class_desc(self, what: str) -> _ClassDesc | None:
        at = self._cur.pos
        tc = self._cur.u8(f"properties {what}")
        if tc == _TC_NULL:
            return None
        if tc == _TC_REFERENCE:
            desc = self._reference(what)
            if not isinstance(desc, _ClassDesc):
                raise self._fail(what, "the reference does not name a class descriptor", at)
            return desc
        if tc != _TC_CLASSDESC:
            raise self._fail(what, f"expected a class descriptor (72, 71 or 70), found {tc:#04x}", at)
        return self._new_class_desc(at)

    def _new_class_desc(self, at: int) -> _ClassDesc:
        cur = self._cur
        self._enter("class descriptor", at)
        try:
            name = cur.utf("properties class name")
            cur.i64("properties serialVersionUID")
            slot = self._new_handle()
            flags = cur.u8("properties class flags")
            n = cur.i16("properties field count")
            if n < 0:
                raise self._fail("field count", f"expected a field count >= 0, found {n}", at)
            if 3 * n > cur.remaining:
                raise self._cut("field count", f"{n} fields cannot fit in the {cur.remaining} bytes left", at)
            fields = []
            for _ in range(n):
                code_at = cur.pos
                code = chr(cur.u8("properties field type"))
                field_name = cur.utf("properties field name")
                if code in "L[":
                    type_name = self.content("field class name")
                    if not isinstance(type_name, str):
                        raise self._fail("field class name", "expected a string naming the field's class", code_at)
                    code = "L"  # an object or array field: its value is a content
                elif code not in _PRIMITIVE_SIZES:
                    raise self._fail("field type", f"unknown field type code {ord(code):#04x}", code_at)
                fields.append((code, field_name))
            self._annotation()
            desc = _ClassDesc(name, flags, tuple(fields), self.class_desc("superclass descriptor"))
        finally:
            self._depth -= 1
        self._handles[slot] = desc
        return desc

    def _annotation(self) -> None:
        """Contents up to and including TC_ENDBLOCKDATA."""
        while self._cur.peek_u8("properties annotation") != _TC_ENDBLOCKDATA:
            self.content("annotation")
        self._cur.u8("properties end of annotation")

    # --- contents -----------------------------------------------------------------------------------

    def content(self, what: str) -> Value:
        cur = self._cur
        at = cur.pos
        tc = cur.u8(f"properties {what}")
        if tc == _TC_NULL:
            return None
        if tc == _TC_REFERENCE:
            value = self._reference(what)
            return None if isinstance(value, _ClassDesc) else value
        if tc == _TC_STRING:
            slot = self._new_handle()
            text = cur.utf(f"properties {what}")
        elif tc == _TC_LONGSTRING:
            slot = self._new_handle()
            length = cur.i64(f"properties {what} length")
            if length < 0:
                raise self._fail(what, f"expected a string length >= 0, found {length}", at)
            if length > cur.remaining:
                raise self._cut(what, f"a string of {length} bytes, but {cur.remaining} bytes are left", at)
            text = self._text(cur.raw(length, f"properties {what}"), what, at)
        elif tc in (_TC_BLOCKDATA, _TC_BLOCKDATALONG):
            n = cur.u8(f"properties {what} length") if tc == _TC_BLOCKDATA else cur.i32(f"properties {what} length")
            if n < 0:
                raise self._fail(what, f"negative block-data length {n}", at)
            cur.raw(n, f"properties {what} block data")
            return None
        elif tc == _TC_CLASSDESC:
            self._new_class_desc(at)
            return None
        else:
            return self._composite(tc, what, at)
        self._handles[slot] = text
        return text

    def _composite(self, tc: int, what: str, at: int) -> Value:
        self._enter(what, at)
        try:
            if tc == _TC_OBJECT:
                return self._object(at)
            if tc == _TC_ENUM:
                desc = self.class_desc("enum class")
                slot = self._new_handle()
                name = self.content("enum constant name")
                if desc is None or not isinstance(name, str):
                    raise self._fail(what, "an enum needs a class and a constant name", at)
                constant = EnumConstant(desc.name, name)
                self._handles[slot] = constant
                return constant
            if tc == _TC_ARRAY:
                self._array(at)
                return None
            if tc == _TC_CLASS:
                self.class_desc("class")
                self._new_handle()
                return None
        finally:
            self._depth -= 1
        raise self._fail(what, f"type code {tc:#04x} does not occur in Flink's checkpoint properties", at)

    def _hierarchy(self, desc: _ClassDesc, at: int) -> list[_ClassDesc]:
        chain: list[_ClassDesc] = []
        node: _ClassDesc | None = desc
        while node is not None:
            if len(chain) >= _MAX_HIERARCHY:
                raise self._fail("object", f"class {desc.name} has more than {_MAX_HIERARCHY} superclasses", at)
            chain.append(node)
            node = node.superclass
        chain.reverse()
        return chain

    def _value(self, code: str, what: str) -> Value:
        if code == "Z":
            return self._cur.boolean(f"properties {what}")
        if code in _PRIMITIVE_SIZES:
            raw = self._cur.raw(_PRIMITIVE_SIZES[code], f"properties {what}")
            return int.from_bytes(raw, "big", signed=code != "C")
        return self.content(what)

    def _object(self, at: int) -> JavaObject:
        desc = self.class_desc("object class")
        if desc is None:
            raise self._fail("object", "an object needs a class descriptor", at)
        slot = self._new_handle()
        fields: list[tuple[str, Value]] = []
        for cls in self._hierarchy(desc, at):
            if cls.flags & _SC_EXTERNALIZABLE:
                if not cls.flags & _SC_BLOCK_DATA:
                    raise self._fail("object", f"{cls.name} is externalizable without block data", at)
                self._annotation()
                continue
            fields.extend((name, self._value(code, f"{cls.name}.{name}")) for code, name in cls.fields)
            if cls.flags & _SC_WRITE_METHOD:
                self._annotation()
        obj = JavaObject(desc.name, tuple(fields))
        self._handles[slot] = obj
        return obj

    def _array(self, at: int) -> None:
        cur = self._cur
        desc = self.class_desc("array class")
        if desc is None or not desc.name.startswith("["):
            raise self._fail("array", "an array needs an array class descriptor", at)
        self._new_handle()
        n = cur.i32("properties array length")
        element = desc.name[1:2]
        size = _PRIMITIVE_SIZES.get(element, 1)
        if n < 0:
            raise self._fail("array", f"expected an array length >= 0, found {n}", at)
        if n * size > cur.remaining:
            raise self._cut("array", f"{n} elements cannot fit in the {cur.remaining} bytes left", at)
        if element in _PRIMITIVE_SIZES:
            cur.raw(n * size, "properties array elements")
            return
        for i in range(n):
            self.content(f"array[{i}]")


def walk_java_stream(cursor: Cursor) -> JavaObject:
    """Walk the stream at the cursor to the end of its top-level object, and return what was recorded."""
    at = cursor.pos
    magic = cursor.raw(4, "properties stream header")
    if magic != STREAM_MAGIC:
        raise cursor.error(
            "properties stream header",
            f"expected the Java serialization header ac ed 00 05, found {magic.hex(' ')}",
            at=at,
        )
    obj_at = cursor.pos
    value = _Walker(cursor).content("object")
    if not isinstance(value, JavaObject):
        raise cursor.error("properties object", "expected a serialized object", at=obj_at)
    return value
