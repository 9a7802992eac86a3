"""The byte-level storage contract every checkpoint store implements.

An :class:`ObjectStore` holds immutable objects under ``/``-separated keys relative to its root (a
local directory, an S3 bucket and prefix, or memory). The contract is deliberately narrow:

* ``put`` and ``open_writer`` take an explicit :class:`PutMode`; ``PutMode.CREATE`` raises
  :class:`~keystate.storage.errors.AlreadyExistsError` if the object exists, and is atomic: two concurrent
  creates of one key never both succeed.
* An object becomes visible only when it is complete (a local temp file linked into place, an S3
  put or a completed multipart upload); a reader never sees half an object.
* Every backend reports a missing object as :class:`~keystate.storage.errors.NotFoundError` and nothing else;
  ``delete`` of a missing object is a no-op.

Checkpoint layout, metadata and state files are built on top of this in ``keystate.storage.checkpoints``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Protocol

from keystate.storage.errors import InvalidURIError, NotFoundError

__all__ = ["ObjectInfo", "ObjectReader", "ObjectStore", "ObjectWriter", "PutMode", "join_key", "validate_key"]


class PutMode(Enum):
    """How a write treats an existing object with the same key."""

    CREATE = "create"
    """Fail with ``AlreadyExistsError`` if the key exists (local: ``os.link``; S3: ``IfNoneMatch="*"``)."""
    OVERWRITE = "overwrite"
    """Replace any existing object atomically."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its key relative to the store root and its size in bytes."""

    key: str
    size: int


class ObjectReader(Protocol):
    """A readable byte stream over (a range of) one object."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ObjectWriter(ABC):
    """A streaming write of one new object; visible only after :meth:`close` returns."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the object being written."""

    @abstractmethod
    def close(self) -> None:
        """Complete the object: durable and visible when this returns. Closing again does nothing.

        Raises:
            AlreadyExistsError: the writer was opened with ``PutMode.CREATE`` and the key now exists.
            StorageError: the object could not be completed, or the writer was aborted (possibly by
                another thread while it was being written); nothing is visible.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; the object never becomes visible. Safe to call twice."""

    @property
    @abstractmethod
    def bytes_written(self) -> int:
        """Bytes accepted by :meth:`write` so far."""

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# One key segment: no empty, "." or ".." segments, no control characters, no backslashes.
_BAD_SEGMENT = re.compile(r"[\x00-\x1f\x7f\\]")


def validate_key(key: str) -> str:
    """Check that ``key`` is a relative ``/``-separated key that stays under the store root.

    Returns:
        The key unchanged.

    Raises:
        InvalidURIError: the key is absolute, has empty/``.``/``..`` segments or control characters.
    """
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidURIError(f"object key {key!r} must be a non-empty relative key without a trailing '/'")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or _BAD_SEGMENT.search(segment):
            raise InvalidURIError(
                f"object key {key!r} has an invalid segment {segment!r}; keys may not contain empty, "
                "'.' or '..' segments, backslashes or control characters"
            )
    return key


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, skipping empty parts (the store root is the empty prefix)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class ObjectStore(ABC):
    """Immutable objects under keys relative to a root; see the module docstring for the contract."""

    retries_transient_errors: bool = False
    """Whether the store already retries throttling, 5xx and connection errors itself (S3: botocore's
    retry mode). Callers wrap stores that do not in :class:`keystate.storage.retry.RetryingObjectStore`."""

    @abstractmethod
    def describe(self, key: str = "") -> str:
        """A human-readable location for ``key`` (an absolute path or a full URI), used in messages."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read a whole object.

        Raises:
            NotFoundError: no object has this key.
        """

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from ``start``; fewer only if the object ends first.

        Raises:
            NotFoundError: no object has this key.
        """

    @abstractmethod
    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        """Open a stream that reads the object from ``start`` to its end, with bounded memory.

        Raises:
            NotFoundError: no object has this key.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes.

        Raises:
            NotFoundError: no object has this key.
        """

    def exists(self, key: str) -> bool:
        """Whether an object with this key exists."""
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    @abstractmethod
    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        """Write a whole object atomically.

        Raises:
            AlreadyExistsError: ``mode`` is ``CREATE`` and the key exists.
        """

    @abstractmethod
    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        """Start a streaming write of a new object (multipart on S3)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object does nothing."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several objects; missing ones are skipped."""
        for key in keys:
            self.delete(key)

    @abstractmethod
    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every complete object whose key lies under the directory ``prefix`` (recursively)."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-directories of ``prefix`` (common prefixes on S3), sorted."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under the directory ``prefix``; a missing prefix does nothing."""
        self.delete_many([info.key for info in self.list_objects(prefix)])

    def remove_empty_dirs(self, prefix: str) -> None:  # noqa: B027 - a hook: nothing to do without directories
        """Remove ``prefix`` and the directories below it that hold no object, never an object.

        Only stores with real directories (local disk) have anything to do; on S3 and in memory a
        "directory" exists only while an object lies under it, so the default does nothing.
        """
