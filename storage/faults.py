"""Fault injection for object stores: S3-style failures on chosen calls of any :class:`ObjectStore`.

:class:`FaultyObjectStore` wraps a store (local, memory, S3 or your own) and, while no rule fires,
behaves exactly like it (it passes the same contract tests). Each :class:`FaultRule` picks calls by
operation name, key glob, put mode, the n-th matching call, a count and a probability drawn from the
store's seeded random generator, and injects one :class:`Fault`:

=========================  ==================================================================  ============
fault                      what the caller sees                                                applied?
=========================  ==================================================================  ============
``THROTTLE``               ``StorageUnavailableError`` (S3 503 SlowDown after retries)          no
``INTERNAL_ERROR``         ``StorageUnavailableError`` (S3 500 InternalError)                   no
``CONNECTION_RESET``       ``RequestOutcomeUnknownError`` (the connection dropped mid-request)  no
``TIMEOUT_AFTER_WRITE``    ``RequestOutcomeUnknownError`` after the call was performed          yes
``SLOW``                   nothing: the call sleeps ``delay`` seconds first, then proceeds      yes
``CRASH``                  nothing: the process is SIGKILLed in the middle of the call          partly
=========================  ==================================================================  ============

Operations are the store's method names (``get``, ``get_range``, ``open_reader``, ``size``,
``exists``, ``put``, ``open_writer``, ``delete``, ``delete_many``, ``delete_prefix``,
``list_objects``, ``list_dirs``) and, for streaming writes, ``write`` and ``close`` of the writer
``open_writer`` returned. A ``CRASH`` of a ``put`` hands half the bytes to the store's streaming
writer first (a half-written temp file on local disk), a ``write`` passes half its chunk on, a
``close`` dies before completing the object (an unfinished multipart upload on S3).

::

    store = FaultyObjectStore(LocalObjectStore(root), seed=7)
    store.add(FaultRule(Fault.THROTTLE, "put", key="*/_metadata", times=2))     # two 503s, then fine
    store.add(FaultRule(Fault.TIMEOUT_AFTER_WRITE, "close", key="*.ksf", probability=0.1))

Every injected fault is recorded in :attr:`FaultyObjectStore.injected`. Transient faults are not
retried here: wrap the faulty store in :class:`keystate.storage.retry.RetryingObjectStore` (the runtime does
that for stores that do not retry on their own) to see them retried.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

from keystate.storage.base import ObjectInfo, ObjectReader, ObjectStore, ObjectWriter, PutMode
from keystate.storage.errors import RequestOutcomeUnknownError, StorageUnavailableError

__all__ = [
    "OPERATIONS",
    "Fault",
    "FaultRule",
    "FaultyObjectStore",
    "InjectedFault",
    "RuleCounter",
    "RuleSchedule",
    "kill_process",
]

log = logging.getLogger(__name__)

OPERATIONS = frozenset(
    {
        "get", "get_range", "open_reader", "size", "exists", "put", "open_writer", "write", "close",
        "delete", "delete_many", "delete_prefix", "list_objects", "list_dirs",
    }
)  # fmt: skip
"""Operation names a rule can match: the store's methods and the streaming writer's ``write``/``close``."""

_WRITES = frozenset({"put", "open_writer", "write", "close", "delete", "delete_many", "delete_prefix"})


def kill_process() -> NoReturn:
    """SIGKILL this process at once (no cleanup, no ``finally``), after flushing stdout and stderr so a
    parent reading them sees every line printed before the kill."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not kill the process")  # unreachable


class Fault(Enum):
    """What a rule injects (see the module docstring's table)."""

    THROTTLE = "throttle"
    INTERNAL_ERROR = "internal_error"
    CONNECTION_RESET = "connection_reset"
    TIMEOUT_AFTER_WRITE = "timeout_after_write"
    SLOW = "slow"
    CRASH = "crash"


