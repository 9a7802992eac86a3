"""State-backend errors: part of the keystate tree rooted at ``keystate.storage.errors.KeystateError``."""

from __future__ import annotations

from keystate.storage.errors import FormatError, KeystateError

__all__ = [
    "KeyGroupOutOfRangeError",
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
