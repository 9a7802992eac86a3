"""What runs the fuzzed properties, in CI (``tests/fuzz/test_*.py``) and in long runs
(``python -m tests.fuzz.run``): the scratch context, :class:`Property` and its runner, and the count of
known bugs.

Each :class:`Property` pairs a strategy (what hostile input looks like) with a check (what must hold for
it): the input loads correctly, or it raises the documented typed error and nothing else. The checks
let any other exception escape, so hypothesis reports it with a reproducible example.
"""

from __future__ import annotations

import itertools
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from keystate.storage import CheckpointStorage, LocalObjectStore
from keystate.storage.errors import KeystateError
from tests.fuzz import samples

__all__ = [
    "KNOWN_BUGS",
    "KNOWN_HITS",
    "FuzzContext",
    "Property",
    "attempt",
    "attempt_typed",
    "known_bug",
    "run_property",
]


class FuzzContext:
    """Scratch space and the valid samples (built once, lazily) that the properties mutate."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._ids = itertools.count(1)
        self._snapshot: samples.SnapshotSample | None = None
        self._cli: samples.CliTemplate | None = None
        self._snapshot_storage: CheckpointStorage | None = None

    def fresh_dir(self, prefix: str) -> Path:
        path = self.scratch / f"{prefix}-{next(self._ids)}"
        path.mkdir(parents=True)
        return path

    def next_id(self) -> int:
        return next(self._ids)

    @property
    def statefiles(self) -> Path:
        """Where state-file examples are put to be read from disk."""
        path = self.scratch / "statefiles"
        path.mkdir(exist_ok=True)
        return path

    def snapshot(self) -> samples.SnapshotSample:
        if self._snapshot is None:
            self._snapshot = samples.write_snapshot_sample(self.scratch / "snapshot-sample")
        return self._snapshot

    def snapshot_storage(self) -> CheckpointStorage:
        if self._snapshot_storage is None:
            self._snapshot_storage = CheckpointStorage(LocalObjectStore(self.scratch / "snapshots", fsync=False))
        return self._snapshot_storage

    def cli_template(self) -> samples.CliTemplate:
        if self._cli is None:
            self._cli = samples.CliTemplate.build(self.scratch / "cli-template")
        return self._cli


@dataclass(frozen=True)
class Property:
    """One fuzzed property: ``check(ctx, example)`` must hold for every example ``strategy(ctx)`` draws."""

    target: str
    name: str
    strategy: Callable[[FuzzContext], st.SearchStrategy[Any]]
    check: Callable[[FuzzContext, Any], None]
    ci_examples: int

    @property
    def qualified(self) -> str:
        return f"{self.target}.{self.name}"


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]  # fmt: skip


def run_property(prop: Property, ctx: FuzzContext, *, max_examples: int | None = None, seed: int | None = None) -> int:
    """Run one property; returns how many examples ran. Without ``seed`` the run is derandomized (the
    same examples every time, as CI needs); no example database is read or written either way.

    Raises:
        whatever the check raised for the (shrunk) failing example; hypothesis reports the example.
    """
    count = 0
    strategy = prop.strategy(ctx)

    def body(example: Any) -> None:
        nonlocal count
        count += 1
        prop.check(ctx, example)

    test = given(strategy)(body)
    test = settings(
        max_examples=max_examples or prop.ci_examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=_HEALTH,
        print_blob=False,
    )(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()
    return count


# --- running the code under test --------------------------------------------------------------------------


def attempt(action: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> tuple[bool, Any]:
    """``(True, result)`` of ``action()``, or ``(False, error)`` when it raised one of ``allowed``."""
    try:
        return True, action()
    except allowed as exc:
        return False, exc


KNOWN_BUGS: dict[str, str] = {}
"""Untyped errors the fuzzer found in code owned by someone else, reported and not yet fixed there. The
checks count them (``python -m tests.fuzz.run`` prints how often) instead of failing; remove an entry once
its fix lands, and the fuzzer enforces it from then on."""

KNOWN_HITS: dict[str, int] = dict.fromkeys(KNOWN_BUGS, 0)


def known_bug(exc: BaseException) -> str | None:
    """The id of the known bug ``exc`` is, judged by its type and the frame that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    origin = Path(last.filename).as_posix()
    if type(exc).__module__.startswith("lmdb") and any(f.filename.endswith("statebackend/_lmdb.py") for f in frames):
        return "lmdb-long-key"
    if isinstance(exc, struct.error) and origin.endswith("statebackend/keyed.py") and last.name == "keys":
        return "short-composite-key"
    if isinstance(exc, struct.error) and origin.endswith("statebackend/_states.py"):
        return "short-ttl-value"
    return None


def attempt_typed(action: Callable[[], Any]) -> tuple[bool, Any]:
    """Like :func:`attempt` with any ``KeystateError`` allowed, and known (reported) bugs counted."""
    try:
        return attempt(action, (KeystateError,))
    except Exception as exc:
        bug = known_bug(exc)
        if bug is None or bug not in KNOWN_BUGS:  # fixed bugs are enforced again
            raise
        KNOWN_HITS[bug] += 1
        return False, exc
