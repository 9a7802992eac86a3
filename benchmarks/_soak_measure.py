"""What the soak (``benchmarks/soak.py``) measures of its own process and of the disk: RSS, the C heap, file
descriptors, live objects and allocation growth; files and bytes under a directory, checkpoint directories."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

_PACKAGE = __name__.partition(".")[0]
"""The benchmarks package: objects of its types are the soak's own records, left out of the object counts."""


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` (KiB) and ``Threads`` of this process; empty off Linux."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                    found[name] = int(rest.split()[0])
    except OSError:
        pass
    return found


def rss_bytes() -> int:
    status = proc_status()
    if "VmRSS" in status:
        return status["VmRSS"] * 1024
    import resource  # peak, not current: the best there is without /proc

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, type[ctypes.c_size_t]]]] = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    fn.argtypes = []

    def call() -> _Mallinfo2:
        info: _Mallinfo2 = fn()
        return info

    return call


_MALLINFO2 = _load_mallinfo2()


def malloc_stats() -> tuple[int, int]:
    """C heap bytes in use (``uordblks + hblkhd``) and free but held (``fordblks``), all arenas; -1 off glibc.

    Python objects over 512 bytes, bytes buffers and every C library allocate here; pymalloc's small-object
    arenas are mmapped separately (``sys.getallocatedblocks()`` covers them).
    """
    if _MALLINFO2 is None:
        return -1, -1
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd), int(info.fordblks)


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


@dataclass(frozen=True, slots=True)
class Tree:
    files: int = 0
    bytes: int = 0
    dirs: int = 0


def walk(root: Path, *, skip: frozenset[str] = frozenset()) -> Tree:
    """Regular files, their bytes and the directories under ``root`` (top-level names in ``skip`` left out)."""
    files = size = dirs = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if directory == root and entry.name in skip:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # removed meanwhile (retention runs concurrently)
    return Tree(files, size, dirs)


def checkpoint_dirs(job_dir: Path) -> tuple[list[int], list[int]]:
    """Ids of the ``chk-*`` directories with and without ``_metadata``."""
    complete: list[int] = []
    incomplete: list[int] = []
    try:
        names = os.listdir(job_dir)
    except FileNotFoundError:
        return complete, incomplete
    for name in names:
        if name.startswith("chk-") and name[4:].isdigit():
            (complete if (job_dir / name / "_metadata").exists() else incomplete).append(int(name[4:]))
    return sorted(complete), sorted(incomplete)


@dataclass(frozen=True, slots=True)
class Disk:
    root: Tree
    """Under the location, the sink's output/ left out."""
    output_files: int
    output_bytes: int
    staging_files: int
    lmdb: Tree
    complete: tuple[int, ...]
    incomplete: tuple[int, ...]


def measure_disk(location: Path, job_dir: Path, lmdb_dir: Path) -> Disk:
    output = location / "output"
    out_files = out_bytes = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(output):
            if entry.is_file() and entry.name.endswith(".jsonl"):
                out_files += 1
                out_bytes += entry.stat().st_size
    staging = 0
    with contextlib.suppress(FileNotFoundError):
        staging = sum(1 for e in os.scandir(output / "_staging") if e.is_file())
    complete, incomplete = checkpoint_dirs(job_dir)
    return Disk(
        root=walk(location, skip=frozenset({"output"})),
        output_files=out_files,
        output_bytes=out_bytes,
        staging_files=staging,
        lmdb=walk(lmdb_dir),
        complete=tuple(complete),
        incomplete=tuple(incomplete),
    )


def _own(cls: type) -> bool:
    """Whether ``cls`` is one of the soak's own types (of the benchmarks package)."""
    return cls.__module__.partition(".")[0] == _PACKAGE


def _types_of_live_objects() -> list[type]:
    """The type of every gc-tracked object, with the list of the objects themselves dropped at once.

    ``gc.get_objects()`` also returns tuples that another thread is still building (``tuple(generator)``
    in a snapshot thread); while a reference to one is held, that thread's ``_PyTuple_Resize`` fails with
    ``SystemError: bad argument to internal function`` (CPython gh-39117, gh-107137). Mapping to types in
    C, without running bytecode in between, keeps that window to a few instructions instead of a Python
    loop over every object: an earlier soak lost a task to it (and failed over, output still exact).
    """
    return list(map(type, gc.get_objects()))


def live_objects() -> int:
    """gc-tracked objects, without the soak's own records (which grow by design)."""
    return sum(1 for t in _types_of_live_objects() if not _own(t))


def top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, limit: int = 12) -> list[str]:
    """The allocation sites whose live bytes grew most between two snapshots (tracebacks, newest frame last)."""
    ours = os.path.join(os.path.dirname(__file__), "*")  # the benchmarks package's files
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, ours)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    lines: list[str] = []
    for stat in stats[:limit]:
        lines.append(
            f"{stat.size_diff / 1024:+,.1f} KiB ({stat.count_diff:+,} blocks), {stat.size / 1024:,.1f} KiB live"
        )
        lines.extend(f"    {frame.filename}:{frame.lineno}" for frame in stat.traceback)
    return lines


def type_histogram() -> Counter[str]:
    """Live gc-tracked objects per type (``module.qualname``), the soak's own left out (after a collection)."""
    gc.collect()
    return Counter(f"{t.__module__}.{t.__qualname__}" for t in _types_of_live_objects() if not _own(t))
