"""Fault injection into boto3's S3 client: a botocore ``before-send`` hook, usable against any endpoint.

The hook sees every HTTP request the client is about to send (each retry too) and may answer it
itself: the request never reaches the server, and everything above the HTTP layer runs as in
production — botocore's retry mode and backoff, response parsing, and keystate's error mapping in
``S3ObjectStore``. So a test against moto's server (or MinIO) exercises boto3's own retry path::

    injector = S3FaultInjector([S3FaultRule(Fault.THROTTLE, "PutObject", key="*/_metadata", times=3)])
    injector.install(store.client)       # three 503 SlowDown answers, then the real server

Faults (:class:`keystate.storage.faults.Fault`) as seen through S3:

* ``THROTTLE``: HTTP 503 ``SlowDown``; ``INTERNAL_ERROR``: HTTP 500 ``InternalError`` (both retried
  by botocore; the request was not applied);
* ``CONNECTION_RESET``: the connection drops before the request is sent (``ConnectionClosedError``);
* ``TIMEOUT_AFTER_WRITE``: the request is sent to the server and applied, then the response is lost
  (``ReadTimeoutError``); botocore retries it, so a retried create-only PUT meets its own object;
* ``SLOW``: ``delay`` seconds, then the request goes through;
* ``CRASH``: the process is SIGKILLed with the request in flight (not sent), e.g. the n-th
  ``UploadPart`` of a multipart upload.

A rule may instead give an explicit error response (``status`` and ``code``, e.g. 403
``AccessDenied``). Rules match botocore operation names (``PutObject``, ``UploadPart``,
``CompleteMultipartUpload``, ``GetObject``, ``HeadObject``, ``ListObjectsV2``, ... or ``*``) and a
glob on the URL path (``/bucket/key`` with path-style addressing).
"""

from __future__ import annotations

import fnmatch
import random
import threading
import time
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import botocore.exceptions
from botocore.awsrequest import AWSResponse
from botocore.httpsession import URLLib3Session

from keystate.storage.faults import Fault, RuleCounter, RuleSchedule, kill_process

__all__ = ["S3FaultInjector", "S3FaultRule", "injected_response", "s3_error_response"]

_STATUS = {Fault.THROTTLE: (503, "SlowDown"), Fault.INTERNAL_ERROR: (500, "InternalError")}


class _Body:
    """The raw stream botocore reads an injected response from (``stream`` for errors, ``read`` for bodies)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data

    def read(self, amt: int | None = None) -> bytes:
        n = len(self._data) if amt is None else amt
        chunk, self._data = self._data[:n], self._data[n:]
        return chunk

    def close(self) -> None:
        self._data = b""


def injected_response(request: Any, status: int, headers: dict[str, str], body: bytes) -> AWSResponse:
    """A response to ``request`` that botocore reads as if the server had sent it, exactly as given: a
    ``body`` shorter than the ``Content-Length`` header, for instance, is a truncated response."""
    return AWSResponse(request.url, status, headers, _Body(body))


def s3_error_response(request: Any, status: int, code: str) -> AWSResponse:
    """An S3 error response as S3 sends it (HEAD responses carry no body, so the code is the status)."""
    body = b""
    if request.method != "HEAD":
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>injected {code}</Message><RequestId>t</RequestId></Error>"
        ).encode()
    headers = {"Content-Type": "application/xml", "Content-Length": str(len(body))}
    return injected_response(request, status, headers, body)


@dataclass(frozen=True)
class S3FaultRule(RuleSchedule):
    """Which S3 requests fail, and how.

    Attributes:
        fault: what to inject; ``None`` with ``status`` and ``code`` for an explicit error response.
        operations: a botocore operation name, several, or ``"*"`` for any.
        key: a glob (``fnmatch``) on the unquoted URL path, e.g. ``"*/_metadata"``.
        status: HTTP status of an explicit error response.
        code: S3 error code of an explicit error response.
        after: let this many matching requests through first.
        times: answer at most this many (``None``: every matching request).
        probability: chance per eligible request, from the injector's seeded generator.
        delay: seconds to wait before the fault (keeps a request in flight; ``SLOW``: the whole effect).
    """

    fault: Fault | None = None
    operations: str | AbstractSet[str] = "*"
    key: str = "*"
    status: int | None = None
    code: str | None = None
    after: int = 0
    times: int | None = None
    probability: float = 1.0
    delay: float = 0.0

    def __post_init__(self) -> None:
        self._check_schedule()
        if (self.fault is None) == (self.status is None or self.code is None):
            raise ValueError("give either a fault or both status and code")

    def matches(self, operation: str, path: str) -> bool:
        assert isinstance(self.operations, frozenset)
        return ("*" in self.operations or operation in self.operations) and fnmatch.fnmatchcase(path, self.key)


@dataclass(frozen=True)
class InjectedS3Fault:
    rule: int
    operation: str
    path: str
    what: str


class S3FaultInjector:
    """A botocore ``before-send`` hook that answers requests by rules (first firing rule wins).

    Args:
        rules: the rules.
        seed: seeds the generator behind ``probability``.
    """

    def __init__(self, rules: Iterable[S3FaultRule] = (), *, seed: int = 0) -> None:
        self.rules = list(rules)
        self._counters = [RuleCounter() for _ in self.rules]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._session: URLLib3Session | None = None
        self.attempts: list[Any] = []
        """Every request that matched some rule's operation and key, injected or let through."""
        self.injected: list[InjectedS3Fault] = []

    def install(self, client: Any) -> S3FaultInjector:
        """Register on a boto3 S3 client (``store.client`` of an ``S3ObjectStore``); returns self."""
        client.meta.events.register("before-send.s3", self)
        return self

    def uninstall(self, client: Any) -> None:
        client.meta.events.unregister("before-send.s3", self)

    def add(self, rule: S3FaultRule) -> None:
        with self._lock:
            self.rules.append(rule)
            self._counters.append(RuleCounter())

    def _send(self, request: Any) -> None:
        """Send the request to the real server and drop the answer (the request is applied)."""
        with self._lock:
            if self._session is None:
                self._session = URLLib3Session()
            session = self._session
        response = session.send(request)
        _ = response.content
        if hasattr(request, "reset_stream"):
            request.reset_stream()

    def __call__(self, request: Any, event_name: str = "", **_: Any) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        path = unquote(urlsplit(request.url).path)
        with self._lock:
            chosen: tuple[int, S3FaultRule] | None = None
            matched = False
            for index, (rule, counter) in enumerate(zip(self.rules, self._counters, strict=True)):
                if not rule.matches(operation, path):
                    continue
                matched = True
                if not counter.fires(rule, self._rng):
                    continue
                chosen = index, rule
                break
            if matched:
                self.attempts.append(request)
            if chosen is not None:
                what = chosen[1].fault.value if chosen[1].fault is not None else f"{chosen[1].status} {chosen[1].code}"
                self.injected.append(InjectedS3Fault(chosen[0], operation, path, what))
        if chosen is None:
            return None
        rule = chosen[1]
        if rule.delay:
            time.sleep(rule.delay)
        if rule.fault is None:
            assert rule.status is not None
            assert rule.code is not None
            return s3_error_response(request, rule.status, rule.code)
        if rule.fault in _STATUS:
            return s3_error_response(request, *_STATUS[rule.fault])
        if rule.fault is Fault.CONNECTION_RESET:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)
        if rule.fault is Fault.TIMEOUT_AFTER_WRITE:
            self._send(request)
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=request.url)
        if rule.fault is Fault.CRASH:
            kill_process()
        return None  # SLOW: the delay was the fault
