"""Hypothesis strategies for hostile input: JSON values, hostile strings, numbers and paths, mutations of
valid JSON documents (delete, replace, retype, insert at any depth) and of valid bytes (flips, truncations,
length fields set to huge values).

Everything is drawn, so a failing example shrinks and replays from its seed.
"""

from __future__ import annotations

import copy
import functools
import json
import struct
from collections.abc import Sequence
from typing import Any, TypeVar

from hypothesis import strategies as st

__all__ = [
    "HOSTILE_NUMBERS",
    "HOSTILE_PATHS",
    "HOSTILE_STRINGS",
    "encoded_document",
    "hostile_numbers",
    "hostile_paths",
    "hostile_strings",
    "json_values",
    "mutated_bytes",
    "mutated_document",
]

JsonPath = tuple[str | int, ...]

HOSTILE_NUMBERS: tuple[Any, ...] = (
    0, -1, 1, 2, 7, 8, 255, 256, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
    0xFFFFFFF0, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**300, -(10**300), 10**4000,
    0.0, -0.0, 1.0, 1.5, 1e308, -1e308, 5e-324, 1e300, True, False,
)  # fmt: skip
"""Boundaries of every integer field, numbers JSON can hold but keystate must refuse, and booleans."""

HOSTILE_STRINGS: tuple[str, ...] = (
    "", " ", "\x00", "\n", "\t", "\x1f", "\x7f", "\u0085", "\u2028", "\ufeff", "\ud800", "\udfff", "\udcff",
    "a\ud800b", "\U0001f600", "z\u00e4hler", "\u0130", "e\u0301", "\u202e", "null", "true", "1", "1.0", "NaN",
    "[]", "{}", '"', "\\", "%s", "{0}", "'", "x" * 257, "x" * 1025, "x" * 5000, "é" * 300,
)  # fmt: skip
"""Empty, control characters, lone surrogates, bidi and combining characters, lengths past each limit."""

HOSTILE_PATHS: tuple[str, ...] = (
    "..", ".", "../x", "a/../b", "a/../../b", "a/./b", "./a", "a/..", "/etc/passwd", "//server/share", "/",
    "C:\\x", "c:x", "C:/x", "a\\..\\b", "..\\x", "a//b", "a/", "", "a/\x00", "a\x00", "%2e%2e/x", "a/%2e%2e",
    "\u2025/x", "\uff0e\uff0e/x", "a/..\u200b", "~/x", "~root/x", "file:///etc/passwd", "s3://bucket/key",
    "a b", " a", "a\n", "-a", ".hidden", "_ok", "ok/..", "x" * 1025, "/".join(["a"] * 600), "a" * 256,
    "a/" + "b" * 255, "\ud800", "\udcff", "ok.ksf", "ok/ok=+~-.ksf",
)  # fmt: skip
"""Traversal, absolute and UNC paths, drive letters, schemes, look-alike dots, bad segments, overlong paths."""

_SEGMENTS = ("..", ".", "", "a", "ok", "_x", "%2e%2e", "\\", "x:y", "C:", " ", "\x00", "~", "-", "b" * 256)


@functools.cache
def hostile_numbers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(HOSTILE_NUMBERS),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
    )


@functools.cache
def hostile_strings() -> st.SearchStrategy[str]:
    surrogates = st.integers(0xD800, 0xDFFF).map(chr)
    long_text = st.tuples(st.text(min_size=1, max_size=3), st.integers(200, 3000)).map(lambda t: t[0] * t[1])
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=40),
        st.lists(st.one_of(st.characters(), surrogates, st.sampled_from("\x00\x1f\x7f/.\\:")), max_size=20).map(
            "".join
        ),
        long_text,
    )


@functools.cache
def hostile_paths() -> st.SearchStrategy[str]:
    built = st.lists(st.one_of(st.sampled_from(_SEGMENTS), st.text(max_size=6)), min_size=1, max_size=6).map("/".join)
    return st.one_of(st.sampled_from(HOSTILE_PATHS), built, st.sampled_from(("/", "")).flatmap(
        lambda lead: built.map(lambda p: lead + p)
    ))  # fmt: skip


