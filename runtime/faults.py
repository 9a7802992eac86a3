"""Fault points: named places in the checkpoint protocol where a test can fail or kill the runtime.

The runtime calls :func:`point` at every step of the checkpoint protocol (never per record). Unarmed,
a point is one call and one falsy check. :func:`arm` makes the n-th matching hit of a point raise an
exception, call a function, or SIGKILL the process::

    from keystate.runtime import faults

    faults.arm("metadata.commit.after", faults.KILL, nth=3)                 # die after the 3rd commit
    faults.arm("snapshot.async", faults.raise_(OSError("disk gone")), when=lambda c: c["uid"] == "sink")
    with faults.armed("sink.commit.before", faults.call(print)): ...

Every hit of an armed point is counted in :func:`hits` (with its context); :data:`POINTS` lists the
points and what the runtime does when one raises.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from keystate.storage.errors import KeystateError
from keystate.storage.faults import kill_process

__all__ = [
    "KILL",
    "POINTS",
    "Action",
    "Arming",
    "InjectedFaultError",
    "arm",
    "armed",
    "call",
    "disarm",
    "hits",
    "point",
    "raise_",
]

POINTS: dict[str, str] = {
    "snapshot.sync": "a task took its operator snapshot and is about to freeze its state and send the barrier "
    "(raise: the task fails, the job fails over)",
    "snapshot.async": "a task's upload thread is about to write its state files (raise: the snapshot is declined, "
    "the checkpoint aborts)",
    "snapshot.async.done": "a task's state files are written, the acknowledgement is not sent yet (raise: declined)",
    "metadata.commit.before": "every task acknowledged; _metadata is about to be written (raise: the commit fails, "
    "the checkpoint aborts)",
    "metadata.commit.after": "_metadata is written: the checkpoint is complete, nobody is notified yet (raise: the "
    "job fails over and restores from it)",
    "notify.complete": "a task received 'checkpoint complete', before its operator hears of it (raise: the task fails)",
    "sink.commit.before": "a two-phase-commit sink is about to commit a transaction (raise: the task fails)",
    "sink.commit.after": "a two-phase-commit sink committed a transaction (raise: the task fails)",
    "task.finish": "a task reached the end of its data and is about to call finish() (raise: the task fails)",
    "task.close": "a task is about to call close() (raise: the task fails)",
}
"""Every fault point, with when it is hit and what a raised exception does there."""

Action = Callable[[str, dict[str, Any]], None]
"""What an armed point does on its chosen hit: called with the point's name and context."""


class InjectedFaultError(KeystateError):
    """The default error an armed point raises (a ``KeystateError``, handled as a storage failure would be)."""


def raise_(error: BaseException | None = None) -> Action:
    """Raise ``error`` (default: :class:`InjectedFaultError` naming the point)."""

    def action(name: str, context: dict[str, Any]) -> None:
        if error is not None:
            raise error
        raise InjectedFaultError(f"fault injected at {name} ({_describe(context)})")

    return action


def call(fn: Callable[[str, dict[str, Any]], object]) -> Action:
    """Call ``fn(name, context)`` and go on."""

    def action(name: str, context: dict[str, Any]) -> None:
        fn(name, context)

    return action


def _kill(name: str, context: dict[str, Any]) -> None:
    kill_process()


KILL: Action = _kill
"""SIGKILL the process at once (stdout and stderr are flushed first)."""


def _describe(context: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in context.items())


@dataclass
class Arming:
    """One armed point: fires on the ``nth`` matching hit, then on each of the next ``times - 1``."""

    name: str
    action: Action
    nth: int = 1
    times: int | None = 1
    when: Callable[[dict[str, Any]], bool] | None = None
    seen: int = 0
    fired: int = 0
    contexts: list[dict[str, Any]] = field(default_factory=list)
    """The context of every hit this arming fired on."""

    def _take(self, context: dict[str, Any]) -> bool:
        if self.when is not None and not self.when(context):
            return False
        self.seen += 1
        if self.seen < self.nth or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        self.contexts.append(dict(context))
        return True


_lock = threading.Lock()
_armed: dict[str, list[Arming]] = {}
_hits: Counter[str] = Counter()


def point(name: str, **context: Any) -> None:
    """A fault point. Does nothing unless ``name`` is armed; then counts the hit and maybe acts."""
    if not _armed:
        return
    _hit(name, context)


def _hit(name: str, context: dict[str, Any]) -> None:
    with _lock:
        armings = _armed.get(name)
        if not armings:
            return
        _hits[name] += 1
        chosen = next((a for a in armings if a._take(context)), None)
    if chosen is not None:
        chosen.action(name, context)


def arm(
    name: str,
    action: Action | None = None,
    *,
    nth: int = 1,
    times: int | None = 1,
    when: Callable[[dict[str, Any]], bool] | None = None,
) -> Arming:
    """Arm a point.

    Args:
        name: one of :data:`POINTS`.
        action: what to do (default: raise :class:`InjectedFaultError`); see :func:`raise_`,
            :func:`call`, :data:`KILL`.
        nth: act on the n-th hit that passes ``when`` (1 = the first).
        times: act on this many hits from the n-th on (``None``: every one).
        when: only hits whose context (``checkpoint_id``, ``uid``, ``index``, ...) passes this count.

    Raises:
        ValueError: unknown point or bad counts.
    """
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(sorted(POINTS))}")
    if nth < 1 or (times is not None and times < 1):
        raise ValueError("nth and times must be at least 1")
    arming = Arming(name, action or raise_(), nth, times, when)
    with _lock:
        _armed.setdefault(name, []).append(arming)
    return arming


def disarm(target: str | Arming | None = None) -> None:
    """Disarm one arming, every arming of a point, or (``None``) everything; hit counts are reset with it."""
    with _lock:
        if target is None:
            _armed.clear()
            _hits.clear()
        elif isinstance(target, Arming):
            armings = _armed.get(target.name, [])
            if target in armings:
                armings.remove(target)
            if not armings:
                _armed.pop(target.name, None)
        else:
            _armed.pop(target, None)


@contextmanager
def armed(
    name: str,
    action: Action | None = None,
    *,
    nth: int = 1,
    times: int | None = 1,
    when: Callable[[dict[str, Any]], bool] | None = None,
) -> Iterator[Arming]:
    """:func:`arm` for the duration of a ``with`` block."""
    arming = arm(name, action, nth=nth, times=times, when=when)
    try:
        yield arming
    finally:
        disarm(arming)


def hits() -> dict[str, int]:
    """How often each armed point was reached since it was armed (unarmed points are not counted)."""
    with _lock:
        return dict(_hits)
