"""With the S3 endpoint down the CLI says at once what it is retrying (one line, not one per attempt),
gives up within the configured bound (``--s3-timeout`` or ``KEYSTATE_S3_TIMEOUT``) and exits 2 with the
one error line. The endpoint is a local port that was bound and closed again: connections are refused."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from keystate.tools.cli import run
from tests.tools.conftest import Cli

TIMEOUT = 1.5


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize(
    ("command", "verb", "target"),
    [("list", "list", "s3://keystate-test/root/"), ("inspect", "stat", "s3://keystate-test/root/_metadata")],
)
def test_an_unreachable_endpoint_prints_one_retry_line_and_fails_within_the_bound(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, how: str, command: str, verb: str, target: str
) -> None:
    port = closed_port()
    argv = [command, "s3://keystate-test/root", "--endpoint-url", f"http://127.0.0.1:{port}"]
    if how == "flag":
        argv += ["--s3-timeout", str(TIMEOUT)]
    else:
        monkeypatch.setenv("KEYSTATE_S3_TIMEOUT", str(TIMEOUT))
    started = time.monotonic()
    result = cli(*argv)
    took = time.monotonic() - started
    assert result.code == 2, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 2, result.err
    assert re.fullmatch(
        rf"keystate: warning: S3 endpoint http://127\.0\.0\.1:{port} unreachable; retrying {verb} {re.escape(target)} "
        rf"\(attempt 2 of \d+, \d+\.\d s so far; giving up after {TIMEOUT:g} s\)",
        lines[0],
    ), lines[0]
    assert lines[1].startswith(f"keystate: error: cannot {'list' if command == 'list' else 'stat'} "), lines[1]
    assert "S3 endpoint unreachable" in lines[1]
    assert re.search(r"after \d+ attempts in \d+\.\d s", lines[1]), lines[1]
    assert took < TIMEOUT + 1.0, f"took {took:.1f} s with a bound of {TIMEOUT} s"


def test_the_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["list", "s3://keystate-test/root", "--s3-timeout", "0"])
    assert info.value.code == 2
    assert "--s3-timeout: must be a positive number of seconds, found '0'" in capsys.readouterr().err


def test_the_flag_does_not_outlive_the_command(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYSTATE_S3_TIMEOUT", raising=False)
    cli("list", "s3://keystate-test/root", "--endpoint-url", f"http://127.0.0.1:{closed_port()}", "--s3-timeout", "0.2")
    assert "KEYSTATE_S3_TIMEOUT" not in os.environ