class RuleSchedule:
    """When a rule that matches a call fires: the part of a rule :class:`FaultRule` and
    :class:`keystate.storage.s3faults.S3FaultRule` share. Subclasses are frozen dataclasses declaring these fields
    (see :class:`FaultRule` for their meaning) and call :meth:`_check_schedule` from ``__post_init__``."""

    operations: str | AbstractSet[str]
    after: int
    times: int | None
    probability: float
    delay: float

    def _check_schedule(self) -> frozenset[str]:
        """Turn ``operations`` into a frozenset (returned) and check the schedule's numbers.

        Raises:
            ValueError: ``after``, ``times`` or ``delay`` is negative, or ``probability`` is not in 0..1.
        """
        ops = frozenset({self.operations}) if isinstance(self.operations, str) else frozenset(self.operations)
        object.__setattr__(self, "operations", ops)
        if self.after < 0 or (self.times is not None and self.times < 0) or self.delay < 0:
            raise ValueError("after, times and delay must be non-negative")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in 0..1, found {self.probability}")
        return ops


class RuleCounter:
    """How many calls one rule matched and how many of them it failed, in one injector."""

    __slots__ = ("fired", "seen")

    def __init__(self) -> None:
        self.seen = 0
        self.fired = 0

    def fires(self, rule: RuleSchedule, rng: random.Random) -> bool:
        """Count one more matching call; whether ``rule`` fires on it (``after``, ``times``, then
        ``probability``, drawn from ``rng``)."""
        self.seen += 1
        if self.seen <= rule.after or (rule.times is not None and self.fired >= rule.times):
            return False
        if rule.probability < 1.0 and rng.random() >= rule.probability:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class FaultRule(RuleSchedule):
    """Which calls fail, and how.

    Attributes:
        fault: what to inject.
        operations: one operation name or several (see :data:`OPERATIONS`).
        key: a glob (``fnmatch``; ``*`` also matches ``/``) on the key relative to the store root;
            for ``delete_many`` any of the keys may match, for listings the prefix.
        mode: only writes with this put mode (``None``: any); applies to ``put``, ``open_writer``,
            ``write`` and ``close``.
        after: let this many matching calls through before the rule may fire (``after=2``: the
            third matching call is the first that can fail).
        times: fire at most this many times (``None``: every time).
        probability: chance that an eligible call fails, drawn from the store's seeded generator.
        delay: seconds to sleep before the fault (for ``SLOW``, the whole effect).
    """

    fault: Fault
    operations: str | AbstractSet[str]
    key: str = "*"
    mode: PutMode | None = None
    after: int = 0
    times: int | None = None
    probability: float = 1.0
    delay: float = 0.0

    def __post_init__(self) -> None:
        ops = self._check_schedule()
        unknown = sorted(ops - OPERATIONS)
        if not ops or unknown:
            raise ValueError(f"unknown fault operation(s) {unknown or '(none)'}; use some of {sorted(OPERATIONS)}")

    def matches(self, operation: str, keys: tuple[str, ...], mode: PutMode | None) -> bool:
        assert isinstance(self.operations, frozenset)
        if operation not in self.operations:
            return False
        if self.mode is not None and mode is not None and mode is not self.mode:
            return False
        return any(fnmatch.fnmatchcase(k, self.key) for k in keys)


@dataclass(frozen=True)
class InjectedFault:
    """One fault that fired: the rule's position in :attr:`FaultyObjectStore.rules`, the call and key."""

    rule: int
    fault: Fault
    operation: str
    key: str


