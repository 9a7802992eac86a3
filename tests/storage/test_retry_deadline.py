"""Retries are bounded in time and say what they retry once: RetryPolicy.deadline for the stores keystate
retries itself, ``make_s3_client(timeout=)`` / ``KEYSTATE_S3_TIMEOUT`` for S3 (whose retries run inside
botocore), with one WARNING per failing call or outage, not one per attempt."""

from __future__ import annotations

import logging
import socket
import time
from types import SimpleNamespace
from typing import Any

import botocore.exceptions
import pytest

from keystate.storage import (
    Fault,
    FaultRule,
    FaultyObjectStore,
    MemoryObjectStore,
    RetryingObjectStore,
    RetryPolicy,
    S3ObjectStore,
    StorageUnavailableError,
    make_s3_client,
)
from keystate.storage._s3_client import _RetryWatch, backoff_delay, s3_timeout_from_env


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def test_a_retry_policy_deadline_bounds_a_call_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    inner = FaultyObjectStore(MemoryObjectStore("deadline"))
    inner.put("a/b", b"x")
    inner.add(FaultRule(Fault.THROTTLE, "get"))  # every read is throttled, for ever
    store = RetryingObjectStore(inner, RetryPolicy(max_attempts=1000, initial_backoff=0.02, jitter=False, deadline=0.3))
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="keystate.storage.retry"), pytest.raises(StorageUnavailableError):
        store.get("a/b")
    took = time.monotonic() - started
    assert 0.25 < took < 0.6, took
    assert inner.count(Fault.THROTTLE) < 1000, "the deadline, not the attempts, ended the call"
    warnings = warnings_of(caplog, "keystate.storage.retry")
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("read memory://deadline/a/b failed (")
    assert "retrying (attempt 2 of 1000, 0.0 s so far; giving up after 0.3 s)" in warnings[0]


def test_the_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline=0)


def test_an_unreachable_s3_endpoint_fails_within_the_timeout_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    store = S3ObjectStore("bucket", "jobs", client=make_s3_client(endpoint_url=f"http://127.0.0.1:{port}", timeout=1.0))
    started = time.monotonic()
    with (
        caplog.at_level(logging.DEBUG, logger="keystate.storage._s3_client"),
        pytest.raises(StorageUnavailableError) as info,
    ):
        store.put("chk-3/_metadata", b"{}")
    took = time.monotonic() - started
    assert took < 1.5, took
    warnings = warnings_of(caplog, "keystate.storage._s3_client")
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        f"S3 endpoint http://127.0.0.1:{port} unreachable; retrying put s3://bucket/jobs/chk-3/_metadata (attempt 2 of "
    ), warnings[0]
    assert warnings[0].endswith("s so far; giving up after 1 s)"), warnings[0]
    assert "attempts in" in str(info.value)


def test_the_timeout_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KEYSTATE_S3_TIMEOUT", "2.5")
    assert s3_timeout_from_env() == 2.5
    client: Any = make_s3_client(endpoint_url="http://127.0.0.1:1")
    assert client.meta.config.connect_timeout == 2.5
    assert client.meta.config.read_timeout == 2.5
    monkeypatch.setenv("KEYSTATE_S3_TIMEOUT", "soon")
    with caplog.at_level(logging.WARNING, logger="keystate.storage._s3_client"):
        assert s3_timeout_from_env() is None
    assert any("KEYSTATE_S3_TIMEOUT='soon' is not a positive number of seconds" in m for m in caplog.messages)
    with pytest.raises(ValueError, match="timeout"):
        make_s3_client(timeout=-1)


def test_one_outage_is_reported_once_and_a_success_ends_it(caplog: pytest.LogCaptureFixture) -> None:
    down = S3ObjectStore("bucket", client=make_s3_client(endpoint_url=f"http://127.0.0.1:{closed_port()}", timeout=0.3))
    with caplog.at_level(logging.WARNING, logger="keystate.storage._s3_client"):
        for _ in range(3):
            with pytest.raises(StorageUnavailableError):
                down.get("k")
    assert len(warnings_of(caplog, "keystate.storage._s3_client")) == 1, "three failing requests, one outage: one line"
    # A request that succeeds ends the outage (botocore asks the watch after every attempt).
    watch = _RetryWatch(max_attempts=3, deadline=None)
    refused = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    request: dict[str, Any] = {"url": "http://127.0.0.1:1/bucket/k", "context": {}}
    ok: tuple[Any, dict[str, Any]] = (SimpleNamespace(status_code=200), {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keystate.storage._s3_client"):
        assert isinstance(watch.needs_retry(None, None, 1, refused, request), float)
        assert isinstance(watch.needs_retry(None, None, 2, refused, request), float)
        assert watch.needs_retry(None, None, 3, refused, request) is False, "out of attempts"
        assert watch.needs_retry(ok, None, 1, None, request) is None
        assert isinstance(watch.needs_retry(None, None, 1, refused, request), float)
    assert len(warnings_of(caplog, "keystate.storage._s3_client")) == 2, "two outages, one line each"


def test_the_backoff_is_full_jitter_doubling_from_its_base_up_to_20_seconds() -> None:
    # botocore's standard mode: base 1 s when throttled, 50 ms otherwise, doubling, at most 20 s.
    for attempts in range(1, 12):
        for throttled, base in ((True, 1.0), (False, 0.05)):
            cap = min(base * 2.0 ** (attempts - 1), 20.0)
            delays = [backoff_delay(attempts, throttled) for _ in range(200)]
            assert all(0 <= d <= cap for d in delays), (attempts, throttled)
            assert max(delays) > cap / 2, f"jittered over the whole range up to {cap} s"
            assert len(set(delays)) > 100, "jittered, not constant"
