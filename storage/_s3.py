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
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import botocore.config
import botocore.exceptions

from keystate.storage._s3_client import TIMEOUT_ENV, make_s3_client, raise_storage_error, s3_timeout_from_env
from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode, join_key, validate_key
from keystate.storage.errors import (
    BucketNotFoundError,
    NotFoundError,
    StorageError,
)

__all__ = ["TIMEOUT_ENV", "S3ObjectStore", "make_s3_client", "s3_timeout_from_env"]

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000


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
        raise_storage_error(exc, action, self.describe(key), self._bucket)

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
