"""Object store on the local filesystem.

Atomic writes follow zarr's local store and Flink's ``FsCheckpointMetadataOutputStream``: bytes go to
a temp file in the target directory, are fsynced, and are then moved into place. ``PutMode.CREATE``
uses ``os.link``, which fails if the target exists (``os.rename`` would replace it silently), so two
writers can never both create the same key. The directory is fsynced afterwards so the new name is
durable too. Temp files start with ``.tmp-`` and are never listed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode, validate_key
from keystate.storage.errors import AlreadyExistsError, NotFoundError, StorageAccessDeniedError, StorageError

__all__ = ["LocalObjectStore"]

TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalObjectStore(ObjectStore):
    """Objects as files under a root directory.

    Args:
        root: the directory keys are relative to; created on first write.
        fsync: fsync files and directories on every completed write. Turning it off is only for
            tests and benchmarks that measure the cost of durability.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = Path(os.path.abspath(root))
        self._fsync = fsync

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self._root)!r})"

    def describe(self, key: str = "") -> str:
        return str(self._root / key) if key else str(self._root)

    def _path(self, key: str) -> Path:
        return self._root / validate_key(key)

    def _fail(self, exc: OSError, action: str, key: str) -> NoReturn:
        where = self.describe(key)
        if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
            raise NotFoundError(f"cannot {action} {where}: no such object") from exc
        if isinstance(exc, PermissionError):
            raise StorageAccessDeniedError(
                f"cannot {action} {where}: permission denied; check the directory's owner and mode"
            ) from exc
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"cannot {action} {where}: no space left on device; free disk space") from exc
        raise StorageError(f"cannot {action} {where}: {exc.strerror or exc}") from exc

    # --- reads ---------------------------------------------------------------------------------------

    def _open_regular(self, key: str) -> BinaryIO:
        """Open an object for reading: a regular file, not followed through a final symlink.

        A FIFO or device in its place would block or stream forever, and a symlink could point
        outside the checkpoint; neither is an object keystate wrote, so both are refused.
        """
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StorageError(
                    f"cannot read {self.describe(key)}: it is a symbolic link; keystate does not follow links "
                    "inside checkpoint storage"
                ) from exc
            self._fail(exc, "read", key)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        if not regular:
            os.close(fd)
            raise NotFoundError(f"cannot read {self.describe(key)}: not a regular file")
        return os.fdopen(fd, "rb")

    def get(self, key: str) -> bytes:
        try:
            with self._open_regular(key) as f:
                return f.read()
        except OSError as exc:
            self._fail(exc, "read", key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._open_regular(key) as f:
                # Never ask read() for more than the file holds: it allocates the requested size up front.
                available = os.fstat(f.fileno()).st_size - start
                f.seek(start)
                return f.read(max(0, min(length, available)))
        except OSError as exc:
            self._fail(exc, "read", key)

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        f = self._open_regular(key)
        try:
            f.seek(start)
        except OSError as exc:
            f.close()
            self._fail(exc, "read", key)
        return f

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.lstat()
        except OSError as exc:
            self._fail(exc, "stat", key)
        if stat.S_ISDIR(st.st_mode):
            raise NotFoundError(f"{self.describe(key)} is a directory, not an object")
        if not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise StorageError(
                f"{self.describe(key)} is {kind}; keystate only reads regular files it wrote (links are not followed)"
            )
        return st.st_size

    # --- writes --------------------------------------------------------------------------------------

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents, fsyncing each new entry's parent."""
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            if self._fsync:
                _fsync_dir(d.parent)

    def _write_temp(self, path: Path, write: Callable[[BinaryIO], object]) -> Path:
        self._makedirs(path.parent)
        tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}"
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            if self._fsync:
                os.fsync(f.fileno())
        return tmp

    def _publish(self, tmp: Path, path: Path, mode: PutMode, key: str) -> None:
        exists = False
        try:
            if mode is PutMode.CREATE:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    exists = True
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._fail(exc, "write", key)
        if exists:
            raise AlreadyExistsError(f"{self.describe(key)} already exists; a create-only write never replaces it")
        if self._fsync:
            _fsync_dir(path.parent)

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        path = self._path(key)
        if mode is PutMode.CREATE and path.exists():
            raise AlreadyExistsError(f"{self.describe(key)} already exists; a create-only write never replaces it")
        try:
            tmp = self._write_temp(path, lambda f: f.write(data))
        except OSError as exc:
            self._fail(exc, "write", key)
        self._publish(tmp, path, mode, key)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        path = self._path(key)
        try:
            self._makedirs(path.parent)
            tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}"
            f = open(tmp, "xb")  # noqa: SIM115 - owned by the writer
        except OSError as exc:
            self._fail(exc, "write", key)
        return _LocalWriter(self, key, path, tmp, f, mode)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._fail(exc, "delete", key)

    def remove_empty_dirs(self, prefix: str) -> None:
        """Remove ``prefix`` and its sub-directories that are empty, bottom up, never a file.

        ``os.rmdir`` refuses a non-empty directory atomically, so a file another writer creates
        meanwhile is never lost (its directory simply stays).
        """
        top = self._path(prefix) if prefix else self._root
        if not top.is_dir():
            return
        for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: len(entry[0]), reverse=True):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                self._fail(exc, "delete", prefix)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            return
        except OSError as exc:
            self._fail(exc, "delete", prefix)

    # --- listing -------------------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self._root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self._root).as_posix()
            for name in sorted(filenames):
                if name.startswith(TEMP_PREFIX):
                    continue
                full = Path(dirpath) / name
                try:
                    size = full.stat().st_size
                except FileNotFoundError:
                    continue  # deleted while listing
                yield ObjectInfo(key=name if rel == "." else f"{rel}/{name}", size=size)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self._root
        try:
            with os.scandir(base) as it:
                return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            self._fail(exc, "list", prefix)


class _LocalWriter(ObjectWriter):
    def __init__(self, store: LocalObjectStore, key: str, path: Path, tmp: Path, f: BinaryIO, mode: PutMode):
        self._store = store
        self._key = key
        self._path = path
        self._tmp = tmp
        self._f: BinaryIO | None = f
        self._mode = mode
        self._written = 0
        self._completed = False

    @property
    def bytes_written(self) -> int:
        return self._written

    def flush(self) -> None:
        """Hand the bytes buffered in this process to the OS (not durable: no fsync)."""
        if self._f is not None:
            self._f.flush()

    def write(self, data: bytes | memoryview) -> None:
        if self._f is None:
            raise StorageError(f"write to {self._store.describe(self._key)} after close or abort")
        try:
            self._f.write(data)
        except OSError as exc:
            self.abort()
            self._store._fail(exc, "write", self._key)
        self._written += len(data)

    def close(self) -> None:
        f = self._f
        if f is None:
            if self._completed:
                return
            raise StorageError(
                f"{self._store.describe(self._key)}: the write was aborted or failed; nothing is visible"
            )
        self._f = None
        try:
            f.flush()
            if self._store._fsync:
                os.fsync(f.fileno())
            f.close()
        except OSError as exc:
            f.close()
            self._tmp.unlink(missing_ok=True)
            self._store._fail(exc, "write", self._key)
        self._store._publish(self._tmp, self._path, self._mode, self._key)
        self._completed = True

    def abort(self) -> None:
        f = self._f
        self._f = None
        if f is not None:
            f.close()
        self._tmp.unlink(missing_ok=True)