@functools.cache
def json_values(*, nan: bool = False) -> st.SearchStrategy[Any]:
    """Arbitrary JSON values (with hostile numbers and strings among the leaves)."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        hostile_numbers(),
        st.floats(allow_nan=nan, allow_infinity=nan),
        hostile_strings(),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(st.text(max_size=12), hostile_strings()), children, max_size=4),
        ),
        max_leaves=12,
    )


# --- document mutations ---------------------------------------------------------------------------------

T = TypeVar("T")


def _pick(draw: st.DrawFn, items: Sequence[T]) -> T:
    """One of ``items`` (an index draw: cheaper than building a ``sampled_from`` for every draw)."""
    return items[draw(st.integers(0, len(items) - 1))]


def _nodes(node: Any, path: JsonPath = ()) -> list[tuple[JsonPath, Any]]:
    """Every node of a JSON document (the root first), with its path."""
    found: list[tuple[JsonPath, Any]] = [(path, node)]
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_nodes(value, (*path, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_nodes(value, (*path, i)))
    return found


def _field_names(doc: Any) -> list[str]:
    return sorted({p[-1] for p, _ in _nodes(doc) if p and isinstance(p[-1], str)})


def _set(doc: Any, path: JsonPath, value: Any) -> Any:
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def _delete(doc: Any, path: JsonPath) -> Any:
    if not path:
        return doc
    node = doc
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return doc


_BIG = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from(
    [0, 1, 2**31, 2**32, 2**53 + 1, 253402300800000, 2**62, 2**63 - 1, 32767, 32768]))  # fmt: skip

_OPS = (
    "delete", "replace", "retype", "number", "string", "path", "insert", "duplicate", "swap", "empty",
    "copy_from", "nudge",
)  # fmt: skip


def _ops_for(value: Any) -> tuple[str, ...]:
    """Mutations weighted by the node's type: numbers get hostile numbers, strings hostile strings, ..."""
    if isinstance(value, bool):
        return ("retype", "number", "number", "delete", "replace")
    if isinstance(value, int | float):
        return ("number", "number", "number", "nudge", "nudge", "retype", "string", "delete", "replace")
    if isinstance(value, str):
        return ("string", "string", "string", "path", "path", "retype", "number", "delete", "replace")
    if isinstance(value, dict):
        return ("insert", "insert", "delete", "empty", "retype", "copy_from", "replace")
    if isinstance(value, list):
        return ("insert", "duplicate", "swap", "empty", "delete", "retype", "copy_from", "replace")
    return _OPS


def _plausible_ops_for(value: Any) -> tuple[str, ...]:
    """Type-preserving mutations: most such documents still parse, and reach the code behind the parser."""
    if isinstance(value, bool):
        return ("flip",)
    if isinstance(value, int):
        return ("big", "nudge")
    if isinstance(value, str):
        return ("string", "path")
    if isinstance(value, list):
        return ("duplicate", "swap", "empty")
    return ("nothing",)


@st.composite
def mutated_document(
    draw: st.DrawFn, base: Any, max_mutations: int = 4, *, plausible: bool = False
) -> tuple[Any, list[str]]:
    """A deep copy of ``base`` with 1..``max_mutations`` mutations at any depth; returns it and a log.

    ``plausible`` keeps every value's type (one mutation): numbers stay integers, strings stay strings.
    """
    doc = copy.deepcopy(base)
    names = _field_names(base)
    log: list[str] = []
    for _ in range(1 if plausible else _pick(draw, (1, 1, 1, 2, 2, 3, max_mutations))):
        nodes = _nodes(doc)
        keyed = sorted({p[-1] for p, _ in nodes if p and isinstance(p[-1], str)})
        aim: bool = draw(st.booleans())
        if keyed and aim:
            # Aim at one field name first, so a rare field (a state's serializer) is hit as often as a
            # common one (an index); then at one of its occurrences.
            name = _pick(draw, keyed)
            path, value = _pick(draw, [(p, v) for p, v in nodes if p and p[-1] == name])
        else:
            path, value = _pick(draw, nodes)
        op = _pick(draw, _plausible_ops_for(value) if plausible else _ops_for(value))
        if op == "flip":
            doc = _set(doc, path, not value)
        elif op == "big":
            doc = _set(doc, path, draw(_BIG))
        elif op == "delete" and path:
            doc = _delete(doc, path)
        elif op == "replace":
            doc = _set(doc, path, draw(json_values(nan=True)))
        elif op == "retype":
            doc = _set(doc, path, _pick(draw, [None, True, False, 0, 1, 1.5, "x", "", [], {}, [value],
                                               {"value": value}, str(value)[:100]]))  # fmt: skip
        elif op == "number":
            doc = _set(doc, path, draw(hostile_numbers()))
        elif op == "string":
            doc = _set(doc, path, draw(hostile_strings()))
        elif op == "path":
            doc = _set(doc, path, draw(hostile_paths()))
        elif op == "insert" and isinstance(value, dict):
            key = _pick(draw, names) if draw(st.booleans()) else draw(st.text(max_size=8))
            value[key] = draw(json_values()) if draw(st.booleans()) else copy.deepcopy(_pick(draw, nodes)[1])
        elif op == "insert" and isinstance(value, list):
            position = draw(st.integers(0, len(value)))
            value.insert(position, draw(json_values()) if draw(st.booleans()) else copy.deepcopy(_pick(draw, nodes)[1]))
        elif op == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[draw(st.integers(0, len(value) - 1))]))
        elif op == "swap" and isinstance(value, list) and len(value) >= 2:
            i, j = draw(st.integers(0, len(value) - 1)), draw(st.integers(0, len(value) - 1))
            value[i], value[j] = value[j], value[i]
        elif op == "empty" and isinstance(value, dict | list):
            value.clear()
        elif op == "copy_from":
            _, other = _pick(draw, nodes)
            doc = _set(doc, path, copy.deepcopy(other))
        elif op == "nudge" and isinstance(value, int) and not isinstance(value, bool):
            doc = _set(doc, path, value + _pick(draw, [-1, 1, -8, 8, 2**32, -(2**63), 2**63]))
        else:
            continue
        log.append(f"{op} {path!r}")
    return doc, log


