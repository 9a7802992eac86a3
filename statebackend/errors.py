"""State-backend errors: part of the keystate tree rooted at ``keystate.storage.errors.KeystateError``."""

from __future__ import annotations

from keystate.storage.errors import FormatError, KeystateError

__all__ = [
    "KeyGroupOutOfRangeError",
    "LmdbAccessDeniedError",
    "LmdbDirectoryInUseError",
    "LmdbDiskFullError",
    "LmdbError",
    "LmdbMapFullError",
    "LmdbReadersFullError",
    "MaxParallelismMismatchError",
    "SerializationError",
    "StateError",
    "StateMigrationError",
    "StateRestoreError",
    "StateSnapshotError",
]


class StateError(KeystateError):
    """A state operation was used wrongly (no current key, unknown state, wrong kind, closed backend)."""


class KeyGroupOutOfRangeError(StateError):
    """A key hashes to a key group this backend does not own (the key was routed to the wrong subtask)."""


class SerializationError(StateError):
    """A serializer could not encode a value or decode stored bytes."""


class StateMigrationError(StateError):
    """Restored state was written with a different state kind or serializer than the descriptor now declares."""


class StateRestoreError(FormatError):
    """A snapshot could not be restored: corrupted or truncated data, or handles that do not fit.

    The message names the operator, the state, the key group and the file where known.
    """


class StateSnapshotError(StateError):
    """Taking a snapshot failed (writing to checkpoint storage or reading the local store)."""


class MaxParallelismMismatchError(StateMigrationError):
    """A keyed snapshot written under one max parallelism was restored into a backend with another.

    Key groups are numbered modulo the max parallelism, so the same number holds other keys under another
    one and no entry check could notice: restoring would lose keys silently. The snapshot's bytes are
    fine (so this is no :class:`StateRestoreError`, a format error): the restoring job does not fit them.
    """


class LmdbError(StateError):
    """The LMDB environment of a keyed backend failed; the message names its directory and what to do."""


class LmdbMapFullError(LmdbError):
    """The LMDB map is full and cannot grow: raise ``map_size``."""


class LmdbDiskFullError(LmdbError):
    """The file system under an LMDB directory is full (no space left, or the disk quota is used up)."""


class LmdbReadersFullError(LmdbError):
    """Every reader slot of an LMDB environment is taken: too many snapshots are open at once."""


class LmdbAccessDeniedError(LmdbError, PermissionError):
    """An LMDB directory or its files cannot be created or written (permission denied, read-only file system)."""


class LmdbDirectoryInUseError(LmdbError):
    """Another backend, in this process or another, holds the lock of the LMDB directory.

    Attributes ``path``, ``pid``, ``host`` and ``owner`` name the directory and its holder as its lock file
    records them (``None`` where the record cannot be read).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        pid: int | None = None,
        host: str | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.host = host
        self.owner = owner
