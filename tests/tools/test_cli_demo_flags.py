"""``keystate demo``'s executor flags (docs/cli.md): usage errors, and an unreachable Ray cluster given with
``--ray-address`` failing within ``--ray-connect-timeout`` as one line on stderr, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tools.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]


def assert_one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("keystate: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
        (["--ray-connect-timeout", "3"], "--ray-connect-timeout needs --executor ray"),
        (["--executor", "local", "--ray-connect-timeout", "3"], "--ray-connect-timeout needs --executor ray"),
        (["--executor", "ray", "--ray-connect-timeout", "0"], "--ray-connect-timeout must be positive seconds"),
        (["--executor", "ray", "--ray-connect-timeout", "-2"], "found -2.0"),
        (["--executor", "ray", "--ray-connect-timeout", "nan"], "must be positive"),
    ],
)
def test_flag_misuse_is_one_line_exit_2_and_runs_nothing(
    cli: Cli, tmp_path: Path, argv: list[str], fragment: str
) -> None:
    result = cli("demo", "--checkpoints", str(tmp_path / "demo"), "--duration", "1", *argv)
    assert result.code == 2
    assert_one_line(result.err, fragment)
    assert not (tmp_path / "demo").exists(), "nothing ran"


def test_an_unreachable_cluster_fails_within_the_connect_timeout_in_one_line(tmp_path: Path) -> None:
    # A process of its own: Ray may already be initialised in the test session (tests/runtime/ray), and the
    # point is what a user's terminal shows, Ray's own log lines included.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "keystate.tools.cli", "demo", "--executor", "ray", "--duration", "5",
            "--ray-address", "127.0.0.1:9", "--ray-connect-timeout", "2",
            "--checkpoints", str(tmp_path / "demo")]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    took = time.monotonic() - started
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert_one_line(done.stderr, "127.0.0.1:9", "within 2 s", "(--ray-connect-timeout)")
    # The 2 s timeout, plus importing keystate and Ray in a fresh interpreter (a few seconds on a loaded
    # 2-core machine); far below the 30 s default, so the flag is what bounds it.
    assert took < 2 + 15, f"took {took:.1f} s"
    assert not any((tmp_path / "demo").rglob("_metadata")), "no checkpoint was written"
