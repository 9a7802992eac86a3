"""The boto3 S3 client keystate uses, its bounded and reported retries, and the mapping of boto3's errors
onto the keystate error tree (for :mod:`keystate.storage._s3`).

* Throttling (503 SlowDown), 5xx and connection errors are retried within botocore's ``standard`` retry
  mode with exponential backoff and jitter (``max_attempts`` in total), bounded by a total time per
  request when a timeout is set (``timeout=`` or ``KEYSTATE_S3_TIMEOUT``): no retry starts after it.
* The first retry of an outage is logged once as a WARNING, not once per attempt; the next success ends
  the outage.
* What is left after the retries is mapped onto the keystate error tree with a message that says what to
  do (:func:`raise_storage_error`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from typing import Any, NoReturn

import boto3
import botocore.config
import botocore.exceptions

from keystate.storage.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    CredentialsError,
    NotFoundError,
    RequestOutcomeUnknownError,
    StorageAccessDeniedError,
    StorageError,
    StorageUnavailableError,
)

__all__ = ["TIMEOUT_ENV", "backoff_delay", "make_s3_client", "raise_storage_error", "s3_timeout_from_env"]

log = logging.getLogger(__name__)

TIMEOUT_ENV = "KEYSTATE_S3_TIMEOUT"
"""Environment variable: seconds one S3 request may take with all its retries (see :func:`make_s3_client`)."""


_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken",
}  # fmt: skip
# The IAM permission each action needs (HeadObject needs s3:GetObject, HeadBucket s3:ListBucket).
_PERMISSION = {
    "read": "s3:GetObject", "stat": "s3:GetObject", "write": "s3:PutObject", "delete": "s3:DeleteObject",
    "list": "s3:ListBucket", "access": "s3:ListBucket",
}  # fmt: skip
_UNAVAILABLE = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
    "InternalError", "503", "500", "502", "504",
}  # fmt: skip


# What botocore's ``standard`` retry mode retries (botocore.retries.standard), for the decisions the
# retry watch below takes over: connection errors, these statuses and throttling codes.
_TRANSIENT_STATUS = {500, 502, 503, 504}
_THROTTLING = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException",
    "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
}  # fmt: skip
_VERBS = {
    "GetObject": "read", "HeadObject": "stat", "PutObject": "put", "DeleteObject": "delete",
    "DeleteObjects": "delete", "ListObjectsV2": "list", "HeadBucket": "access",
    "CreateMultipartUpload": "start the upload of", "UploadPart": "upload a part of",
    "CompleteMultipartUpload": "complete the upload of", "AbortMultipartUpload": "abort the upload of",
}  # fmt: skip


def s3_timeout_from_env() -> float | None:
    """``KEYSTATE_S3_TIMEOUT`` as seconds (``None`` if unset; a value that is not a positive number is
    ignored with a warning)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        log.warning("%s=%r is not a positive number of seconds; ignoring it", TIMEOUT_ENV, raw)
        return None
    return value


def backoff_delay(attempts: int, throttled: bool) -> float:
    """Seconds to wait before the retry after attempt ``attempts`` (1-based), as botocore's ``standard``
    mode computes them: full jitter over a base of 1 s when throttled, else 50 ms, doubling per attempt,
    at most 20 s. (Tests replace it to record the delays without sleeping them.)"""
    base = 1.0 if throttled else 0.05
    return random.random() * min(base * 2.0 ** (attempts - 1), 20.0)