class FaultyObjectStore(ObjectStore):
    """An :class:`ObjectStore` that injects faults by rules into the calls of another one.

    Args:
        inner: the store that does the real work.
        rules: the initial rules (more with :meth:`add`); the first rule that fires wins.
        seed: seeds the generator behind ``probability`` (runs with one seed inject the same faults
            into the same sequence of calls).
    """

    retries_transient_errors = False

    def __init__(self, inner: ObjectStore, rules: Iterable[FaultRule] = (), *, seed: int = 0) -> None:
        self.inner = inner
        self.rules: list[FaultRule] = []
        self._counters: list[RuleCounter] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: list[InjectedFault] = []
        """Every fault that fired, in order."""
        for rule in rules:
            self.add(rule)

    def __repr__(self) -> str:
        return f"FaultyObjectStore({self.inner!r}, {len(self.rules)} rules)"

    def __deepcopy__(self, memo: dict[int, object]) -> FaultyObjectStore:
        return self  # one store, shared by every copy of an operator that holds it

    # --- rules ---------------------------------------------------------------------------------------

    def add(self, rule: FaultRule) -> FaultRule:
        """Arm another rule (thread-safe); returns it."""
        with self._lock:
            self.rules.append(rule)
            self._counters.append(RuleCounter())
        return rule

    def clear(self) -> None:
        """Disarm every rule; the store behaves like ``inner`` from now on (the record is kept)."""
        with self._lock:
            self.rules.clear()
            self._counters.clear()

    def count(self, fault: Fault | None = None, operation: str | None = None) -> int:
        """How many injected faults match (``None``: any)."""
        with self._lock:
            return sum(
                1
                for f in self.injected
                if (fault is None or f.fault is fault) and (operation is None or f.operation == operation)
            )

    def _pick(self, operation: str, keys: tuple[str, ...], mode: PutMode | None) -> Fault | None:
        with self._lock:
            for index, (rule, counter) in enumerate(zip(self.rules, self._counters, strict=True)):
                if not rule.matches(operation, keys, mode) or not counter.fires(rule, self._rng):
                    continue
                key = next((k for k in keys if fnmatch.fnmatchcase(k, rule.key)), keys[0])
                self.injected.append(InjectedFault(index, rule.fault, operation, key))
                delay = rule.delay
                fault = rule.fault
                break
            else:
                return None
        log.debug("injecting %s into %s %s", fault.value, operation, key)
        if delay:
            time.sleep(delay)
        return None if fault is Fault.SLOW else fault

    def _fail(self, fault: Fault, operation: str, key: str) -> NoReturn:
        """Raise what a store raises for ``fault`` (``TIMEOUT_AFTER_WRITE``: after the caller performed the call)."""
        action = "write" if operation in _WRITES else "read" if operation != "list_dirs" else "list"
        where = self.describe(key)
        if fault is Fault.THROTTLE:
            raise StorageUnavailableError(
                f"cannot {action} {where}: S3 kept failing with SlowDown (injected 503) after retries; try again later"
            )
        if fault is Fault.INTERNAL_ERROR:
            raise StorageUnavailableError(
                f"cannot {action} {where}: S3 kept failing with InternalError (injected 500) after retries; "
                "try again later"
            )
        if fault is Fault.CONNECTION_RESET:
            raise RequestOutcomeUnknownError(
                f"cannot {action} {where}: connection reset by peer (injected) after the request was sent; it may "
                "or may not have been applied"
            )
        if fault is Fault.TIMEOUT_AFTER_WRITE:
            raise RequestOutcomeUnknownError(
                f"cannot {action} {where}: read timeout (injected) after the request was sent; it may or may not "
                "have been applied"
            )
        raise AssertionError(f"{fault} is not an error")

    def _check(self, operation: str, key: str, mode: PutMode | None = None) -> Fault | None:
        """Inject a fault that happens before the call (raising), or return the one that happens after it."""
        fault = self._pick(operation, (key,), mode)
        if fault is None:
            return None
        if fault is Fault.CRASH:
            kill_process()
        if fault is Fault.TIMEOUT_AFTER_WRITE and operation in _WRITES:
            return fault  # perform the call, then fail
        return self._fail(fault, operation, key)

    # --- the ObjectStore contract --------------------------------------------------------------------

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def get(self, key: str) -> bytes:
        self._check("get", key)
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._check("get_range", key)
        return self.inner.get_range(key, start, length)

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        self._check("open_reader", key)
        return self.inner.open_reader(key, start)

    def size(self, key: str) -> int:
        self._check("size", key)
        return self.inner.size(key)

    def exists(self, key: str) -> bool:
        self._check("exists", key)
        return self.inner.exists(key)

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        fault = self._pick("put", (key,), mode)
        if fault is Fault.CRASH:
            writer = self.inner.open_writer(key, mode)
            writer.write(data[: len(data) // 2])
            _flush(writer)
            kill_process()
        if fault is not None and fault is not Fault.TIMEOUT_AFTER_WRITE:
            self._fail(fault, "put", key)
        self.inner.put(key, data, mode)
        if fault is not None:
            self._fail(fault, "put", key)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        fault = self._pick("open_writer", (key,), mode)
        if fault is Fault.CRASH:
            kill_process()
        if fault is not None:
            self._fail(Fault.CONNECTION_RESET if fault is Fault.TIMEOUT_AFTER_WRITE else fault, "open_writer", key)
        return _FaultyWriter(self, self.inner.open_writer(key, mode), key, mode)

    def delete(self, key: str) -> None:
        fault = self._check("delete", key)
        self.inner.delete(key)
        if fault is not None:
            self._fail(fault, "delete", key)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            self.inner.delete_many(keys)
            return
        fault = self._pick("delete_many", tuple(keys), None)
        if fault is Fault.CRASH:
            kill_process()
        if fault is not None and fault is not Fault.TIMEOUT_AFTER_WRITE:
            self._fail(fault, "delete_many", keys[0])
        self.inner.delete_many(keys)
        if fault is not None:
            self._fail(fault, "delete_many", keys[0])

    def delete_prefix(self, prefix: str) -> None:
        fault = self._check("delete_prefix", prefix)
        self.inner.delete_prefix(prefix)
        if fault is not None:
            self._fail(fault, "delete_prefix", prefix)

    def remove_empty_dirs(self, prefix: str) -> None:
        self.inner.remove_empty_dirs(prefix)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        self._check("list_objects", prefix)
        return self.inner.list_objects(prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        self._check("list_dirs", prefix)
        return self.inner.list_dirs(prefix)


def _flush(writer: ObjectWriter) -> None:
    """Push what a writer buffered in this process to the OS, so a kill leaves it on disk."""
    flush = getattr(writer, "flush", None)
    if callable(flush):
        flush()


class _FaultyWriter(ObjectWriter):
    """The inner store's streaming writer with the rules for ``write`` and ``close`` applied."""

    def __init__(self, store: FaultyObjectStore, inner: ObjectWriter, key: str, mode: PutMode) -> None:
        self._store = store
        self._inner = inner
        self._key = key
        self._mode = mode

    @property
    def bytes_written(self) -> int:
        return self._inner.bytes_written

    def flush(self) -> None:
        _flush(self._inner)

    def write(self, data: bytes | memoryview) -> None:
        fault = self._store._pick("write", (self._key,), self._mode)
        if fault is Fault.CRASH:
            self._inner.write(data[: max(1, len(data) // 2)])
            _flush(self._inner)
            kill_process()
        if fault is not None and fault is not Fault.TIMEOUT_AFTER_WRITE:
            self._store._fail(fault, "write", self._key)
        self._inner.write(data)
        if fault is not None:
            self._store._fail(fault, "write", self._key)

    def close(self) -> None:
        fault = self._store._pick("close", (self._key,), self._mode)
        if fault is Fault.CRASH:
            _flush(self._inner)
            kill_process()
        if fault is not None and fault is not Fault.TIMEOUT_AFTER_WRITE:
            self._store._fail(fault, "close", self._key)
        self._inner.close()
        if fault is not None:
            self._store._fail(fault, "close", self._key)

    def abort(self) -> None:
        self._inner.abort()
