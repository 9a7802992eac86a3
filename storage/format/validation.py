"""Field-by-field validation of untrusted JSON documents (``_metadata``, topology files).

Each helper takes the containing object, the field name and a ``where`` string (``"chk-12/_metadata:
operators[2].subtasks[0]"``) and either returns a value of the right type and range or raises the
given error class with a message naming the field, what was expected and what was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn, TypeVar

from keystate.storage.errors import MetadataError, UnsafePathError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_DOCUMENT_CONTAINERS",
    "check_document_limits",
    "check_keys",
    "decode_strict_json",
    "loads_strict",
    "opt_int",
    "req_bool",
    "req_int",
    "req_list",
    "req_obj",
    "req_str",
    "safe_relative_path",
]

E = TypeVar("E", bound=Exception)

MAX_DOCUMENT_BYTES = 16 << 20
"""Documents larger than this are refused before parsing (bounds memory on hostile input).

16 MiB holds the ``_metadata`` of about 30,000 subtasks with file-backed state (about 500 bytes each)
and 4 MiB of inline state (``StreamOptions.inline_budget``); a writer refuses to commit more. Set this
module attribute to read a larger document, e.g. one an older keystate wrote (the limit was 256 MiB).
"""
MAX_DOCUMENT_CONTAINERS = 1 << 20
"""Documents with more ``{`` and ``[`` bytes than this (an upper bound on their JSON objects and arrays)
are refused before parsing: an empty array costs the parser about 100 bytes for its 2 bytes of text, and
keystate's documents have one per 25 bytes or more (16 MiB of them, about 700,000)."""
MAX_INT = (1 << 63) - 1


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fail(error: type[Exception], where: str, field: str, expected: str, found: object) -> NoReturn:
    shown = repr(found) if not isinstance(found, dict | list) else _type_name(found)
    if isinstance(found, str) and len(shown) > 80:
        shown = shown[:77] + "...'"
    raise error(f"{where}: field '{field}' must be {expected}, found {shown}")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON ({name} is not a JSON number)")


def decode_strict_json(text: str) -> Any:
    """``json.loads`` refusing NaN / Infinity and duplicate keys (``ValueError``); the caller bounds the size
    first and maps the errors (``json.JSONDecodeError``, ``ValueError``, ``RecursionError``) to its own."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # rare: find the key for the message
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result


_LIMIT_HINT = "a larger limit can be set in keystate.storage.format.validation"


def check_document_limits(data: bytes, where: str, error: type[Exception] = MetadataError) -> None:
    """Refuse a document over ``MAX_DOCUMENT_BYTES`` or with more than ``MAX_DOCUMENT_CONTAINERS`` ``{``
    and ``[`` bytes: what :func:`loads_strict` refuses before parsing (writers check what they write).

    Raises:
        error: the document is over a limit.
    """
    if len(data) > MAX_DOCUMENT_BYTES:
        raise error(
            f"{where}: document is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit "
            f"(MAX_DOCUMENT_BYTES; {_LIMIT_HINT})"
        )
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_DOCUMENT_CONTAINERS:
        raise error(
            f"{where}: document has {containers} '{{' and '[' bytes, over the limit of {MAX_DOCUMENT_CONTAINERS} "
            f"JSON objects and arrays (MAX_DOCUMENT_CONTAINERS; {_LIMIT_HINT})"
        )


def loads_strict(data: bytes, where: str, error: type[Exception] = MetadataError) -> Any:
    """Parse JSON bytes strictly: UTF-8, no NaN/Infinity, no duplicate keys, bounded size and depth.

    The size (``MAX_DOCUMENT_BYTES``) and the number of objects and arrays (``MAX_DOCUMENT_CONTAINERS``)
    are checked before parsing, which bounds the parser's memory (docs/format.md section 4.2): the
    bytes are decoded once, and nothing else is copied.

    Raises:
        error: the bytes are too large, not UTF-8, not JSON, or nested too deeply.
    """
    check_document_limits(data, where, error)
    if not data or data.isspace():
        raise error(f"{where}: document is empty (truncated or never written)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start}); the file is corrupted or not JSON") from exc
    try:
        return decode_strict_json(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{where}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
            "the file is truncated or corrupted"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise error(f"{where}: not valid JSON ({exc})") from exc


def req_obj(obj: Mapping[str, Any], field: str, where: str, error: type[Exception] = MetadataError) -> dict[str, Any]:
    if field not in obj:
        raise error(f"{where}: required field '{field}' is missing")
    value = obj[field]
    if not isinstance(value, dict):
        _fail(error, where, field, "an object", value)
    return value


def req_list(obj: Mapping[str, Any], field: str, where: str, error: type[Exception] = MetadataError) -> list[Any]:
    if field not in obj:
        raise error(f"{where}: required field '{field}' is missing")
    value = obj[field]
    if not isinstance(value, list):
        _fail(error, where, field, "an array", value)
    return value


def req_str(
    obj: Mapping[str, Any],
    field: str,
    where: str,
    error: type[Exception] = MetadataError,
    *,
    pattern: re.Pattern[str] | None = None,
    choices: Iterable[str] | None = None,
    max_len: int = 4096,
    min_len: int = 0,
) -> str:
    if field not in obj:
        raise error(f"{where}: required field '{field}' is missing")
    value = obj[field]
    if not isinstance(value, str):
        _fail(error, where, field, "a string", value)
    if choices is not None:
        allowed = tuple(choices)
        if value not in allowed:
            _fail(error, where, field, "one of " + ", ".join(repr(c) for c in allowed), value)
    if len(value) > max_len:
        _fail(error, where, field, f"at most {max_len} characters", value)
    if len(value) < min_len:
        _fail(error, where, field, f"at least {min_len} character(s)", value)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            _fail(error, where, field, "text that is valid UTF-8 (no lone surrogate escapes)", value)
    if pattern is not None and not pattern.fullmatch(value):
        _fail(error, where, field, f"a string matching {pattern.pattern}", value)
    return value


def req_int(
    obj: Mapping[str, Any],
    field: str,
    where: str,
    error: type[Exception] = MetadataError,
    *,
    min_value: int = 0,
    max_value: int = MAX_INT,
) -> int:
    if field not in obj:
        raise error(f"{where}: required field '{field}' is missing")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(error, where, field, "an integer", value)
    if not min_value <= value <= max_value:
        _fail(error, where, field, f"an integer in {min_value}..{max_value}", value)
    return value


def opt_int(
    obj: Mapping[str, Any],
    field: str,
    where: str,
    error: type[Exception] = MetadataError,
    *,
    min_value: int = 0,
    max_value: int = MAX_INT,
) -> int | None:
    if field not in obj or obj[field] is None:
        return None
    return req_int(obj, field, where, error, min_value=min_value, max_value=max_value)


def req_bool(obj: Mapping[str, Any], field: str, where: str, error: type[Exception] = MetadataError) -> bool:
    if field not in obj:
        raise error(f"{where}: required field '{field}' is missing")
    value = obj[field]
    if not isinstance(value, bool):
        _fail(error, where, field, "true or false", value)
    return value


def check_keys(
    obj: Mapping[str, Any],
    where: str,
    required: Iterable[str],
    optional: Iterable[str] = (),
    error: type[Exception] = MetadataError,
) -> None:
    """Reject unknown fields (and report the first missing required one)."""
    allowed = set(required) | set(optional)
    for field in required:
        if field not in obj:
            raise error(f"{where}: required field '{field}' is missing")
    unknown = sorted(set(obj) - allowed, key=str)  # a dict built in Python may have non-str keys
    if unknown:
        raise error(
            f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))}); "
            "the file was written by a newer keystate or is corrupted"
        )


# One path segment as keystate writes them: starts with an alphanumeric or '_', then a safe set.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+~-]{0,254}")
MAX_PATH = 1024


def safe_relative_path(value: object, where: str, field: str = "path") -> str:
    """Check that a path from metadata stays inside its directory.

    The path must be relative, ``/``-separated, at most 1024 characters, and made of segments that
    start with a letter, digit or ``_`` and contain only ``A-Z a-z 0-9 . _ = + ~ -``; so ``..``,
    ``.``, absolute paths, backslashes, drive letters and control characters are all rejected.

    Raises:
        UnsafePathError: the path could leave the checkpoint's root or is malformed.
    """
    if not isinstance(value, str):
        _fail(UnsafePathError, where, field, "a relative path string", value)
    if not value or len(value) > MAX_PATH:
        _fail(UnsafePathError, where, field, f"a relative path of 1..{MAX_PATH} characters", value)
    if value.startswith("/") or "\\" in value or ":" in value.split("/", 1)[0]:
        raise UnsafePathError(f"{where}: field '{field}' is an absolute path {value!r}; paths must be relative")
    for segment in value.split("/"):
        if segment in ("..", "."):
            raise UnsafePathError(f"{where}: field '{field}' path {value!r} leaves its directory ('{segment}' segment)")
        if not _SEGMENT.fullmatch(segment):
            raise UnsafePathError(f"{where}: field '{field}' path {value!r} has an invalid segment {segment!r}")
    return value
