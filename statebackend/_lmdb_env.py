"""LMDB environments on disk: who owns a directory, cleaning up after dead owners, and LMDB's errors.

**Ownership.** A backend holds ``flock(LOCK_EX | LOCK_NB)`` on ``<directory>/keystate.lock`` from before it
opens the environment until it closes it; the kernel releases the lock when the process dies, however it
dies. A second backend on the same directory, in this process or another (LMDB itself lets processes
share an environment, so they would overwrite each other's state), gets :class:`LmdbDirectoryInUseError`.
The lock file's content only names the holder for that message, a JSON object::

    {"pid": 1234, "host": "worker-3", "owner": "operator 'totals' subtask 0"}

Who holds a directory is what the kernel says, never the pid in the file: pids are reused.

**Scratch clean-up.** A scratch directory (named like :data:`SCRATCH_NAME`) whose lock can be taken has no
live owner: :func:`remove_dead_scratch` takes the lock and deletes the directory while holding it. A new
lock file becomes visible only once it is locked (it is written under a temporary name, locked, then
linked into place), so a directory being created is never mistaken for a dead one.

**Errors.** :func:`lmdb_error` turns what LMDB and the file system raise into the
:class:`~keystate.statebackend.errors.LmdbError` that says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import lmdb

from keystate.statebackend.errors import (
    LmdbAccessDeniedError,
    LmdbDirectoryInUseError,
    LmdbDiskFullError,
    LmdbError,
    LmdbMapFullError,
    LmdbReadersFullError,
)

__all__ = ["LOCK_FILE", "MAX_READERS", "SCRATCH_NAME", "DirectoryLock", "lmdb_error", "remove_dead_scratch"]

log = logging.getLogger(__name__)

LOCK_FILE = "keystate.lock"
MAX_READERS = 512
"""LMDB reader slots per environment: every open snapshot holds one, and so does the task's reader."""
SCRATCH_NAME = re.compile(r"keystate-[\w.-]{1,40}-(?:[0-9]+-[0-9a-f]{8}|[a-z0-9_]{8})")
"""The names keystate gives scratch directories: ``keystate-<uid>-<subtask>-<8 hex>`` (``LmdbStateBackend``)
and ``keystate-<uid>-<8 random>`` (``tempfile.mkdtemp`` for a backend given no directory)."""
_ATTEMPTS = 8
"""Lock attempts when the lock file keeps vanishing under us (a clean-up deleting the directory)."""
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_NEARLY_FULL = 1 << 20
"""A write that failed with fewer free bytes than this on the file system failed because it is full: LMDB
reports a short write as an I/O error (``EIO``), not as ``ENOSPC``."""
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


