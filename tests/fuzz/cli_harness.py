"""``keystate`` run in process for the fuzzers, with the files it touched recorded (an audit hook), and
what every run must satisfy (:func:`check_cli_run`): exit 0, 1 or 2, one line on stderr at most, never a
traceback, strict JSON output, nothing written, nothing touched outside the location.

Where a file lies is decided after resolving links (``os.path.realpath``): a read through a linked
directory inside the location lands outside it, whatever its path says. The local store opens files
relative to directory descriptors (``openat``), whose audit event carries only the relative name, so
``os.open`` is also wrapped while a command runs to record the path of what it actually opened.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from keystate.tools.cli import run as cli_run

__all__ = ["CliRun", "check_cli_run", "run_cli"]


@dataclass
class CliRun:
    argv: list[str]
    code: int
    out: str
    err: str
    touched: list[tuple[str, str]] = field(default_factory=list)
    """File-system events (event name, or ``open-dir`` / ``open-write``; path) seen while the command ran."""


_RECORDING: list[list[tuple[str, str]]] = []
_WRITE_EVENTS = frozenset({"os.remove", "os.rename", "os.link", "os.symlink", "os.mkdir", "os.rmdir",
                           "shutil.rmtree", "os.truncate", "os.chmod", "os.utime"})  # fmt: skip
_READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDING or (event not in _READ_EVENTS and event not in _WRITE_EVENTS):
        return
    try:
        target = args[0] if args else ""
        if isinstance(target, int) or target is None:
            return
        path = os.fsdecode(os.fspath(target))
        kind = event
        if event == "open":
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            kind = "open-write" if writes else "open"
        _RECORDING[-1].append((kind, path))
    except Exception:  # an audit hook must never raise into the audited code
        return


sys.addaudithook(_audit)

_real_open = os.open
_PROC_FD = Path("/proc/self/fd")


def _recording_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """``os.open``, recording what a ``dir_fd``-relative open really opened (Linux: ``/proc/self/fd``)."""
    fd = _real_open(path, flags, mode, dir_fd=dir_fd)
    if _RECORDING and dir_fd is not None:
        with contextlib.suppress(OSError):
            opened = os.readlink(_PROC_FD / str(fd))
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            kind = "open-write" if writes else "open-dir" if flags & os.O_DIRECTORY else "open"
            _RECORDING[-1].append((kind, opened))
    return fd


@contextlib.contextmanager
def _recording(touched: list[tuple[str, str]]) -> Iterator[None]:
    _RECORDING.append(touched)
    try:
        if _PROC_FD.is_dir():
            with mock.patch.object(os, "open", _recording_open):
                yield
        else:
            yield
    finally:
        _RECORDING.pop()


def run_cli(argv: list[str]) -> CliRun:
    """Run ``keystate`` in process, with stdout a strict UTF-8 stream (like a terminal or a pipe)."""
    raw_out = io.BytesIO()
    out = io.TextIOWrapper(raw_out, encoding="utf-8", errors="strict", newline="\n", write_through=True)
    err = io.StringIO()
    touched: list[tuple[str, str]] = []
    with _recording(touched), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_run(argv)
        except SystemExit as exc:  # argparse: bad usage
            code = exc.code if isinstance(exc.code, int) else 2
    out.flush()
    text = raw_out.getvalue().decode("utf-8")
    out.detach()
    return CliRun(argv, code, text, err.getvalue(), touched)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_cli_run(result: CliRun, *, confined_to: tuple[Path, ...] = (), watched: Path | None = None) -> None:
    """Exit 0, 1 or 2; exit 2 with exactly one line on stderr and no traceback; nothing on stderr
    otherwise (but dump's one-line note on finished subtasks); JSON output is strict JSON; read-only
    commands write nothing; every file the command touched under ``watched`` lies under one of ``confined_to``."""
    command = result.argv[0]
    assert result.code in (0, 1, 2), result
    assert "Traceback" not in result.err, result
    assert "Traceback" not in result.out, result
    if result.code == 2:
        assert result.err.endswith("\n"), result
        assert result.err.count("\n") == 1, result
        assert "internal error" not in result.err, result
    elif command == "dump" and result.err:
        # dump's one stderr note: the operator has finished subtasks, which have no state to print.
        assert result.err.startswith("note: operator "), result
        assert result.err.count("\n") == 1, result
        assert "finished subtasks have no state to dump" in result.err, result
    else:
        assert result.err == "", result
    if result.code == 1:
        assert command in ("verify", "check-restore") or "--verify" in result.argv, result
    if "--json" in result.argv:  # one JSON object, on errors too: {"error": {"kind", "message"}}
        doc = json.loads(result.out, parse_constant=_reject_constant)
        if result.code not in (0, 1):
            assert isinstance(doc, dict), result
            assert set(doc) == {"error"}, result
            assert set(doc["error"]) == {"kind", "message"}, result
            assert doc["error"]["kind"] != "internal", result
    if command == "dump" and result.code == 0:
        for line in result.out.splitlines():
            json.loads(line, parse_constant=_reject_constant)
    writes = [t for t in result.touched if t[0] in _WRITE_EVENTS or t[0] == "open-write"]
    assert not writes, (result.argv, writes)
    if watched is not None:
        for kind, path in result.touched:
            if _under(path, watched):
                # A directory above the location is opened only to walk down to it (the store goes one
                # directory at a time from its root); anything else must lie under the location.
                passed = kind == "open-dir" and any(_under(c, path) for c in confined_to)
                assert passed or any(_under(path, c) for c in confined_to), (result.argv, kind, path)


def _under(path: str | Path, base: str | Path) -> bool:
    """Whether ``path``, with its links resolved, is ``base`` or below it (a lexical check would take a
    file reached through a linked directory under ``base`` for one inside it)."""
    full = os.path.realpath(path)
    top = os.path.realpath(base)
    return full == top or full.startswith(top + os.sep)