class _RetryWatch:
    """botocore event handlers that bound and report the retries of one client's requests.

    ``before-parameter-build`` notes when a request (one API call, all its attempts) started and what it
    is about. ``needs-retry`` (registered first, so its answer wins) takes the retry decision for
    connection errors, 5xx and throttling: a backoff like botocore's standard mode (full jitter, base
    1 s when throttled, else 50 ms, at most 20 s), cut so that no attempt starts after the deadline, and
    ``False`` (no retry) once the deadline or the attempts are used up. Anything else is left to
    botocore. The first retry of an outage is logged as one WARNING; later ones at DEBUG, until a
    request succeeds.
    """

    def __init__(self, max_attempts: int, deadline: float | None) -> None:
        self.max_attempts = max_attempts
        self.deadline = deadline
        self._lock = threading.Lock()
        self._outage = False

    def register(self, client: Any) -> None:
        client.meta.events.register("before-parameter-build.s3", self.started)
        client.meta.events.register_first("needs-retry.s3", self.needs_retry)

    def started(self, params: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        context["keystate_started"] = time.monotonic()
        bucket, key = params.get("Bucket", ""), params.get("Key", params.get("Prefix", ""))
        context["keystate_target"] = f"s3://{bucket}/{key}" if bucket else ""

    def needs_retry(
        self,
        response: Any,
        operation: Any,
        attempts: int,
        caught_exception: BaseException | None,
        request_dict: dict[str, Any],
        **kwargs: Any,
    ) -> float | bool | None:
        status = 0
        code = ""
        if response is not None:
            status = int(getattr(response[0], "status_code", 0) or 0)
            code = str((response[1] or {}).get("Error", {}).get("Code", ""))
            if caught_exception is None and status < 400:
                with self._lock:
                    self._outage = False  # a success ends the outage: the next one is reported again
                return None
        if isinstance(caught_exception, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
            throttled = False
        elif caught_exception is None and (status in _TRANSIENT_STATUS or status == 429 or code in _THROTTLING):
            throttled = status == 429 or code in _THROTTLING
        else:
            return None  # not ours to decide: botocore's standard mode does
        context = request_dict.get("context", {})
        elapsed = time.monotonic() - context.get("keystate_started", time.monotonic())
        spent = attempts >= self.max_attempts
        delay = 0.0 if spent else backoff_delay(attempts, throttled)
        if spent or (self.deadline is not None and self.deadline - elapsed <= delay):
            # Out of attempts, or the next one would start after the deadline: give up. The error
            # message says how long the request was retried (S3ObjectStore.fail reads this).
            if caught_exception is not None:
                caught_exception.keystate_retried = (attempts, elapsed)
            return False
        with self._lock:
            first, self._outage = not self._outage, True
        if first:
            log.warning("%s; retrying %s %s (attempt %d of %d, %.1f s so far%s)",
                        self._what(request_dict, kwargs.get("endpoint"), caught_exception, status, code),
                        _VERBS.get(getattr(operation, "name", ""), "request"),
                        context.get("keystate_target") or getattr(operation, "name", "S3"),
                        attempts + 1, self.max_attempts, elapsed,
                        f"; giving up after {self.deadline:g} s" if self.deadline is not None else "")  # fmt: skip
        else:
            log.debug("retrying %s (attempt %d of %d) in %.3f s", getattr(operation, "name", "S3 request"),
                      attempts + 1, self.max_attempts, delay)  # fmt: skip
        return delay

    @staticmethod
    def _what(request_dict: dict[str, Any], endpoint: Any, exc: BaseException | None, status: int, code: str) -> str:
        url = str(request_dict.get("url") or getattr(endpoint, "host", "") or "")
        parts = url.split("/", 3)
        host = "/".join(parts[:3]) if len(parts) >= 3 and parts[0].endswith(":") else url or "S3"
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return f"S3 endpoint {host} did not answer in time"
        if isinstance(exc, botocore.exceptions.ConnectionClosedError):
            return f"S3 endpoint {host} dropped the connection"
        if exc is not None:
            return f"S3 endpoint {host} unreachable"
        if status == 429 or code in _THROTTLING:
            return f"S3 endpoint {host} is throttling requests ({code or status})"
        return f"S3 endpoint {host} failed with {status} {code}".rstrip()


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_attempts: int | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    timeout: float | None = None,
) -> Any:
    """Create a boto3 S3 client configured for checkpoint traffic.

    Args:
        endpoint_url: overrides the endpoint (else boto3's configuration and ``AWS_ENDPOINT_URL``).
        region: the region; ``None`` uses boto3's configuration.
        max_attempts: total attempts per request, including retries of throttling, 5xx and
            connection errors (botocore ``standard`` retry mode: exponential backoff with jitter);
            default: ``AWS_MAX_ATTEMPTS`` if set, else 10.
        connect_timeout: seconds to wait for a connection.
        read_timeout: seconds to wait for a response.
        timeout: seconds one request may take with all its retries: no retry starts after it, and
            ``connect_timeout`` and ``read_timeout`` are cut to it, so a request fails within about
            ``timeout`` (twice at worst, when its last attempt waits out a timeout). Default:
            ``KEYSTATE_S3_TIMEOUT`` if set, else only ``max_attempts`` bounds a request.

    Raises:
        ValueError: ``timeout`` is not positive.
        CredentialsError: the credentials configuration is incomplete.
    """
    if max_attempts is None:
        try:
            max_attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))
        except ValueError:
            max_attempts = 10
    if timeout is None:
        timeout = s3_timeout_from_env()
    elif not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, found {timeout}")
    if timeout is not None:
        connect_timeout = min(connect_timeout, timeout)
        read_timeout = min(read_timeout, timeout)
    config = botocore.config.Config(
        # botocore's "max_attempts" key counts retries after the first attempt; "total_max_attempts"
        # counts every attempt, which is what ``max_attempts`` promises.
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=32,
    )
    try:
        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)
    except (
        botocore.exceptions.PartialCredentialsError,
        botocore.exceptions.NoCredentialsError,
        botocore.exceptions.ProfileNotFound,
    ) as exc:
        # Partial credentials and a missing profile are found when the client is created, not on first use.
        raise CredentialsError(
            f"cannot create an S3 client: {exc}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an instance role"
        ) from exc
    _RetryWatch(max(1, max_attempts), timeout).register(client)
    return client


