"""``_metadata`` versions: :func:`parse_metadata` pops ``format_version`` and dispatches to that version's
parser; :func:`dump_metadata` writes the newest version.

A new format version adds a module (``_metadata_v2.py``: version 1 plus fields, through ``CodecV1``'s hooks)
and an entry in ``_PARSERS``; an existing version's parser never accepts a newer one's fields, and
``dump_metadata`` always writes the newest.
Imports point one way: this module imports the version modules, which import the model
(``keystate.storage.format.metadata``); the model imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keystate.storage.errors import MetadataError, UnsupportedMetadataVersionError
from keystate.storage.format._metadata_v1 import parse_v1
from keystate.storage.format._metadata_v2 import dump_v2, parse_v2
from keystate.storage.format.metadata import CheckpointMetadata
from keystate.storage.format.validation import loads_strict

__all__ = ["SUPPORTED_VERSIONS", "dump_metadata", "parse_metadata"]

_PARSERS: dict[int, Callable[[dict[str, Any], str], CheckpointMetadata]] = {1: parse_v1, 2: parse_v2}
SUPPORTED_VERSIONS = tuple(sorted(_PARSERS))


def parse_metadata(data: bytes, where: str) -> CheckpointMetadata:
    """Parse ``_metadata`` bytes of any supported version.

    Args:
        data: the bytes of a ``_metadata`` file.
        where: the file's name or URI, for error messages.

    Raises:
        MetadataError: truncated, not JSON, not an object, a missing/invalid field, or an inconsistency.
        UnsupportedMetadataVersionError: unknown or newer ``format_version``.
        UnsafePathError: a handle path is absolute or leaves its directory.
    """
    doc = loads_strict(data, where)
    if not isinstance(doc, dict):
        raise MetadataError(f"{where}: checkpoint metadata must be a JSON object, found {type(doc).__name__}")
    if "format_version" not in doc:
        raise MetadataError(f"{where}: required field 'format_version' is missing; this is not keystate metadata")
    version = doc.pop("format_version")
    parser = _PARSERS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if parser is None:
        raise UnsupportedMetadataVersionError("checkpoint metadata", version, SUPPORTED_VERSIONS, where)
    return parser(doc, where)


def dump_metadata(metadata: CheckpointMetadata) -> bytes:
    """Serialize in the newest format version (2): compact, deterministic UTF-8 JSON and a newline.

    Raises:
        MetadataError: the metadata cannot be written as version 2 (a shared handle without ``written_by``,
            a savepoint with a shared handle).
    """
    return dump_v2(metadata)
