"""``_metadata`` versions: pop ``format_version`` and dispatch to that version's parser.

A new format version adds a module (``_metadata_v2.py``) and an entry in ``_PARSERS``; the existing
version's parser is never edited to accept the new one, and ``dump`` always writes the newest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keystate.storage._metadata_v1 import dump_v1, parse_v1
from keystate.storage.errors import MetadataError, UnsupportedMetadataVersionError
from keystate.storage.metadata import CheckpointMetadata
from keystate.storage.validation import loads_strict

__all__ = ["SUPPORTED_VERSIONS", "dump_metadata", "load_metadata"]

_PARSERS: dict[int, Callable[[dict[str, Any], str], CheckpointMetadata]] = {1: parse_v1}
SUPPORTED_VERSIONS = tuple(sorted(_PARSERS))


def load_metadata(data: bytes, where: str) -> CheckpointMetadata:
    """Parse ``_metadata`` bytes of any supported version.

    Raises:
        MetadataError: not JSON, not an object, or an invalid field.
        UnsupportedMetadataVersionError: unknown or newer ``format_version``.
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
    """Serialize in the newest format version."""
    return dump_v1(metadata)