def raise_storage_error(exc: Exception, action: str, where: str, bucket: str) -> NoReturn:
    """Translate a boto3/botocore exception raised while trying to ``action`` ``where`` (an object of
    ``bucket``) into the keystate error tree (always raises)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = err.get("Message") or code
        if code == "NoSuchBucket":
            raise BucketNotFoundError(
                f"cannot {action} {where}: bucket {bucket!r} does not exist; create it or fix the URI"
            ) from exc
        if code in _NOT_FOUND or status == 404:
            raise NotFoundError(f"cannot {action} {where}: no such object") from exc
        if code in _DENIED or status == 403:
            raise StorageAccessDeniedError(
                f"cannot {action} {where}: access denied ({code}); check the credentials and the "
                f"bucket policy for {_PERMISSION.get(action, 's3:*')} permission"
            ) from exc
        if code == "PreconditionFailed" or status == 412:
            raise AlreadyExistsError(f"{where} already exists; a create-only write never replaces it") from exc
        if code in _UNAVAILABLE or status >= 500:
            raise StorageUnavailableError(
                f"cannot {action} {where}: S3 kept failing with {code} after retries; try again later"
            ) from exc
        raise StorageError(f"cannot {action} {where}: {code}: {message}") from exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        raise CredentialsError(
            f"cannot {action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
        ) from exc
    if isinstance(exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectionClosedError):
        raise RequestOutcomeUnknownError(
            f"cannot {action} {where}: no answer from S3 after the request was sent ({exc}); it may or may "
            "not have been applied"
        ) from exc
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.ConnectTimeoutError,
    ):
        retried = getattr(exc, "keystate_retried", None)
        tried = f" after {retried[0]} attempts in {retried[1]:.1f} s" if retried else ""
        raise StorageUnavailableError(
            f"cannot {action} {where}: S3 endpoint unreachable ({exc}){tried}; check the endpoint URL and network"
        ) from exc
    raise StorageError(f"cannot {action} {where}: {exc}") from exc
