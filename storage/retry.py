"""Retries of transient storage failures for stores that do not retry on their own.

Where retries live:

* **S3**: botocore's ``standard`` retry mode retries every request (``S3ObjectStore`` says so with
  ``retries_transient_errors = True``); nothing is added on top.
* **Every other store** (local disk, memory, a :class:`~keystate.storage.faults.FaultyObjectStore`, your own):
  :class:`RetryingObjectStore` retries ``StorageUnavailableError`` the way botocore does, with
  exponential backoff and jitter, ``RetryPolicy.max_attempts`` attempts in total. The runtime wraps
  its checkpoint store and the file sink's store in it (``CheckpointConfig.retry``).

What is retried and how:

* reads, listings, deletes and overwriting puts are idempotent: retried on any
  ``StorageUnavailableError``, including ``RequestOutcomeUnknownError``;
* a **create-only put** is never retried blindly. After an attempt whose outcome is unknown
  (``RequestOutcomeUnknownError``: it may have landed), a retry that finds the key taken reads the
  object back: identical bytes mean the earlier attempt landed, and the put succeeded (the
  *identical-bytes rule* of ``CheckpointWriter.commit``, docs/format.md section 2); different bytes
  raise ``AlreadyExistsError``. If every attempt failed and one of them may have landed, the error is
  ``RequestOutcomeUnknownError``, so the commit above reports an unknown outcome, never a failure;
* a streaming writer's ``write`` is retried only after an error that applied nothing (a
  ``RequestOutcomeUnknownError`` mid-stream may have appended the chunk: retrying could duplicate
  it); ``close`` is retried on any ``StorageUnavailableError`` and a retried close is verified: the
  object must exist with every byte written, else the first error is raised.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode
from keystate.storage.errors import (
    AlreadyExistsError,
    RequestOutcomeUnknownError,
    StorageError,
    StorageUnavailableError,
)

__all__ = ["RetryPolicy", "RetryingObjectStore", "with_retries"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, as botocore's ``standard`` mode.

    Attributes:
        max_attempts: attempts in total, the first included (1: no retry).
        initial_backoff: seconds before the first retry (the upper bound when jittered).
        max_backoff: cap of one backoff.
        multiplier: growth of the backoff per retry.
        jitter: draw each backoff uniformly from ``0 .. backoff`` (spreads retries of many callers).
        deadline: seconds one call may take with all its retries (``None``: only ``max_attempts``
            bounds it). No retry starts once it has passed, and a backoff is cut to what is left, so
            a call fails within ``deadline`` plus the duration of its last attempt.

    The first retry of a call is logged as a WARNING (what is retried, the attempt, the time so far);
    later retries of the same call at INFO: one line per failing call, not one per attempt.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: bool = True
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, found {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be non-negative and the multiplier at least 1")
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(f"deadline must be positive seconds or None, found {self.deadline}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return random.uniform(0.0, bound) if self.jitter else bound

    def call(self, fn: Callable[[], T], what: str, *, retry_unknown: bool = True) -> T:
        """Run ``fn``, retrying ``StorageUnavailableError`` (and, if ``retry_unknown``, its subclass
        ``RequestOutcomeUnknownError``); the last error is raised when the attempts or the deadline
        are used up."""
        attempt = 1
        started = time.monotonic()
        while True:
            try:
                return fn()
            except RequestOutcomeUnknownError as exc:
                if not retry_unknown or not self._pause(attempt, what, started, exc):
                    raise
            except StorageUnavailableError as exc:
                if not self._pause(attempt, what, started, exc):
                    raise
            attempt += 1

    def _pause(self, attempt: int, what: str, started: float, error: BaseException) -> bool:
        """Sleep before attempt ``attempt + 1`` of a call that started at ``started`` (monotonic) and
        return ``True``; ``False`` (at once) when no attempt is left or the deadline has passed."""
        if attempt >= self.max_attempts:
            return False
        delay = self.backoff(attempt)
        elapsed = time.monotonic() - started
        if self.deadline is not None:
            left = self.deadline - elapsed
            if left <= 0:
                return False
            delay = min(delay, left)
        if attempt == 1:
            limit = f"; giving up after {self.deadline:g} s" if self.deadline is not None else ""
            log.warning("%s failed (%s); retrying (attempt %d of %d, %.1f s so far%s)",
                        what, error, attempt + 1, self.max_attempts, elapsed, limit)  # fmt: skip
        else:
            log.info("%s failed transiently (attempt %d of %d); retrying in %.3f s",
                     what, attempt, self.max_attempts, delay)  # fmt: skip
        time.sleep(delay)
        return True


def with_retries(store: ObjectStore, policy: RetryPolicy | None) -> ObjectStore:
    """``store`` wrapped in a :class:`RetryingObjectStore`, unless it retries on its own or ``policy`` is ``None``."""
    if policy is None or store.retries_transient_errors or policy.max_attempts == 1:
        return store
    return RetryingObjectStore(store, policy)


class RetryingObjectStore(ObjectStore):
    """Retries transient failures of another store (see the module docstring for what and how).

    Args:
        inner: the store whose calls are retried.
        policy: attempts and backoff.
    """

    retries_transient_errors = True

    def __init__(self, inner: ObjectStore, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()

    def __repr__(self) -> str:
        return f"RetryingObjectStore({self.inner!r})"

    def __deepcopy__(self, memo: dict[int, object]) -> RetryingObjectStore:
        return self

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def get(self, key: str) -> bytes:
        return self.policy.call(lambda: self.inner.get(key), f"read {self.describe(key)}")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.policy.call(lambda: self.inner.get_range(key, start, length), f"read {self.describe(key)}")

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        return self.policy.call(lambda: self.inner.open_reader(key, start), f"read {self.describe(key)}")

    def size(self, key: str) -> int:
        return self.policy.call(lambda: self.inner.size(key), f"stat {self.describe(key)}")

    def exists(self, key: str) -> bool:
        return self.policy.call(lambda: self.inner.exists(key), f"stat {self.describe(key)}")

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        what = f"write {self.describe(key)}"
        if mode is PutMode.OVERWRITE:
            self.policy.call(lambda: self.inner.put(key, data, mode), what)
            return
        uncertain: RequestOutcomeUnknownError | None = None
        attempt = 1
        started = time.monotonic()
        while True:
            try:
                self.inner.put(key, data, mode)
            except AlreadyExistsError:
                if uncertain is None:
                    raise
                # An earlier attempt may have landed: identical bytes say it did (identical-bytes rule).
                if self.get(key) == data:
                    log.info("%s: an earlier attempt landed (identical bytes); the create succeeded", what)
                    return
                raise
            except RequestOutcomeUnknownError as exc:
                uncertain = exc
                last: StorageUnavailableError = exc
            except StorageUnavailableError as exc:
                last = exc
            else:
                return
            if not self.policy._pause(attempt, what, started, last):
                if uncertain is not None and last is not uncertain:
                    raise RequestOutcomeUnknownError(
                        f"{what}: every attempt failed, and an earlier one may have landed ({uncertain}); last: {last}"
                    ) from last
                raise last
            attempt += 1

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        inner = self.policy.call(lambda: self.inner.open_writer(key, mode), f"write {self.describe(key)}")
        return _RetryingWriter(self, inner, key)

    def delete(self, key: str) -> None:
        self.policy.call(lambda: self.inner.delete(key), f"delete {self.describe(key)}")

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.policy.call(lambda: self.inner.delete_many(keys), f"delete {len(keys)} objects")

    def delete_prefix(self, prefix: str) -> None:
        self.policy.call(lambda: self.inner.delete_prefix(prefix), f"delete {self.describe(prefix)}")

    def remove_empty_dirs(self, prefix: str) -> None:
        self.policy.call(lambda: self.inner.remove_empty_dirs(prefix), f"delete {self.describe(prefix)}")

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(self.policy.call(lambda: list(self.inner.list_objects(prefix)), f"list {self.describe(prefix)}"))

    def list_dirs(self, prefix: str) -> list[str]:
        return self.policy.call(lambda: self.inner.list_dirs(prefix), f"list {self.describe(prefix)}")


class _RetryingWriter(ObjectWriter):
    def __init__(self, store: RetryingObjectStore, inner: ObjectWriter, key: str) -> None:
        self._store = store
        self._inner = inner
        self._key = key

    @property
    def bytes_written(self) -> int:
        return self._inner.bytes_written

    def flush(self) -> None:
        flush = getattr(self._inner, "flush", None)
        if callable(flush):
            flush()

    def _retry(self, call: Callable[[], None], first: StorageUnavailableError, *, unknown: bool) -> None:
        """Retry a writer call that failed with ``first``; a retry that fails for another reason (the
        inner writer gave up and aborted itself) raises ``first``, the cause that matters."""
        policy, what = self._store.policy, f"write {self._store.describe(self._key)}"
        started = time.monotonic()
        for attempt in range(1, policy.max_attempts):
            if not policy._pause(attempt, what, started, first):
                break
            try:
                call()
            except RequestOutcomeUnknownError as exc:
                if not unknown:
                    raise
                first = exc
            except StorageUnavailableError as exc:
                first = exc
            except StorageError as exc:
                raise first from exc
            else:
                return
        raise first

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._inner.write(data)
        except RequestOutcomeUnknownError:
            raise  # the chunk may have been appended: never written twice
        except StorageUnavailableError as exc:
            self._retry(lambda: self._inner.write(data), exc, unknown=False)

    def close(self) -> None:
        expected = self._inner.bytes_written
        try:
            self._inner.close()
        except StorageUnavailableError as exc:
            first = exc
            self._retry(self._inner.close, exc, unknown=True)
        else:
            return
        # A retried close said yes: believe it only if the whole object is there.
        try:
            size = self._store.size(self._key)
        except StorageError as exc:
            raise first from exc
        if size != expected:
            raise StorageError(
                f"{self._store.describe(self._key)}: a retried close reported success but the object holds {size} "
                f"bytes, not the {expected} written ({first})"
            ) from first

    def abort(self) -> None:
        self._inner.abort()
