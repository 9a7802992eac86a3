"""Object store on the local filesystem.

Atomic writes follow zarr's local store and Flink's ``FsCheckpointMetadataOutputStream``: bytes go to
a temp file in the target directory, are fsynced, and are then moved into place. ``PutMode.CREATE``
uses ``os.link``, which fails if the target exists (``os.rename`` would replace it silently), so two
writers can never both create the same key. The directory is fsynced afterwards so the new name is
durable too. Temp files start with ``.tmp-`` and are never listed; a write that fails at any step
(write, fsync, close, link) or is aborted removes its temp file.

Containment: the root is resolved once, when the store is created (it may itself be a symbolic link,
to a mounted volume say). Below it no link is ever followed, not even one pointing back inside. Every
operation opens the root, then each directory on the key's path relative to its parent's descriptor
with ``O_NOFOLLOW`` (``openat``), and does its final open, stat, link, unlink, mkdir or listing relative
to the last one (``dir_fd=``), never through a path string; a link met anywhere on the way raises
``UnsafeLinkError``, so a directory swapped for a link between two operations is refused, not
followed. Listings skip links. No directory descriptor outlives one operation but a streaming writer's
(its temp file lives there), and that one is checked against a fresh walk before the object is linked
into place.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NoReturn

from keystate.storage._local_writer import _LocalWriter
from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode, validate_key
from keystate.storage.errors import (
    AlreadyExistsError,
    KeystateError,
    NotFoundError,
    StorageAccessDeniedError,
    StorageError,
    UnsafeLinkError,
)

__all__ = ["LocalObjectStore"]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"

# A directory on a key's path: never through a link, never inherited by a child process.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# An object opened for reading; O_NONBLOCK so that a FIFO in its place cannot block the open itself.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
# A new temp file: O_EXCL refuses any existing entry, a link included.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What an open with O_NOFOLLOW fails with on a link: ELOOP, ENOTDIR with O_DIRECTORY (Linux), EMLINK
# (FreeBSD). Each also has other causes, so the entry is looked at before a link is reported.
_LINK_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EMLINK})
# linkat without AT_SYMLINK_FOLLOW where the platform can say so: a temp file swapped for a link would
# be published as that link (which every read refuses), never as a second name of its target.
_LINK_FOLLOWS = os.link not in os.supports_follow_symlinks


def _fsync_dir(fd: int) -> None:
    """Make a directory's entries durable (a separate function: the crash tests stop the process here)."""
    os.fsync(fd)


