"""The errors of the Flink ``_metadata`` reader, each a :class:`~keystate.storage.errors.MetadataError`.

Every message says where (the file, then the operator / subtask / field path and the byte offset), what
was expected and what was found, and what to do. ``offset`` holds the byte offset for programs.
"""

from __future__ import annotations

from keystate.storage.errors import MetadataError, UnsupportedMetadataVersionError

__all__ = [
    "SUPPORTED_FLINK_METADATA_VERSIONS",
    "FlinkMetadataError",
    "NotFlinkMetadataError",
    "TruncatedFlinkMetadataError",
    "UnsupportedFlinkHandleError",
    "UnsupportedFlinkMetadataVersionError",
]

SUPPORTED_FLINK_METADATA_VERSIONS = (3, 4, 5, 6)
"""Format versions written by Flink 1.11-1.15 (3), 1.16-1.20 (4), 2.0 (5) and 2.1-2.3 (6)."""


class FlinkMetadataError(MetadataError):
    """A Flink ``_metadata`` file breaks the format: a count, length, type byte or value is invalid."""

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        """Byte offset in the file of the field at fault, or None when the fault is not at one place."""


class TruncatedFlinkMetadataError(FlinkMetadataError):
    """The file ends before the structure that its own counts and lengths announce is complete."""


class NotFlinkMetadataError(FlinkMetadataError):
    """The bytes do not begin with Flink's ``_metadata`` magic number (an empty file, keystate JSON, ...)."""


class UnsupportedFlinkHandleError(FlinkMetadataError):
    """A state handle's type byte is none of the 18 (0-17) that Flink 1.15-2.3 write."""

    def __init__(self, message: str, *, offset: int, type_byte: int) -> None:
        super().__init__(message, offset=offset)
        self.type_byte = type_byte


class UnsupportedFlinkMetadataVersionError(UnsupportedMetadataVersionError, FlinkMetadataError):
    """Flink's magic number is there, but the format version is not one this reader parses (3-6)."""

    def __init__(self, found: int, where: str) -> None:
        super().__init__("Flink _metadata", found, SUPPORTED_FLINK_METADATA_VERSIONS, where)
        self.offset = 4
        if found > SUPPORTED_FLINK_METADATA_VERSIONS[-1]:
            advice = (
                "it was written by a Flink newer than 2.3 (version 7 exists only in Flink's development branch); "
                "take a savepoint with Flink 2.3 or earlier, or upgrade keystate"
            )
        else:
            advice = (
                "versions 1 and 2 come from Flink 1.10 and earlier; restore it with Flink 1.11-1.15 and take a new "
                "savepoint, which is written in version 3 or later"
            )
        self.args = (
            f"{where}: Flink _metadata format version {found} (at byte 4) is not supported; this keystate reads "
            f"versions {', '.join(map(str, SUPPORTED_FLINK_METADATA_VERSIONS))} (Flink 1.11-2.3): {advice}",
        )
