"""The test command: lint, format check, strict type check, then the test suite.

Run from the repository root with ``python -m tests`` (extra arguments go to pytest, e.g.
``python -m tests -k storage``). Exits non-zero on the first failing step.
"""

from __future__ import annotations

import subprocess
import sys
import time


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
    _run("tests", ["pytest", *sys.argv[1:]])


if __name__ == "__main__":
    main()