class LocalObjectStore(ObjectStore):
    """Objects as files under a root directory that no operation leaves (see the module docstring).

    Args:
        root: the directory keys are relative to; created on first write. Resolved here, once: it may
            be a symbolic link itself; nothing below it may (``UnsafeLinkError``).
        fsync: fsync files and directories on every completed write. Turning it off is only for
            tests and benchmarks that measure the cost of durability.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = Path(os.path.realpath(root))
        self._fsync = fsync

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self._root)!r})"

    def describe(self, key: str = "") -> str:
        return str(self._root / key) if key else str(self._root)

    def _fail(self, exc: OSError, action: str, key: str) -> NoReturn:
        if isinstance(exc, KeystateError):
            raise exc  # raised by this store already, with its own message (NotFoundError, AlreadyExistsError)
        where = self.describe(key)
        if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
            raise NotFoundError(f"cannot {action} {where}: no such object") from exc
        if isinstance(exc, PermissionError):
            raise StorageAccessDeniedError(
                f"cannot {action} {where}: permission denied; check the directory's owner and mode"
            ) from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            full = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            raise StorageError(f"cannot {action} {where}: {full}; free disk space") from exc
        raise StorageError(f"cannot {action} {where}: {exc.strerror or exc}") from exc

    # --- walking: every path is opened component by component from the root, never followed ----------

    def _link_error(self, action: str, key: str, link: str) -> UnsafeLinkError:
        what = "it is" if link == key else f"{self.describe(link)} on its path is"
        return UnsafeLinkError(
            f"cannot {action} {self.describe(key)}: {what} a symbolic link; keystate does not follow links in "
            f"checkpoint storage (below {self._root}); put the directory or file itself in place of the link"
        )

    @staticmethod
    def _is_link(parent: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _open_root(self, action: str, key: str, *, create: bool = False) -> int:
        """A descriptor of the root; the root (but none of its ancestors) must still not be a link."""
        try:
            return os.open(self._root, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in _LINK_ERRNOS and self._root.is_symlink():
                raise UnsafeLinkError(
                    f"cannot {action} {self.describe(key)}: the storage root {self._root} has become a symbolic "
                    "link since the store was opened (it is resolved once, then never followed); open the "
                    "storage again"
                ) from exc
            raise
        missing: list[Path] = []
        d = self._root
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            if self._fsync:
                fd = os.open(d.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    _fsync_dir(fd)
                finally:
                    os.close(fd)
        return os.open(self._root, _DIR_FLAGS)

    def _open_child(
        self, parent: int, parts: Sequence[str], index: int, action: str, key: str, *, create: bool = False
    ) -> int:
        """Open directory ``parts[index]`` in ``parent`` (made, and its entry fsynced, if ``create``)."""
        name = parts[index]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in _LINK_ERRNOS and self._is_link(parent, name):
                raise self._link_error(action, key, "/".join(parts[: index + 1])) from exc
            raise
        try:
            os.mkdir(name, dir_fd=parent)
        except FileExistsError:
            pass  # another writer made it meanwhile (or something else is there now: the open tells)
        else:
            if self._fsync:
                _fsync_dir(parent)
        return self._open_child(parent, parts, index, action, key)

    def _open_dir(self, parts: Sequence[str], action: str, key: str, *, create: bool = False) -> int:
        """A descriptor of the directory ``parts`` below the root, reached one ``openat`` at a time."""
        fd = self._open_root(action, key, create=create)
        for index, name in enumerate(parts):
            try:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)  # the common case, inline: one openat
                except OSError:
                    child = self._open_child(fd, parts, index, action, key, create=create)
            finally:
                os.close(fd)
            fd = child
        return fd

    @contextlib.contextmanager
    def _parent(self, key: str, action: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """The descriptor of ``key``'s directory and the key's last segment, for one operation."""
        *parts, name = validate_key(key).split("/")
        fd = self._open_dir(parts, action, key, create=create)
        try:
            yield fd, name
        finally:
            os.close(fd)

    @staticmethod
    def _segments(prefix: str) -> list[str]:
        return validate_key(prefix).split("/") if prefix else []

    # --- reads ---------------------------------------------------------------------------------------

    def _open_regular(self, key: str) -> BinaryIO:
        """Open an object for reading: a regular file, reached without following any link.

        A FIFO or device in its place would block or stream forever, and a link could point outside
        the root; neither is an object keystate wrote, so both are refused.
        """
        try:
            with self._parent(key, "read") as (parent, name):
                try:
                    fd = os.open(name, _READ_FLAGS, dir_fd=parent)
                except OSError as exc:
                    if exc.errno in _LINK_ERRNOS and self._is_link(parent, name):
                        raise self._link_error("read", key, key) from exc
                    raise
        except OSError as exc:
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
        try:
            with self._parent(key, "stat") as (parent, name):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            self._fail(exc, "stat", key)
        if stat.S_ISDIR(st.st_mode):
            raise NotFoundError(f"{self.describe(key)} is a directory, not an object")
        if stat.S_ISLNK(st.st_mode):
            raise self._link_error("stat", key, key)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(
                f"{self.describe(key)} is not a regular file; keystate only reads regular files it wrote"
            )
        return st.st_size

    # --- writes --------------------------------------------------------------------------------------

    def _discard_temp(self, parent: int, tmp: str, key: str) -> None:
        """Remove the temp file of a write that failed or completed. A failure here is only logged: the
        write's own outcome (its error, or the object in place) is what the caller is told."""
        try:
            os.unlink(tmp, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove temp file %s of %s: %s", tmp, self.describe(key), exc.strerror or exc)

    def _write_temp(self, parent: int, name: str, write: Callable[[BinaryIO], object], key: str) -> str:
        """Write a durable temp file beside ``name`` in ``parent``; returns its name. Removed on failure."""
        tmp = f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        fd = os.open(tmp, _TEMP_FLAGS, 0o666, dir_fd=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
        except BaseException:
            self._discard_temp(parent, tmp, key)
            raise
        return tmp

    def _publish(self, parent: int, tmp: str, name: str, mode: PutMode, key: str) -> None:
        """Move a complete temp file in ``parent`` into place; the temp name is gone afterwards."""
        if mode is PutMode.CREATE:
            try:
                os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=_LINK_FOLLOWS)
            except FileExistsError:
                raise AlreadyExistsError(
                    f"{self.describe(key)} already exists; a create-only write never replaces it"
                ) from None
            finally:
                self._discard_temp(parent, tmp, key)
        else:
            try:
                os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                self._discard_temp(parent, tmp, key)
                raise
        if self._fsync:
            _fsync_dir(parent)

    def _publish_from(self, held: int, parts: Sequence[str], tmp: str, name: str, mode: PutMode, key: str) -> None:
        """Publish a streaming writer's temp file, which lies in ``held``, if a fresh walk from the root
        still reaches that directory: one moved or replaced during the write never receives the object."""
        fresh = self._open_dir(parts, "write", key)
        try:
            now, then = os.fstat(fresh), os.fstat(held)
            if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
                raise StorageError(
                    f"cannot write {self.describe(key)}: its directory was moved or replaced while the object was "
                    "being written; nothing is visible"
                )
            self._publish(fresh, tmp, name, mode, key)
        finally:
            os.close(fresh)

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        try:
            with self._parent(key, "write", create=True) as (parent, name):
                if mode is PutMode.CREATE and self._entry_exists(parent, name):
                    raise AlreadyExistsError(
                        f"{self.describe(key)} already exists; a create-only write never replaces it"
                    )
                tmp = self._write_temp(parent, name, lambda f: f.write(data), key)
                self._publish(parent, tmp, name, mode, key)
        except OSError as exc:
            self._fail(exc, "write", key)

    @staticmethod
    def _entry_exists(parent: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        *parts, name = validate_key(key).split("/")
        try:
            parent = self._open_dir(parts, "write", key, create=True)
        except OSError as exc:
            self._fail(exc, "write", key)
        tmp = f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o666, dir_fd=parent)
        except OSError as exc:
            os.close(parent)
            self._fail(exc, "write", key)
        return _LocalWriter(self, key, parts, parent, name, tmp, os.fdopen(fd, "wb"), mode)

    def delete(self, key: str) -> None:
        try:
            with self._parent(key, "delete") as (parent, name):
                os.unlink(name, dir_fd=parent)  # a link is removed itself, never what it points to
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._fail(exc, "delete", key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several objects, one walk per directory rather than per key; missing ones are skipped."""
        by_dir: dict[str, list[tuple[str, str]]] = {}
        for key in keys:
            directory, _, name = validate_key(key).rpartition("/")
            by_dir.setdefault(directory, []).append((name, key))
        for directory, entries in by_dir.items():
            first = entries[0][1]
            try:
                parent = self._open_dir(self._segments(directory), "delete", first)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                self._fail(exc, "delete", first)
            try:
                for name, key in entries:
                    try:
                        os.unlink(name, dir_fd=parent)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        self._fail(exc, "delete", key)
            finally:
                os.close(parent)

    def remove_empty_dirs(self, prefix: str) -> None:
        """Remove ``prefix`` and its sub-directories that are empty, bottom up, never a file.

        ``os.rmdir`` refuses a non-empty directory atomically, so a file another writer creates
        meanwhile is never lost (its directory simply stays). Links are not descended into.
        """
        parts = self._segments(prefix)
        try:
            if not parts:
                fd = self._open_root("delete", prefix)
                try:
                    self._prune(fd)
                finally:
                    os.close(fd)
                with contextlib.suppress(OSError):  # the root itself only goes if empty (and removable)
                    os.rmdir(self._root)
                return
            parent = self._open_dir(parts[:-1], "delete", prefix)
            try:
                top = self._open_child(parent, parts, len(parts) - 1, "delete", prefix)
                try:
                    self._prune(top)
                finally:
                    os.close(top)
                self._rmdir(parent, parts[-1])
            finally:
                os.close(parent)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._fail(exc, "delete", prefix)

    def _prune(self, fd: int) -> None:
        """Remove the empty directories below ``fd``, deepest first."""
        with os.scandir(fd) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        for name in names:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno in _LINK_ERRNOS:
                    continue  # removed, or swapped for a link, since it was listed
                raise
            try:
                self._prune(child)
            finally:
                os.close(child)
            self._rmdir(fd, name)

    @staticmethod
    def _rmdir(parent: int, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            # Not empty (an object, or a writer's new file), or a link put there meanwhile (ENOTDIR:
            # rmdir never follows one): it stays.
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return
            raise

    def delete_prefix(self, prefix: str) -> None:
        try:
            with self._parent(prefix, "delete") as (parent, name):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise self._link_error("delete", prefix, prefix)
                if not stat.S_ISDIR(st.st_mode):
                    return
                # With dir_fd, rmtree works on descriptors throughout: it unlinks the links it meets
                # inside and never follows one (and refuses a top swapped for a link meanwhile).
                shutil.rmtree(name, dir_fd=parent)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._fail(exc, "delete", prefix)

    # --- listing -------------------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Regular files under ``prefix``, files of a directory before its sub-directories, each level
        sorted. Links, to files or directories, are neither reported nor descended into."""
        try:
            fd = self._open_dir(self._segments(prefix), "list", prefix)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._fail(exc, "list", prefix)
        try:
            yield from self._list_below(fd, prefix)
        finally:
            os.close(fd)

    def _list_below(self, fd: int, prefix: str) -> Iterator[ObjectInfo]:
        files: list[tuple[str, int]] = []
        dirs: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                        continue
                    if entry.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while listing
                    if stat.S_ISREG(st.st_mode):
                        files.append((entry.name, st.st_size))
                    elif stat.S_ISLNK(st.st_mode):
                        log.info("not listing %s: a symbolic link", self.describe(f"{prefix}/{entry.name}"))
        except OSError as exc:
            self._fail(exc, "list", prefix)
        for name, size in sorted(files):
            yield ObjectInfo(key=f"{prefix}/{name}" if prefix else name, size=size)
        for name in sorted(dirs):
            key = f"{prefix}/{name}" if prefix else name
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno in _LINK_ERRNOS:
                    continue  # removed, or swapped for a link, since it was listed
                self._fail(exc, "list", key)
            try:
                yield from self._list_below(child, key)
            finally:
                os.close(child)

    def list_dirs(self, prefix: str) -> list[str]:
        """Sub-directories of ``prefix``; links to directories are not reported."""
        try:
            fd = self._open_dir(self._segments(prefix), "list", prefix)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            self._fail(exc, "list", prefix)
        try:
            with os.scandir(fd) as it:
                return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        except OSError as exc:
            self._fail(exc, "list", prefix)
        finally:
            os.close(fd)
