"""A real, small file system for disk-full tests: a tmpfs of a few MiB mounted for one test (needs root
and permission to mount; tests skip otherwise), and what is left on it afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests._environment import unavailable

__all__ = ["fill", "free_bytes", "small_tmpfs", "temp_files", "total_bytes"]


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str = "3m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``mount`` (made if missing) for the ``with`` block, then unmount it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        unavailable("mounting a small tmpfs needs root and mount(8)")
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def total_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def temp_files(root: Path) -> list[Path]:
    """The store's temp files (``.tmp-*``) anywhere under ``root``."""
    return sorted(p for p in root.rglob(".tmp-*"))


def fill(path: Path) -> Path:
    """Write a file at ``path`` until the file system is full; returns it (delete it to free the space)."""
    chunk = b"\xff" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
        with contextlib.suppress(OSError):
            while f.write(b"\xff"):
                pass
    return path
