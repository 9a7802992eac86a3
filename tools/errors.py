"""Tool errors: part of the keystate tree; the CLI maps every ``KeystateError`` to exit code 2."""

from __future__ import annotations

from keystate.storage.errors import KeystateError

__all__ = ["UsageError"]


class UsageError(KeystateError, ValueError):
    """The command was used wrongly (unknown operator uid, bad option value, unimportable job)."""
