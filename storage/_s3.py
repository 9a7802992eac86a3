"""Object store on S3 (or any S3-compatible endpoint), through boto3 only.

* Create-only writes use ``put_object(IfNoneMatch="*")`` and, for large objects,
  ``complete_multipart_upload(IfNoneMatch="*")``; HTTP 412 becomes ``AlreadyExistsError``.
* Streams larger than one part are uploaded as multipart uploads, several parts in flight at once;
  nothing is visible until the upload completes, and an aborted writer aborts the upload.
* Throttling (503 SlowDown), 5xx and connection errors are retried within botocore's ``standard`` retry
  mode with exponential backoff and jitter (``max_attempts`` in total), bounded by a total time per
  request when a timeout is set (``timeout=`` or ``KEYSTATE_S3_TIMEOUT``): no retry starts after it.
  The first retry of an outage is logged once as a WARNING ("S3 endpoint ... unreachable; retrying put
  .../_metadata (attempt 2 of 10, 0.1 s so far)"), not once per attempt; the next success ends the
  outage. What is left after the retries is mapped onto the keystate error tree with a message that
  says what to do.
* The endpoint comes from ``endpoint_url`` if given, else from boto3's own configuration, which
  honours ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import boto3
import botocore.config
import botocore.exceptions

from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode, join_key, validate_key
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

__all__ = ["TIMEOUT_ENV", "S3ObjectStore", "make_s3_client", "s3_timeout_from_env"]

log = logging.getLogger(__name__)

TIMEOUT_ENV = "KEYSTATE_S3_TIMEOUT"
"""Environment variable: seconds one S3 request may take with all its retries (see :func:`make_s3_client`)."""

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000

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
        base = 1.0 if throttled else 0.05
        delay = random.random() * min(base * 2.0 ** (attempts - 1), 20.0)
        if attempts >= self.max_attempts or (self.deadline is not None and self.deadline - elapsed <= delay):
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


class S3ObjectStore(ObjectStore):
    """Objects under ``s3://bucket/prefix``. Throttling, 5xx and connection errors are retried by
    botocore (``retries_transient_errors``).

    Args:
        bucket: the bucket name.
        prefix: the key prefix the store is rooted at (no leading or trailing ``/``).
        client: a boto3 S3 client; by default one from :func:`make_s3_client`.
        endpoint_url: passed to :func:`make_s3_client` when ``client`` is not given.
        part_size: multipart part size in bytes (at least 5 MiB).
        upload_concurrency: parts of one stream uploaded at once.
    """

    retries_transient_errors = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        upload_concurrency: int = 4,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes")
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        if self._prefix:
            validate_key(self._prefix)
        self._client = client if client is not None else make_s3_client(endpoint_url=endpoint_url)
        self._part_size = part_size
        self._concurrency = max(1, upload_concurrency)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.describe()!r})"

    @property
    def client(self) -> Any:
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    def describe(self, key: str = "") -> str:
        return f"s3://{self._bucket}/{join_key(self._prefix, key)}"

    def _key(self, key: str) -> str:
        return join_key(self._prefix, validate_key(key))

    def _dir(self, prefix: str) -> str:
        full = join_key(self._prefix, validate_key(prefix) if prefix else "")
        return f"{full}/" if full else ""

    def executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._concurrency * 4, thread_name_prefix="keystate-s3")
            return self._executor

    def close(self) -> None:
        """Stop the upload threads (the store stays usable; they restart on demand)."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def fail(self, exc: Exception, action: str, key: str) -> NoReturn:
        """Translate a boto3/botocore exception into the keystate error tree (always raises)."""
        where = self.describe(key)
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.get("Message") or code
            if code == "NoSuchBucket":
                raise BucketNotFoundError(
                    f"cannot {action} {where}: bucket {self._bucket!r} does not exist; create it or fix the URI"
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

    # --- reads ---------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        try:
            body = self._client.get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.fail(exc, "read", key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            self.size(key)  # still report a missing object
            return b""
        try:
            resp = self._client.get_object(
                Bucket=self._bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
            return bytes(resp["Body"].read())
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            self.fail(exc, "read", key)
        except botocore.exceptions.BotoCoreError as exc:
            self.fail(exc, "read", key)

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key(key)}
        if start:
            kwargs["Range"] = f"bytes={start}-"
        try:
            body = self._client.get_object(**kwargs)["Body"]
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                import io

                return io.BytesIO(b"")
            self.fail(exc, "read", key)
        except botocore.exceptions.BotoCoreError as exc:
            self.fail(exc, "read", key)
        return _S3Reader(self, key, body)

    def size(self, key: str) -> int:
        try:
            return int(self._client.head_object(Bucket=self._bucket, Key=self._key(key))["ContentLength"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.fail(exc, "stat", key)

    def check_bucket(self) -> None:
        """Raise a clear error if the bucket is missing, unreachable or not accessible."""
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404:
                raise BucketNotFoundError(
                    f"bucket {self._bucket!r} does not exist ({self.describe()}); create it or fix the URI"
                ) from exc
            self.fail(exc, "access", "")
        except botocore.exceptions.BotoCoreError as exc:
            self.fail(exc, "access", "")

    # --- writes --------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key(key), "Body": data}
        if mode is PutMode.CREATE:
            kwargs["IfNoneMatch"] = "*"
        try:
            self._client.put_object(**kwargs)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.fail(exc, "write", key)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        validate_key(key)
        return _S3Writer(self, key, mode, self._part_size, self._concurrency)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self._bucket, Key=self._key(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            try:
                self.fail(exc, "delete", key)
            except NotFoundError:
                return

    def delete_many(self, keys: Any) -> None:
        batch: list[dict[str, str]] = []
        for key in keys:
            batch.append({"Key": self._key(key)})
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        try:
            resp = self._client.delete_objects(Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.fail(exc, "delete", batch[0]["Key"][len(self._prefix) + 1 if self._prefix else 0 :])
        errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            raise StorageError(
                f"cannot delete s3://{self._bucket}/{first.get('Key')}: {first.get('Code')}: "
                f"{first.get('Message')} ({len(errors)} of {len(batch)} deletes failed)"
            )

    # --- listing -------------------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._dir(prefix)
        strip = len(self._prefix) + 1 if self._prefix else 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=base)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=obj["Key"][strip:], size=int(obj["Size"]))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.fail(exc, "list", prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._dir(prefix)
        names: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    name = cp["Prefix"][len(base) :].rstrip("/")
                    if name and not name.startswith("."):
                        names.append(name)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.fail(exc, "list", prefix)
        return sorted(names)


class _S3Reader:
    """A GET body whose read errors (a dropped or truncated response) are mapped like every S3 error."""

    def __init__(self, store: S3ObjectStore, key: str, body: Any) -> None:
        self._store = store
        self._key = key
        self._body = body

    def read(self, size: int = -1, /) -> bytes:
        try:
            return bytes(self._body.read(None if size < 0 else size))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self._store.fail(exc, "read", self._key)

    def close(self) -> None:
        self._body.close()


class _S3Writer(ObjectWriter):
    """Buffers one part; past one part it switches to a multipart upload with parts in flight."""

    def __init__(self, store: S3ObjectStore, key: str, mode: PutMode, part_size: int, concurrency: int) -> None:
        self._store = store
        self._key = key
        self._s3key = store._key(key)
        self._mode = mode
        self._part_size = part_size
        self._concurrency = concurrency
        self._buf = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._closed = False
        self._completed = False

    @property
    def bytes_written(self) -> int:
        return self._written

    def write(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise StorageError(f"write to {self._store.describe(self._key)} after close or abort")
        self._buf += data
        self._written += len(data)
        while len(self._buf) >= self._part_size:
            chunk = bytes(self._buf[: self._part_size])
            del self._buf[: self._part_size]
            self._submit_part(chunk)

    def _submit_part(self, chunk: bytes) -> None:
        client = self._store.client
        if self._upload_id is None:
            try:
                resp = client.create_multipart_upload(Bucket=self._store.bucket, Key=self._s3key)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                self._closed = True
                self._store.fail(exc, "write", self._key)
            self._upload_id = str(resp["UploadId"])
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            self.abort()
            raise StorageError(
                f"{self._store.describe(self._key)}: stream exceeds {MAX_PARTS} parts of {self._part_size} "
                "bytes; raise the part size"
            )
        # Bound the memory held by parts in flight.
        in_flight = [f for f in self._parts if not f.done()]
        if len(in_flight) >= self._concurrency:
            try:
                in_flight[0].result()
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                self.abort()
                self._store.fail(exc, "write", self._key)
        upload_id = self._upload_id
        self._parts.append(self._store.executor().submit(self._upload_part, upload_id, number, chunk))

    def _upload_part(self, upload_id: str, number: int, chunk: bytes) -> dict[str, Any]:
        resp = self._store.client.upload_part(
            Bucket=self._store.bucket, Key=self._s3key, UploadId=upload_id, PartNumber=number, Body=chunk
        )
        return {"ETag": resp["ETag"], "PartNumber": number}

    def close(self) -> None:
        if self._closed:
            if self._completed:
                return
            raise StorageError(
                f"{self._store.describe(self._key)}: the write was aborted or failed; nothing is visible"
            )
        if self._upload_id is None:
            self._closed = True
            self._store.put(self._key, bytes(self._buf), self._mode)
            self._buf = bytearray()
            self._completed = True
            return
        try:
            if self._buf:
                self._submit_part(bytes(self._buf))
                self._buf = bytearray()
            parts = [f.result() for f in self._parts]
            kwargs: dict[str, Any] = {
                "Bucket": self._store.bucket,
                "Key": self._s3key,
                "UploadId": self._upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if self._mode is PutMode.CREATE:
                kwargs["IfNoneMatch"] = "*"
            self._store.client.complete_multipart_upload(**kwargs)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self.abort()
            self._store.fail(exc, "write", self._key)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._completed = True

    def abort(self) -> None:
        if self._completed:
            return  # the object is complete: nothing to discard
        self._closed = True
        self._buf = bytearray()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        for f in self._parts:
            f.cancel()
        for f in self._parts:
            if not f.cancelled():
                with contextlib.suppress(Exception):  # the upload is being aborted anyway
                    f.result()
        try:
            self._store.client.abort_multipart_upload(Bucket=self._store.bucket, Key=self._s3key, UploadId=upload_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            # Best effort: an unfinished upload is invisible and a bucket lifecycle rule reaps it.
            return