_STYLES = ("compact",) * 5 + ("ascii",) * 4 + ("indent", "surrogatepass", "bom", "latin1", "utf16")
"""Mostly legal encodings, so that the mutated content (not the encoding) is what gets judged."""


@st.composite
def encoded_document(draw: st.DrawFn, doc: Any) -> bytes:
    """A JSON document as bytes, in one of several legal and illegal encodings."""
    style = _pick(draw, _STYLES)
    try:
        if style == "compact":
            text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        elif style == "indent":
            text = json.dumps(doc, indent=draw(st.integers(0, 3)), ensure_ascii=False)
        else:
            text = json.dumps(doc, ensure_ascii=style == "ascii")
    except (ValueError, RecursionError):
        text = json.dumps(None)  # an int past Python's digit limit: not a document anyone could write
    if style == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    if style == "latin1":
        return text.encode("latin-1", "replace")
    if style == "utf16":
        return text.encode("utf-16", "surrogatepass")
    return text.encode("utf-8", "surrogatepass")


# --- byte mutations -------------------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
HUGE_U32 = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF, 64 << 20, (64 << 20) + 1, 67634176,
            67634177, 1 << 20)  # fmt: skip


_BYTE_OPS = ("flip", "set", "truncate", "insert", "delete", "duplicate", "u16", "u32", "u64", "append")


@st.composite
def mutated_bytes(
    draw: st.DrawFn, data: bytes, *, positions: Sequence[int] = (), max_ops: int = 4
) -> tuple[bytes, list[str]]:
    """``data`` with 1..``max_ops`` byte-level mutations; ``positions`` are field offsets worth aiming at
    (length fields, headers), in addition to random ones."""
    buf = bytearray(data)
    log: list[str] = []
    for _ in range(draw(st.integers(1, max_ops))):
        op = _pick(draw, _BYTE_OPS)
        n = len(buf)
        aimed = [p for p in positions if p < max(n, 1)]
        aim: bool = draw(st.booleans())
        pos = _pick(draw, aimed) if aimed and aim else draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, n)) :]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif op == "duplicate" and n:
            buf[pos:pos] = buf[pos : pos + draw(st.integers(1, 64))]
        elif op == "u16" and n >= 2:
            pos = min(pos, n - 2)
            buf[pos : pos + 2] = _U16.pack(_pick(draw, (0, 1, 3, 4, 5, 6, 7, 8, 0x7FFF, 0xFFFF)))
        elif op == "u32" and n >= 4:
            pos = min(pos, n - 4)
            buf[pos : pos + 4] = _U32.pack(
                _pick(draw, HUGE_U32) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
            )
        elif op == "u64" and n >= 8:
            pos = min(pos, n - 8)
            buf[pos : pos + 8] = _U64.pack(
                _pick(draw, (0, 2**63, 2**64 - 1)) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
            )
        elif op == "append":
            buf += draw(st.binary(min_size=1, max_size=32))
        else:
            continue
        log.append(f"{op}@{pos}")
    return bytes(buf), log
