"""The test command: lint, format check, strict type check, then the test suite.

Run from the repository root with ``python -m tests`` (extra arguments go to pytest, e.g.
``python -m tests -k storage``). Exits non-zero on the first failing step.

The tests run in :data:`WORKERS` pytest-xdist worker processes (``KEYSTATE_TEST_WORKERS`` sets another
number; ``-n`` or ``-p no:xdist`` among the arguments takes precedence). Much of the suite waits (Ray
actors, moto's server, child processes, timeouts), so two workers finish it in about 60 % of the time on
a 2-core machine. Each worker starts its own moto server and, on first use, its own local Ray cluster;
``--dist worksteal`` keeps both busy to the end, as a few tests take 20-30 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

WORKERS = 2


def _run(title: str, argv: list[str]) -> None:
    started = time.monotonic()
    print(f"==> {title}: {' '.join(argv)}", flush=True)
    code = subprocess.call([sys.executable, "-m", *argv])
    print(f"<== {title}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.monotonic() - started:.1f}s")
    if code != 0:
        sys.exit(code)


def main() -> None:
    _run("lint", ["ruff", "check", "."])
    _run("format", ["ruff", "format", "--check", "."])
    _run("types", ["mypy"])
    _run("tests", ["pytest", *_parallel(sys.argv[1:]), *sys.argv[1:]])


def _parallel(args: list[str]) -> list[str]:
    """The pytest-xdist arguments, unless ``args`` choose for themselves."""
    if any(a in ("--numprocesses", "no:xdist", "-pno:xdist") or a.startswith(("-n", "--numprocesses=")) for a in args):
        return []
    workers = os.environ.get("KEYSTATE_TEST_WORKERS", str(WORKERS))
    return ["-n", workers, "--dist", "worksteal"]


if __name__ == "__main__":
    main()
