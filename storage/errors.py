"""The keystate exception tree.

Every error keystate raises on purpose derives from :class:`KeystateError`. Each class means exactly one
thing; builtins are mixed in where the meaning matches, so ``except FileNotFoundError`` still works for
a missing checkpoint. The root lives in ``storage`` because it is the lowest layer; ``statebackend``,
``runtime`` and ``tools`` extend the tree from here.

Messages say what happened, where, what was expected and what was found, and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keystate.storage.format.metadata import StreamHandle

__all__ = [
    "AlreadyExistsError",
    "BucketNotFoundError",
    "CheckpointDiscardedError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CommitConflictError",
    "CommitFailedError",
    "CommitOutcomeUnknownError",
    "CredentialsError",
    "FormatError",
    "InvalidURIError",
    "KeystateError",
    "MetadataError",
    "MissingStateFilesError",
    "NotFoundError",
    "RequestOutcomeUnknownError",
    "StateFileError",
    "StorageAccessDeniedError",
    "StorageError",
    "StorageUnavailableError",
    "TopologyError",
    "UnsafeLinkError",
    "UnsafePathError",
    "UnsupportedFormatVersionError",
    "UnsupportedMetadataVersionError",
    "UnsupportedStateFileVersionError",
]


class KeystateError(Exception):
    """Root of every error keystate raises on purpose."""


# --- storage ------------------------------------------------------------------------------------------


class StorageError(KeystateError):
    """An operation on checkpoint storage (local disk, S3, memory) failed."""


class NotFoundError(StorageError, FileNotFoundError):
    """An object (file, S3 key) that was expected to exist does not.

    Every storage backend reports a missing object with this class and nothing else.
    """


class CheckpointNotFoundError(NotFoundError):
    """No completed checkpoint or savepoint exists at the given location or id."""


class AlreadyExistsError(StorageError, FileExistsError):
    """A create-only write found the object already present."""


class StorageAccessDeniedError(StorageError, PermissionError):
    """The storage refused the operation (missing permission, access denied)."""


class UnsafeLinkError(StorageError):
    """A symbolic link lies on the path of an object or directory in local checkpoint storage.

    Below its root (resolved once, when the store is opened) the local store follows no link at all, not
    even one that points back inside: a link could lead reads, listings or deletes outside the root.
    """


class BucketNotFoundError(NotFoundError):
    """The S3 bucket named in the location does not exist."""


class CredentialsError(StorageError):
    """No usable credentials were found for the storage (e.g. no AWS credentials configured)."""


class StorageUnavailableError(StorageError, ConnectionError):
    """The storage could not be reached (endpoint unreachable, retries exhausted on throttling or 5xx)."""


class RequestOutcomeUnknownError(StorageUnavailableError):
    """A request was sent but no answer came back (read timeout, connection dropped): it may or may
    not have been applied."""


class CommitFailedError(StorageError):
    """A checkpoint commit definitely did not happen; the checkpoint is not complete."""


class CommitConflictError(CommitFailedError, AlreadyExistsError):
    """Another writer already committed a checkpoint with the same id (the create-only write lost)."""


class MissingStateFilesError(CommitFailedError):
    """The metadata to commit references state files that may not exist: exclusive ones the committing
    writer neither wrote nor adopted (``CheckpointWriter.adopt``), or shared ones not in the store with the
    size their handle records (an orphan removal of another run deleted them); nothing was written.

    Attributes:
        missing: ``(operator uid, subtask index, handle)`` of each such reference, in metadata order.
    """

    def __init__(self, message: str, missing: tuple[tuple[str, int, StreamHandle], ...]) -> None:
        super().__init__(message)
        self.missing = missing


class CommitOutcomeUnknownError(StorageError):
    """A commit may or may not have happened (e.g. the connection dropped after the PUT was sent).

    Load the checkpoint to find out; never assume either outcome.
    """


class CheckpointDiscardedError(CheckpointNotFoundError):
    """A completed checkpoint was deleted while it was being read: its ``_metadata`` no longer exists
    (retention subsumed it after a newer one completed, or someone discarded it). Not damage: read the
    newer checkpoint instead.

    Attributes:
        checkpoint_id: the checkpoint that was discarded (``None``: a savepoint whose id was not read yet).
        location: where it was.
        latest_id: the newest completed checkpoint of the same job left, if any.
        latest_location: where that one is.
    """

    def __init__(
        self,
        message: str,
        *,
        checkpoint_id: int | None,
        location: str,
        latest_id: int | None = None,
        latest_location: str | None = None,
    ) -> None:
        super().__init__(message)
        self.checkpoint_id = checkpoint_id
        self.location = location
        self.latest_id = latest_id
        self.latest_location = latest_location


# --- formats -----------------------------------------------------------------------------------------


class FormatError(KeystateError, ValueError):
    """Bytes read from storage do not follow the documented format (see docs/format.md)."""


class MetadataError(FormatError):
    """A ``_metadata`` file, or the JSON form of a state handle or subtask state shipped between processes
    (``keystate.storage.format.transfer``), is truncated, not JSON, or has a field that is missing or invalid."""


class StateFileError(FormatError):
    """A state file is truncated, corrupted, or does not follow the state-file format."""


class ChecksumMismatchError(StateFileError):
    """Stored bytes do not match the checksum recorded for them."""


class UnsupportedFormatVersionError(FormatError):
    """A format version is unknown or newer than this keystate supports (metadata, state file, topology)."""

    def __init__(self, what: str, found: object, supported: tuple[int, ...], where: str) -> None:
        self.found = found
        self.supported = supported
        self.where = where
        versions = ", ".join(str(v) for v in supported)
        super().__init__(
            f"{where}: {what} format_version {found!r} is not supported (this keystate reads {versions}); "
            "upgrade keystate to read it"
        )


class UnsupportedMetadataVersionError(UnsupportedFormatVersionError, MetadataError):
    """``_metadata`` has a ``format_version`` this keystate does not read."""


class UnsupportedStateFileVersionError(UnsupportedFormatVersionError, StateFileError):
    """A state file's header has a version this keystate does not read."""


class TopologyError(FormatError):
    """A job topology (a topology file or a job graph) is malformed: bad field, unknown input, cycle."""


class UnsafePathError(MetadataError):
    """A path in metadata is absolute or would leave the checkpoint's root directory."""


class InvalidURIError(KeystateError, ValueError):
    """A storage location string is not a path, ``file://`` URI or ``s3://bucket/prefix`` URI."""
