"""The extended checkpoint format: what ``_metadata`` holds, as frozen typed classes.

A checkpoint's metadata records the job topology at checkpoint time and, per operator, either
``fully_finished`` (FLIP-147: every subtask finished, no state at all) or per-subtask entries that are
either a finished marker or the subtask's state handles. Invariants are checked here, on construction,
so metadata built in code and metadata parsed from a file obey the same rules. This module is the model
only: ``parse_metadata`` / ``dump_metadata`` (``keystate.storage.format._metadata_versions``) read and
write it, dispatching on ``format_version`` to a version's module (``_metadata_v1``), which builds these
classes; the model never imports them. ``docs/format.md`` is the normative spec.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from keystate.storage.errors import MetadataError, TopologyError
from keystate.storage.format.keygroups import UPPER_BOUND_MAX_PARALLELISM, KeyGroupRange
from keystate.storage.format.statefile import FILE_HEADER, TRAILER, Compression
from keystate.storage.format.topology import InputEdge, Topology, TopologyOperator, check_uid
from keystate.storage.format.validation import safe_relative_path

__all__ = [
    "CheckpointKind",
    "CheckpointMetadata",
    "CheckpointProperties",
    "CheckpointStatistics",
    "DistributionMode",
    "HandleScope",
    "KeyedStateHandle",
    "OperatorState",
    "OperatorStateEntry",
    "OperatorStateHandle",
    "OperatorStatistics",
    "OperatorStatus",
    "StreamHandle",
    "SubtaskState",
]

JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
CHECKSUM_PATTERN = re.compile(r"xxh3-64:[0-9a-f]{16}")
MAX_ID = (1 << 63) - 1
"""Checkpoint ids, ``written_by``, timestamps and statistics are integers in 0..MAX_ID."""


class CheckpointKind(StrEnum):
    CHECKPOINT = "checkpoint"
    SAVEPOINT = "savepoint"


class OperatorStatus(StrEnum):
    """FLIP-147 operator status: no finished marker / some subtasks finished / all finished."""

    RUNNING = "running"
    PARTIALLY_FINISHED = "partially_finished"
    FULLY_FINISHED = "fully_finished"


class DistributionMode(StrEnum):
    """How operator list state is redistributed on restore (Flink's ``OperatorStateHandle.Mode``)."""

    SPLIT = "split"
    """SPLIT_DISTRIBUTE: entries are dealt out in contiguous chunks."""
    UNION = "union"
    """Every subtask receives every entry."""
    BROADCAST = "broadcast"
    """Every subtask holds the same entries; subtask i receives the copy of reporter ``i % reporters``."""


class HandleScope(StrEnum):
    EXCLUSIVE = "exclusive"
    """A file under the checkpoint directory; ``path`` is relative to it."""
    SHARED = "shared"
    """A file under the job's ``shared/`` directory, possibly referenced by several checkpoints."""
    INLINE = "inline"
    """Small state stored in ``_metadata`` itself (base64 in JSON)."""


def _invalid(what: str) -> MetadataError:
    return MetadataError(what)


@dataclass(frozen=True, slots=True)
class StreamHandle:
    """A reference to the bytes of one state file (see the state-file format)."""

    scope: HandleScope
    size: int
    """Stored bytes of the state file (header, blocks and trailer); >= 0."""
    raw_size: int
    """Uncompressed payload bytes; >= 0."""
    checksum: str
    """``xxh3-64:`` followed by 16 hex digits: the xxh3-64 of all stored bytes."""
    compression: Compression
    path: str | None = None
    """For ``exclusive`` and ``shared`` scope: a safe relative path (no ``..``, not absolute)."""
    data: bytes | None = None
    """For ``inline`` scope: the state file's bytes; ``len(data) == size``."""
    written_by: int | None = None
    """For ``shared`` scope: the id of the checkpoint that wrote the file (required in format version 2;
    ``None`` in version 1). ``None`` for ``exclusive`` and ``inline``: their checkpoint wrote them."""

    def __post_init__(self) -> None:
        if self.written_by is not None:
            if self.scope is not HandleScope.SHARED:
                raise _invalid(
                    f"a {self.scope.value} handle has no 'written_by' (only shared files are written by another "
                    "checkpoint)"
                )
            if isinstance(self.written_by, bool) or not 0 <= self.written_by <= MAX_ID:
                raise _invalid(f"handle written_by must be a checkpoint id (0..2^63-1), found {self.written_by!r}")
        if self.size < 0 or self.raw_size < 0:
            raise _invalid(f"handle sizes must not be negative (size {self.size}, raw_size {self.raw_size})")
        if not CHECKSUM_PATTERN.fullmatch(self.checksum):
            raise _invalid(f"handle checksum {self.checksum!r} is not 'xxh3-64:' and 16 hex digits")
        if self.scope is HandleScope.INLINE:
            if self.data is None or self.path is not None:
                raise _invalid("an inline handle carries data and no path")
            if len(self.data) != self.size:
                raise _invalid(f"inline handle holds {len(self.data)} bytes but records size {self.size}")
        else:
            if self.path is None or self.data is not None:
                raise _invalid(f"a {self.scope.value} handle carries a path and no data")
            safe_relative_path(self.path, f"{self.scope.value} handle")

    @property
    def describe(self) -> str:
        return "inline" if self.path is None else f"{self.scope.value}:{self.path}"

    def written_in(self, checkpoint_id: int) -> bool:
        """Whether checkpoint ``checkpoint_id`` wrote this file: exclusive and inline handles always, a
        shared one when ``written_by == checkpoint_id`` (or unknown, ``None``: format version 1 has no
        incremental checkpoints, so its shared files count as written by the checkpoint that lists them)."""
        return self.scope is not HandleScope.SHARED or self.written_by is None or self.written_by == checkpoint_id


@dataclass(frozen=True, slots=True)
class KeyedStateHandle:
    """Keyed state of a key-group range in one state file, with the file offset of each key group.

    ``offsets[i]`` is where key group ``key_groups.start + i`` starts; it is always a block boundary.
    A key group ends where the next one starts; the last one ends at the trailer.

    An incremental handle (``deltas`` not empty) is a base plus delta files: ``stream`` / ``offsets`` are the
    base (a full keyed snapshot, as in a full handle) and ``deltas`` are delta files of the same key groups,
    applied in order after it (docs/format.md, "Delta files"). All of its streams are shared and carry
    ``written_by``: the base's is the oldest, each delta's greater than the one before. A full handle has
    no deltas and may be exclusive or inline.
    """

    key_groups: KeyGroupRange
    offsets: tuple[int, ...]
    stream: StreamHandle
    deltas: tuple[KeyedStateHandle, ...] = ()

    def __post_init__(self) -> None:
        self._check_offsets()
        if self.deltas:
            self._check_deltas()

    def _check_deltas(self) -> None:
        if self.stream.scope is not HandleScope.SHARED or self.stream.written_by is None:
            raise _invalid(
                f"incremental keyed handle for key groups {self.key_groups}: its base must be a shared file "
                f"with 'written_by' (found {self.stream.scope.value}, written_by {self.stream.written_by})"
            )
        previous = self.stream.written_by
        for i, delta in enumerate(self.deltas):
            if not isinstance(delta, KeyedStateHandle):
                raise _invalid(f"delta {i} of a keyed handle is a {type(delta).__name__}, not a keyed handle")
            if delta.deltas:
                raise _invalid(f"delta {i} of keyed handle for key groups {self.key_groups} has deltas itself")
            if delta.key_groups != self.key_groups:
                raise _invalid(
                    f"delta {i} covers key groups {delta.key_groups}; the deltas of a keyed handle cover the "
                    f"base's key groups {self.key_groups}"
                )
            written_by = delta.stream.written_by
            if delta.stream.scope is not HandleScope.SHARED or written_by is None:
                raise _invalid(
                    f"delta {i} of keyed handle for key groups {self.key_groups} must be a shared file with "
                    f"'written_by' (found {delta.stream.scope.value}, written_by {written_by})"
                )
            if written_by <= previous:
                raise _invalid(
                    f"delta {i} of keyed handle for key groups {self.key_groups} was written by checkpoint "
                    f"{written_by}, not after {previous}; deltas are ordered by strictly increasing written_by, "
                    "all after the base's"
                )
            previous = written_by

    def _check_offsets(self) -> None:
        if not self.key_groups:
            raise _invalid("a keyed handle needs a non-empty key-group range")
        if len(self.offsets) != len(self.key_groups):
            raise _invalid(
                f"keyed handle for key groups {self.key_groups} has {len(self.offsets)} offsets, "
                f"expected {len(self.key_groups)} (one per key group)"
            )
        low, high = FILE_HEADER.size, self.stream.size - TRAILER.size
        previous = low
        for i, off in enumerate(self.offsets):
            if off < previous or off > high:
                raise _invalid(
                    f"keyed handle offset for key group {self.key_groups.start + i} is {off}; offsets must "
                    f"be non-decreasing and within {low}..{high} (the file's blocks)"
                )
            previous = off

    def offset_range(self, key_group: int) -> tuple[int, int | None]:
        """Start and end offsets of one key group (``end`` is ``None`` for the last one)."""
        i = key_group - self.key_groups.start
        start = self.offsets[i]
        end = self.offsets[i + 1] if i + 1 < len(self.offsets) else None
        return start, end

    @property
    def is_incremental(self) -> bool:
        return bool(self.deltas)

    def streams(self) -> Iterator[StreamHandle]:
        """The files of this handle: the base, then the deltas in the order they are applied."""
        yield self.stream
        for delta in self.deltas:
            yield delta.stream


@dataclass(frozen=True, slots=True)
class OperatorStateEntry:
    """One named operator list state in a handle: its distribution mode and element offsets.

    ``offsets`` are positions in the *uncompressed* stream where each element starts (as in Flink);
    ``serializer`` names the element serializer so tools can decode safely.
    """

    name: str
    mode: DistributionMode
    offsets: tuple[int, ...]
    serializer: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.name) <= 1024:
            raise _invalid(
                f"an operator state needs a non-empty name of at most 1024 characters, found {len(self.name)}"
            )
        if not 1 <= len(self.serializer) <= 256:
            raise _invalid(f"operator state {self.name!r}: serializer name must have 1..256 characters")
        for what, text in (("name", self.name), ("serializer name", self.serializer)):
            try:
                text.encode("utf-8")  # _metadata is UTF-8: a lone surrogate could be read but never written
            except UnicodeEncodeError:
                raise _invalid(f"operator state {what} {text!r} is not valid UTF-8 text (lone surrogate)") from None
        if any(b < a for a, b in zip(self.offsets, self.offsets[1:], strict=False)) or any(o < 0 for o in self.offsets):
            raise _invalid(f"operator state {self.name!r}: offsets must be non-negative and non-decreasing")