class DirectoryLock:
    """The exclusive lock of one LMDB directory, held until :meth:`release`.

    Raises:
        LmdbDirectoryInUseError: another backend holds the directory; the message names it.
        LmdbError: the directory or its lock file cannot be created (see :func:`lmdb_error`).
    """

    def __init__(self, directory: Path, owner: str = "") -> None:
        self.directory = directory
        self._owner = owner
        self._fd: int | None = None
        try:
            for _ in range(_ATTEMPTS):
                directory.mkdir(parents=True, exist_ok=True)
                fd = self._lock_existing() if (directory / LOCK_FILE).exists() else self._create_locked()
                if fd is not None:
                    self._fd = fd
                    return
        except OSError as exc:
            raise lmdb_error(exc, directory, "lock the LMDB directory") from exc
        raise LmdbError(
            f"cannot lock the LMDB directory {directory}: its lock file vanished {_ATTEMPTS} times while being "
            "locked (something keeps deleting the directory); give the backend a directory nothing else removes"
        )

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": self._owner}).encode()

    def _lock_existing(self) -> int | None:
        """Lock the lock file that is there; ``None`` if it was deleted or replaced meanwhile."""
        path = self.directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(fd) from None
            if not _is_file_at(fd, path):
                os.close(fd)
                return None
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return fd

    def _create_locked(self) -> int | None:
        """A new lock file, locked before it becomes visible; ``None`` if another one appeared first."""
        temp = self.directory / f".{LOCK_FILE}-{uuid.uuid4().hex[:12]}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, self._record(), 0)
            try:
                os.link(temp, self.directory / LOCK_FILE)
            except FileExistsError:
                os.close(fd)
                return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        return fd

    def _in_use(self, fd: int) -> LmdbDirectoryInUseError:
        holder: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            found = json.loads(os.pread(fd, 4096, 0))
            if isinstance(found, dict):
                holder = found
        pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
        host = holder.get("host") if isinstance(holder.get("host"), str) else None
        owner = holder.get("owner") if isinstance(holder.get("owner"), str) and holder.get("owner") else None
        if pid is None:
            who = "another backend (its lock file does not name it yet)"
        else:
            who = f"pid {pid} on host {host or '?'}{f' ({owner})' if owner else ''}"
        return LmdbDirectoryInUseError(
            f"LMDB directory {self.directory} is in use by {who}; each backend needs its own directory",
            path=str(self.directory),
            pid=pid,
            host=host,
            owner=owner,
        )

    def set_owner(self, owner: str) -> None:
        """Record a description of the holder (e.g. ``"operator 'totals' subtask 0"``) for messages."""
        self._owner = owner
        if self._fd is not None:
            with contextlib.suppress(OSError):  # only a description: a failure changes no behaviour
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._record(), 0)

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays: deleting it would let a backend that opened
        it meanwhile lock a file nobody else can find any more."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale record for the next holder's window before it writes its own
            os.close(fd)

    def __del__(self) -> None:
        # A store whose constructor failed after locking (its caller's, say) is never closed: release the
        # lock when it is collected rather than when the process exits.
        with contextlib.suppress(Exception):
            self.release()


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not deleted or replaced since it was opened)."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def remove_dead_scratch(parent: Path) -> list[Path]:
    """Delete the scratch directories under ``parent`` whose owner is gone; returns the ones deleted.

    Candidates are the directories directly under ``parent`` named like :data:`SCRATCH_NAME`, owned by this
    user and holding a lock file. A candidate is deleted only while this process holds its lock, which no
    live backend lets go of; one without a lock file (being created, or left by a keystate that wrote
    none) is left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    uid = os.geteuid()
    for entry in entries:
        if not SCRATCH_NAME.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == uid:
                directory = Path(entry.path)
                if _remove_if_dead(directory):
                    removed.append(directory)
    if removed:
        log.info("removed %d LMDB scratch directories of dead processes under %s", len(removed), parent)
    return removed


def _remove_if_dead(directory: Path) -> bool:
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live backend holds it
        if not _is_file_at(fd, path):
            return False
        shutil.rmtree(directory, ignore_errors=True)  # holding the lock: nobody can start using it meanwhile
        if directory.exists():
            log.warning("could not remove the dead LMDB scratch directory %s completely", directory)
            return False
        return True
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged user may still write on the file system of ``path`` (``None``: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def lmdb_error(exc: BaseException, path: Path, action: str, *, map_size: int | None = None) -> LmdbError:
    """The :class:`LmdbError` for ``exc``, raised by LMDB or the file system while trying to ``action``
    (``"open"``, ``"write to"``, ...) the environment in ``path``."""
    where = f"cannot {action} {path}"
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, lmdb.MapFullError):
        size = f" at {map_size >> 20} MiB" if map_size else ""
        return LmdbMapFullError(
            f"{where}: the LMDB map is full{size} and cannot grow; raise map_size "
            "(LmdbStateBackend(map_size=...)) or free memory for the mapping"
        )
    free = None if type(exc) is not lmdb.Error else _free_bytes(path)
    if isinstance(exc, lmdb.DiskError) or code in _FULL or (free is not None and free < _NEARLY_FULL):
        full = _FULL.get(code or errno.ENOSPC, "no space left on device")
        if free is not None:
            full = f"{exc}, with {free} bytes free on its file system"
        return LmdbDiskFullError(
            f"{where}: {full}; free disk space or give the backend a directory on a larger disk "
            "(LmdbStateBackend(directory=...))"
        )
    if isinstance(exc, lmdb.ReadersFullError):
        return LmdbReadersFullError(
            f"{where}: all {MAX_READERS} LMDB reader slots are taken, one per open snapshot; write or release "
            "snapshots (KeyedSnapshot.write / release) before taking more"
        )
    if isinstance(exc, lmdb.ReadonlyError) or code in _DENIED:
        return LmdbAccessDeniedError(
            f"{where}: {'read-only file system' if code == errno.EROFS else 'permission denied'} ({exc}); "
            "check the directory's owner, mode and mount, or give the backend another directory"
        )
    if isinstance(exc, OSError):
        return LmdbError(f"{where}: {exc.strerror or exc}; check the directory, or give the backend another one")
    if exc.__class__ is lmdb.MemoryError:
        return LmdbError(f"{where}: LMDB ran out of memory ({exc}); free memory or lower map_size")
    return LmdbError(
        f"{where}: LMDB failed ({exc}); the environment may be damaged: close the backend, delete the "
        "directory and restore from the last checkpoint"
    )
