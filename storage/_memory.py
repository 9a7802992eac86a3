"""Object store in process memory: for tests and for embedding without a filesystem.

It follows the same contract as the local and S3 stores (and passes the same contract tests): objects
appear atomically when complete, ``CREATE`` is atomic under a lock, and missing objects raise
``NotFoundError``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode, validate_key
from keystate.storage.errors import AlreadyExistsError, NotFoundError, StorageError

__all__ = ["MemoryObjectStore"]


class MemoryObjectStore(ObjectStore):
    """Objects in a dict guarded by a lock. ``name`` only appears in messages (``memory://name/key``)."""

    def __init__(self, name: str = "default") -> None:
        self._name = name
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryObjectStore({self._name!r})"

    def describe(self, key: str = "") -> str:
        return f"memory://{self._name}/{key}"

    def _obj(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise NotFoundError(f"{self.describe(key)}: no such object") from None

    def get(self, key: str) -> bytes:
        return self._obj(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._obj(key)[start : start + length]

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        return io.BytesIO(self._obj(key)[start:])

    def size(self, key: str) -> int:
        return len(self._obj(key))

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        validate_key(key)
        with self._lock:
            if mode is PutMode.CREATE and key in self._objects:
                raise AlreadyExistsError(f"{self.describe(key)} already exists; a create-only write never replaces it")
            self._objects[key] = bytes(data)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        validate_key(key)
        return _MemoryWriter(self, key, mode)

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        base = f"{validate_key(prefix)}/" if prefix else ""
        with self._lock:
            items = sorted((k, len(v)) for k, v in self._objects.items() if k.startswith(base))
        for key, size in items:
            yield ObjectInfo(key=key, size=size)

    def list_dirs(self, prefix: str) -> list[str]:
        base = f"{validate_key(prefix)}/" if prefix else ""
        with self._lock:
            names = {
                k[len(base) :].split("/", 1)[0] for k in self._objects if k.startswith(base) and "/" in k[len(base) :]
            }
        return sorted(names)


class _MemoryWriter(ObjectWriter):
    def __init__(self, store: MemoryObjectStore, key: str, mode: PutMode) -> None:
        self._store = store
        self._key = key
        self._mode = mode
        self._buf: io.BytesIO | None = io.BytesIO()
        self._completed = False
        self._written = 0

    @property
    def bytes_written(self) -> int:
        return self._written

    def write(self, data: bytes | memoryview) -> None:
        if self._buf is None:
            raise StorageError(f"write to {self._store.describe(self._key)} after close or abort")
        self._buf.write(data)
        self._written += len(data)

    def close(self) -> None:
        if self._buf is None:
            if self._completed:
                return
            raise StorageError(
                f"{self._store.describe(self._key)}: the write was aborted or failed; nothing is visible"
            )
        data = self._buf.getvalue()
        self._buf = None
        self._store.put(self._key, data, self._mode)
        self._completed = True

    def abort(self) -> None:
        self._buf = None