@dataclass(frozen=True, slots=True)
class OperatorStateHandle:
    """Operator (non-keyed) list states of one subtask, all in one state file."""

    states: tuple[OperatorStateEntry, ...]
    stream: StreamHandle

    def __post_init__(self) -> None:
        names = [s.name for s in self.states]
        if len(set(names)) != len(names):
            raise _invalid(f"operator state handle names a state twice: {sorted(names)}")
        for s in self.states:
            if s.offsets and s.offsets[-1] > self.stream.raw_size:
                raise _invalid(
                    f"operator state {s.name!r}: offset {s.offsets[-1]} is beyond the stream's "
                    f"{self.stream.raw_size} raw bytes"
                )


def _check_counter(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise _invalid(f"{owner}: '{name}' must be an integer in 0..2^63-1, found {value!r}")


@dataclass(frozen=True, slots=True)
class OperatorStatistics:
    """How one operator took a checkpoint: maxima over its acknowledged subtasks (as Flink's checkpoint
    statistics show per operator). Durations are whole milliseconds."""

    sync_duration_ms: int
    """The synchronous part of the snapshot (the task is blocked meanwhile)."""
    async_duration_ms: int
    """The asynchronous part: writing the state files."""
    alignment_duration_ms: int
    """From the first barrier received to the last one (0 for a source, or one input)."""
    acknowledged_subtasks: int
    """Subtasks that acknowledged the checkpoint."""
    end_to_end_duration_ms: int | None = None
    """From the trigger to the coordinator receiving the operator's last acknowledgement (Flink's per-operator
    "end to end duration"); ``None``: not recorded (a ``_metadata`` written before keystate recorded it)."""

    def __post_init__(self) -> None:
        for name in ("sync_duration_ms", "async_duration_ms", "alignment_duration_ms", "acknowledged_subtasks"):
            _check_counter("operator statistics", name, getattr(self, name))
        if self.end_to_end_duration_ms is not None:
            _check_counter("operator statistics", "end_to_end_duration_ms", self.end_to_end_duration_ms)


@dataclass(frozen=True, slots=True)
class CheckpointStatistics:
    """How the checkpoint went as a whole."""

    duration_ms: int
    """From trigger to completion (the coordinator received every acknowledgement), in milliseconds."""

    def __post_init__(self) -> None:
        _check_counter("checkpoint statistics", "duration_ms", self.duration_ms)


@dataclass(frozen=True, slots=True)
class SubtaskState:
    """One subtask slot: the FLIP-147 finished marker, or the subtask's state handles."""

    index: int
    finished: bool = False
    keyed: tuple[KeyedStateHandle, ...] = ()
    operator: tuple[OperatorStateHandle, ...] = ()

    def __post_init__(self) -> None:
        if self.index < 0:
            raise _invalid(f"subtask index must not be negative, found {self.index}")
        if self.finished and (self.keyed or self.operator):
            raise _invalid(f"subtask {self.index} is marked finished but carries state; a finished marker has none")

    def handles(self) -> Iterator[StreamHandle]:
        """Every file this subtask's state references: keyed bases and their deltas, then operator state."""
        for k in self.keyed:
            yield from k.streams()
        for o in self.operator:
            yield o.stream

    @property
    def state_bytes(self) -> int:
        """The full state size: the stored bytes of every referenced file (bases and deltas included)."""
        return sum(h.size for h in self.handles())

    def incremental_state_bytes(self, checkpoint_id: int) -> int:
        """The stored bytes of the files checkpoint ``checkpoint_id`` wrote (:meth:`StreamHandle.written_in`)."""
        return sum(h.size for h in self.handles() if h.written_in(checkpoint_id))


@dataclass(frozen=True)
class OperatorState:
    """One operator in a checkpoint: its topology at checkpoint time and its state or finished status."""

    uid: str
    parallelism: int
    max_parallelism: int
    inputs: tuple[InputEdge, ...] = ()
    fully_finished: bool = False
    """FLIP-147 ``FullyFinishedOperatorState``: every subtask finished; no subtask entries at all."""
    subtasks: tuple[SubtaskState, ...] = ()
    """Subtasks with state or a finished marker, by ascending index; an absent index has no state."""
    statistics: OperatorStatistics | None = None
    """Durations of this checkpoint at this operator (format version 2; ``None`` when not recorded)."""

    def __post_init__(self) -> None:
        try:
            check_uid(self.uid)
        except TopologyError as exc:
            raise _invalid(str(exc)) from None
        if not 1 <= self.max_parallelism <= UPPER_BOUND_MAX_PARALLELISM:
            raise _invalid(
                f"operator {self.uid!r}: max_parallelism is not in valid bounds (1..{UPPER_BOUND_MAX_PARALLELISM}), "
                f"found: {self.max_parallelism}"
            )
        if not 1 <= self.parallelism <= self.max_parallelism:
            # Flink OperatorState: "Parallelism %s is not smaller or equal to max parallelism %s."
            raise _invalid(
                f"operator {self.uid!r}: parallelism {self.parallelism} is not smaller or equal to max "
                f"parallelism {self.max_parallelism}"
            )
        if self.fully_finished and self.subtasks:
            raise _invalid(
                f"operator {self.uid!r} is fully_finished but lists {len(self.subtasks)} subtasks; a fully "
                "finished operator lists none"
            )
        previous = -1
        for st in self.subtasks:
            if st.index <= previous or st.index >= self.parallelism:
                raise _invalid(
                    f"operator {self.uid!r}: subtask index {st.index} is out of order or outside "
                    f"0..{self.parallelism - 1}; indices must be unique and ascending"
                )
            previous = st.index
            for k in st.keyed:  # a delta's key groups equal its base's
                if k.key_groups.end >= self.max_parallelism:
                    raise _invalid(
                        f"operator {self.uid!r} subtask {st.index}: key groups {k.key_groups} exceed "
                        f"max_parallelism {self.max_parallelism}"
                    )
        if self.statistics is not None and self.statistics.acknowledged_subtasks > self.parallelism:
            raise _invalid(
                f"operator {self.uid!r}: statistics count {self.statistics.acknowledged_subtasks} acknowledged "
                f"subtasks, more than its parallelism {self.parallelism}"
            )

    @property
    def status(self) -> OperatorStatus:
        if self.fully_finished:
            return OperatorStatus.FULLY_FINISHED
        if any(st.finished for st in self.subtasks):
            return OperatorStatus.PARTIALLY_FINISHED
        return OperatorStatus.RUNNING

    @property
    def finished_subtasks(self) -> list[int]:
        """Indices with a finished marker; all indices when the operator is fully finished."""
        if self.fully_finished:
            return list(range(self.parallelism))
        return [st.index for st in self.subtasks if st.finished]

    def subtask(self, index: int) -> SubtaskState | None:
        for st in self.subtasks:
            if st.index == index:
                return st
        return None

    def handles(self) -> Iterator[StreamHandle]:
        for st in self.subtasks:
            yield from st.handles()

    @property
    def state_bytes(self) -> int:
        """The full state size: stored bytes of every file the operator's state references."""
        return sum(st.state_bytes for st in self.subtasks)

    @property
    def full_state_bytes(self) -> int:
        """Same as :attr:`state_bytes` (Flink's "Full Checkpoint Data Size")."""
        return self.state_bytes

    def incremental_state_bytes(self, checkpoint_id: int) -> int:
        """Stored bytes of the files checkpoint ``checkpoint_id`` wrote for this operator (Flink's
        "Checkpointed Data Size"): exclusive and inline files, and shared ones it wrote."""
        return sum(st.incremental_state_bytes(checkpoint_id) for st in self.subtasks)

    @property
    def has_state(self) -> bool:
        return any(True for _ in self.handles())

    @property
    def has_keyed_state(self) -> bool:
        return any(st.keyed for st in self.subtasks)

    def uses_union_state(self) -> bool:
        return any(e.mode is DistributionMode.UNION for st in self.subtasks for o in st.operator for e in o.states)


@dataclass(frozen=True, slots=True)
class CheckpointProperties:
    """How the checkpoint was taken."""

    synchronous: bool = False
    """A stop-with-savepoint savepoint: the job stopped after it (tasks waited for it)."""
    drain: bool = False
    """Stop-with-savepoint ``--drain``: finish() ran and MAX_WATERMARK was emitted before it."""

    def __post_init__(self) -> None:
        if self.drain and not self.synchronous:
            raise _invalid("properties: 'drain' is only valid for a synchronous (stop-with-savepoint) savepoint")


@dataclass(frozen=True)
class CheckpointMetadata:
    """Everything ``_metadata`` holds. Written last and create-only: its presence = checkpoint complete."""

    FORMAT_VERSION: ClassVar[int] = 2
    """The ``_metadata`` format version ``dump_metadata`` writes (every supported version parses to this model)."""

    checkpoint_id: int
    job_id: str
    """32 lowercase hex digits."""
    kind: CheckpointKind
    timestamp: int
    """Milliseconds since the Unix epoch when the checkpoint was triggered."""
    operators: tuple[OperatorState, ...]
    properties: CheckpointProperties = CheckpointProperties()
    statistics: CheckpointStatistics | None = None
    """Trigger-to-completion duration (format version 2; ``None`` when not recorded)."""
    source_version: int | None = field(default=None, compare=False, repr=False)
    """The ``format_version`` of the document this was parsed from (``None``: built in code). Not part of
    the value: a parsed version-1 document equals the same metadata built in code."""
    _by_uid: dict[str, OperatorState] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.checkpoint_id < 1 << 63:
            raise _invalid(f"invalid checkpoint ID: {self.checkpoint_id}")
        if not 0 <= self.timestamp < 1 << 63:
            raise _invalid(f"timestamp must be milliseconds since the epoch (0..2^63-1), found {self.timestamp}")
        if not JOB_ID_PATTERN.fullmatch(self.job_id):
            raise _invalid(f"job_id {self.job_id!r} is not 32 lowercase hex digits")
        if self.properties.synchronous and self.kind is not CheckpointKind.SAVEPOINT:
            raise _invalid("properties: only a savepoint can be synchronous (stop-with-savepoint)")
        try:
            self.topology()  # unique uids, known inputs, no cycles, forward edges of equal parallelism
        except TopologyError as exc:
            raise _invalid(f"topology: {exc}") from exc
        for op in self.operators:
            for st in op.subtasks:
                for h in st.handles():
                    if h.written_by is not None and h.written_by > self.checkpoint_id:
                        raise _invalid(
                            f"operator {op.uid!r} subtask {st.index}: shared file {h.path!r} was written by "
                            f"checkpoint {h.written_by}, after this checkpoint {self.checkpoint_id}"
                        )
        object.__setattr__(self, "_by_uid", {op.uid: op for op in self.operators})

    def operator(self, uid: str) -> OperatorState | None:
        return self._by_uid.get(uid)

    def topology(self) -> Topology:
        """The job topology at checkpoint time (``max_parallelism`` always explicit)."""
        return Topology(
            tuple(TopologyOperator(op.uid, op.parallelism, op.max_parallelism, op.inputs) for op in self.operators)
        )

    def handles(self) -> Iterator[StreamHandle]:
        for op in self.operators:
            yield from op.handles()

    @property
    def total_state_bytes(self) -> int:
        """The full state size (same as :attr:`full_state_bytes`)."""
        return sum(op.state_bytes for op in self.operators)

    @property
    def full_state_bytes(self) -> int:
        """Stored bytes of every file the checkpoint references (Flink's "Full Checkpoint Data Size")."""
        return self.total_state_bytes

    @property
    def incremental_state_bytes(self) -> int:
        """Stored bytes of the files this checkpoint wrote (Flink's "Checkpointed Data Size"): exclusive and
        inline files, and shared files with ``written_by == checkpoint_id``. Equals :attr:`full_state_bytes`
        for a full checkpoint. A file referenced twice counts twice, as in Flink's per-handle sums."""
        return sum(op.incremental_state_bytes(self.checkpoint_id) for op in self.operators)

    @property
    def is_incremental(self) -> bool:
        """Whether the checkpoint builds on earlier ones: a keyed handle with deltas, or a shared file an
        earlier checkpoint wrote."""
        for op in self.operators:
            for st in op.subtasks:
                if any(k.deltas for k in st.keyed):
                    return True
                if any(h.written_by is not None and h.written_by < self.checkpoint_id for h in st.handles()):
                    return True
        return False

    @property
    def directory_name(self) -> str:
        return f"chk-{self.checkpoint_id}"
