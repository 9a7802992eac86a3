"""The streaming writer of the local object store (:meth:`LocalObjectStore.open_writer`): bytes go to a temp
file in the target directory, which :meth:`_LocalWriter.close` fsyncs and links into place through the
store (``_publish_from`` checks the directory it kept open against a fresh walk from the root first);
a failed or aborted write removes its temp file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO

from keystate.storage.base import ObjectWriter, PutMode
from keystate.storage.errors import StorageError

if TYPE_CHECKING:
    from keystate.storage._local import LocalObjectStore

__all__: list[str] = []  # _LocalWriter is created by LocalObjectStore.open_writer only


class _LocalWriter(ObjectWriter):
    """A streaming write into a temp file, linked into place by :meth:`close`.

    It keeps the descriptor of its directory (where the temp file lives) until it is closed or aborted;
    see ``LocalObjectStore._publish_from``. One lock orders write, close and abort, which may come from
    different threads (a coordinator aborting a checkpoint while a stream is closed).
    """

    def __init__(
        self,
        store: LocalObjectStore,
        key: str,
        parts: Sequence[str],
        parent: int,
        name: str,
        tmp: str,
        f: BinaryIO,
        mode: PutMode,
    ) -> None:
        self._store = store
        self._key = key
        self._parts = parts
        self._parent: int | None = parent
        self._name = name
        self._tmp = tmp
        self._f: BinaryIO | None = f
        self._mode = mode
        self._written = 0
        self._completed = False
        self._lock = threading.Lock()

    @property
    def bytes_written(self) -> int:
        return self._written

    def flush(self) -> None:
        """Hand the bytes buffered in this process to the OS (not durable: no fsync)."""
        if self._f is not None:
            self._f.flush()

    def write(self, data: bytes | memoryview) -> None:
        with self._lock:
            f = self._f
            if f is None:
                raise StorageError(f"write to {self._store.describe(self._key)} after close or abort")
            try:
                f.write(data)
            except OSError as exc:
                self._abort()
                self._store._fail(exc, "write", self._key)
            self._written += len(data)

    def close(self) -> None:
        with self._lock:
            f, parent = self._f, self._parent
            if f is None or parent is None:
                if self._completed:
                    return
                raise StorageError(
                    f"{self._store.describe(self._key)}: the write was aborted or failed; nothing is visible"
                )
            self._f = self._parent = None
            store = self._store
            try:
                try:
                    try:
                        f.flush()
                        if store._fsync:
                            os.fsync(f.fileno())
                    finally:
                        f.close()
                    store._publish_from(parent, self._parts, self._tmp, self._name, self._mode, self._key)
                except BaseException:
                    store._discard_temp(parent, self._tmp, self._key)
                    raise
                finally:
                    os.close(parent)
            except OSError as exc:
                store._fail(exc, "write", self._key)
            self._completed = True

    def abort(self) -> None:
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        f, parent = self._f, self._parent
        self._f = self._parent = None
        if f is not None:
            # Closing flushes what is still buffered, bytes that are being discarded: a failure to write
            # them (ENOSPC, say) is not an error of the abort.
            with contextlib.suppress(OSError):
                f.close()
        if parent is not None:
            try:
                self._store._discard_temp(parent, self._tmp, self._key)
            finally:
                os.close(parent)

    def __del__(self) -> None:
        # A writer dropped without close or abort must not keep its directory open.
        parent = getattr(self, "_parent", None)
        if parent is not None:
            with contextlib.suppress(OSError):
                os.close(parent)
