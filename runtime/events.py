"""In-band events that travel through channels beside record batches.

A channel carries, in order: record batches (plain ``list`` objects), :class:`Barrier`,
:class:`Watermark`, :class:`EndOfData` and finally :data:`END_OF_PARTITION`. Barriers may follow
EndOfData (FLIP-147: a finished task still takes part in checkpoints until it terminates).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from keystate.storage.format.metadata import CheckpointKind

__all__ = [
    "END_OF_PARTITION",
    "MAX_WATERMARK",
    "Barrier",
    "CheckpointOptions",
    "EndOfData",
    "EndOfPartition",
    "StopMode",
    "Watermark",
]


class StopMode(StrEnum):
    """How a task's data ends: ``drain`` runs endInput/finish; ``no_drain`` (stop-with-savepoint
    without drain) skips them so the savepoint can be resumed exactly."""

    DRAIN = "drain"
    NO_DRAIN = "no_drain"


@dataclass(frozen=True, slots=True)
class CheckpointOptions:
    kind: CheckpointKind = CheckpointKind.CHECKPOINT
    synchronous: bool = False
    """Stop-with-savepoint: sources stop before the barrier; tasks wait for this savepoint."""
    drain: bool = False

    @property
    def is_savepoint(self) -> bool:
        return self.kind is CheckpointKind.SAVEPOINT


@dataclass(frozen=True, slots=True)
class Barrier:
    checkpoint_id: int
    options: CheckpointOptions


@dataclass(frozen=True, slots=True)
class Watermark:
    timestamp: int


MAX_WATERMARK = Watermark((1 << 63) - 1)
"""Emitted by sources on drain: the end of event time (fires everything waiting for time to pass)."""


@dataclass(frozen=True, slots=True)
class EndOfData:
    """No more records on this channel; barriers may still follow."""

    mode: StopMode


class EndOfPartition:
    """The producing task terminated; nothing follows on this channel."""

    _instance: EndOfPartition | None = None

    def __new__(cls) -> EndOfPartition:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END_OF_PARTITION"


END_OF_PARTITION = EndOfPartition()
