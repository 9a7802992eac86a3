"""Apache Flink checkpoints and savepoints in an object store: tell them apart, load them, check their files.

A Flink checkpoint lies where Flink wrote it (``<root>/<jobId>/chk-<N>/_metadata``, shared files under
``<root>/<jobId>/shared/``, savepoints under ``<savepoint dir>/savepoint-<job6>-<random>/``), on local disk
or S3, in the same layout keystate uses. What a ``_metadata`` holds is parsed by
:mod:`keystate.storage.format.flink`; this module does the I/O, always through an
:class:`~keystate.storage.base.ObjectStore`, so that no path in a checkpoint is ever opened directly::

    storage = open_storage("s3://bucket/flink-checkpoints")
    checkpoint = resolve_checkpoint(storage)          # the newest one, keystate's or Flink's
    if isinstance(checkpoint, FlinkCheckpoint):
        for check in verify_flink_checkpoint(checkpoint):
            print(check.status, check.handle)

The format is detected from the first bytes of ``_metadata`` (Flink's magic number ``49 60 67 2d``;
keystate's metadata is JSON). Flink stores neither the job ID nor a timestamp in ``_metadata``: the job
ID is the ``<jobId>`` directory above ``chk-<N>`` (else the one the handle paths name), and the
timestamp is unknown (``None``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias
from urllib.parse import urlsplit

from keystate.storage.base import ObjectStore, join_key, validate_key
from keystate.storage.checkpoints import (
    CHECKPOINT_DIR,
    METADATA_FILE,
    SAVEPOINT_DIR,
    CheckpointPointer,
    CheckpointStorage,
    CompletedCheckpoint,
)
from keystate.storage.errors import (
    BucketNotFoundError,
    CheckpointDiscardedError,
    CheckpointNotFoundError,
    InvalidURIError,
    KeystateError,
    MetadataError,
    NotFoundError,
    StorageError,
)
from keystate.storage.format import validation
from keystate.storage.format.flink import (
    ByteStreamStateHandle,
    ChangelogStateBackendHandle,
    ChangelogStateHandleStreamImpl,
    ChannelStateHandle,
    EmptySegmentFileStateHandle,
    FileStateHandle,
    FlinkChannelHandle,
    FlinkCheckpointMetadata,
    FlinkKeyedHandle,
    FlinkStreamHandle,
    IncrementalRemoteKeyedStateHandle,
    InMemoryChangelogStateHandle,
    KeyGroupsStateHandle,
    MergedChannelStateHandle,
    OperatorStreamStateHandle,
    RelativeFileStateHandle,
    SegmentFileStateHandle,
    looks_like_flink_metadata,
    parse_flink_metadata,
)
from keystate.storage.format.metadata import JOB_ID_PATTERN, CheckpointKind

__all__ = [
    "AnyCheckpoint",
    "CheckStatus",
    "FlinkCheckpoint",
    "FlinkHandleCheck",
    "FlinkStateHandle",
    "SourceFormat",
    "detect_format",
    "load_flink_checkpoint",
    "open_checkpoint",
    "resolve_checkpoint",
    "stream_handles",
    "verify_flink_checkpoint",
]

log = logging.getLogger(__name__)

# A job ID in a handle path: .../<jobId>/chk-<N>/..., .../<jobId>/shared/..., .../<jobId>/taskowned/...
_JOB_IN_PATH = re.compile(r"/([0-9a-f]{32})/(?:chk-[0-9]+|shared|taskowned)/")


class SourceFormat(StrEnum):
    """What wrote a checkpoint: ``"source_format"`` in JSON outputs."""

    KEYSTATE = "keystate"
    FLINK = "flink"


class FlinkCheckpoint:
    """A Flink checkpoint or savepoint whose ``_metadata`` was read from an object store.

    Args:
        store: the store holding it.
        directory: the key of its directory (``.../<jobId>/chk-<N>`` or ``.../savepoint-...``).
        metadata: the parsed ``_metadata``.
    """

    source_format = SourceFormat.FLINK

    def __init__(self, store: ObjectStore, directory: str, metadata: FlinkCheckpointMetadata) -> None:
        self.store = store
        self.directory = directory
        self.metadata = metadata
        parent, _, name = directory.rpartition("/")
        self._name = name
        self._parent = parent
        in_job_dir = bool(CHECKPOINT_DIR.fullmatch(name) and JOB_ID_PATTERN.fullmatch(parent.rpartition("/")[2]))
        self._job_dir: str | None = parent if in_job_dir else None
        self.job_id: str | None = parent.rpartition("/")[2] if in_job_dir else _job_id_in_handles(metadata)
        """The ``<jobId>`` directory name; else the job ID the handle paths name; else ``None`` (savepoints)."""

    def __repr__(self) -> str:
        return f"FlinkCheckpoint({self.location!r}, id={self.checkpoint_id})"

    @property
    def checkpoint_id(self) -> int:
        return self.metadata.checkpoint_id

    @property
    def job_id_prefix(self) -> str | None:
        """What is known of the job ID: all of it, or the 6 hex digits a savepoint directory's name holds."""
        if self.job_id is not None:
            return self.job_id
        return self._name.split("-")[1] if SAVEPOINT_DIR.fullmatch(self._name) else None

    @property
    def kind(self) -> CheckpointKind:
        """From the properties (format 4+), else from the directory name (``savepoint-...``)."""
        if self.metadata.kind is not None:
            return self.metadata.kind
        return CheckpointKind.SAVEPOINT if SAVEPOINT_DIR.fullmatch(self._name) else CheckpointKind.CHECKPOINT

    @property
    def timestamp(self) -> int | None:
        """Always ``None``: Flink's ``_metadata`` holds no time, and the object store reports none."""
        return None

    @property
    def location(self) -> str:
        """The checkpoint directory as an absolute path or URI."""
        return self.store.describe(self.directory)

    def is_present(self) -> bool:
        """Whether its ``_metadata`` still exists (Flink's retention deletes old checkpoints of a live job)."""
        return self.store.exists(_metadata_key(self.store, self.directory))

    def file_key(self, path: str) -> str | None:
        """The key of the file an absolute Flink path names, rebased onto this checkpoint's location.

        Flink writes absolute URIs of the machine it ran on (``file:/data/ck/<jobId>/shared/<uuid>``,
        ``s3://bucket/ck/<jobId>/shared/...``). A copied or moved checkpoint keeps them, so the part after
        ``/<jobId>/`` is looked up under the directory that holds this checkpoint's ``<jobId>/``, and the
        part after ``/chk-<N>/`` (or ``/savepoint-.../``) under this checkpoint's own directory. Returns
        ``None`` when neither appears in the path (a file this location cannot reach).

        Raises:
            InvalidURIError: the rest of the path would leave that directory (``..``, empty segments).
        """
        segments = [s for s in urlsplit(path).path.split("/") if s]
        bases = [(self._name, self.directory)]
        if self._job_dir is not None and self.job_id is not None:
            bases.insert(0, (self.job_id, self._job_dir))
        for name, base in bases:
            if name in segments:
                at = len(segments) - 1 - segments[::-1].index(name)
                rest = "/".join(segments[at + 1 :])
                if rest:
                    return join_key(base, validate_key(rest))
        return None


AnyCheckpoint: TypeAlias = CompletedCheckpoint | FlinkCheckpoint
"""A loaded checkpoint or savepoint of either format."""


def _job_id_in_handles(metadata: FlinkCheckpointMetadata) -> str | None:
    found: Counter[str] = Counter()
    for op in metadata.operators:
        for subtask in op.subtasks:
            for handle in subtask.handles():
                for stream in stream_handles(handle):
                    name = _stream_path(stream)
                    if name is not None and (m := _JOB_IN_PATH.search(name)):
                        found[m.group(1)] += 1
    return found.most_common(1)[0][0] if len(found) == 1 else None


def _stream_path(stream: FlinkStreamHandle) -> str | None:
    if isinstance(stream, ByteStreamStateHandle):
        return stream.handle_name
    if isinstance(stream, FileStateHandle):
        return stream.path
    if isinstance(stream, SegmentFileStateHandle):
        return stream.file_path
    return None


# --- detecting and loading -------------------------------------------------------------------------------


def _metadata_key(store: ObjectStore, directory: str) -> str:
    return join_key(directory, METADATA_FILE)


def detect_format(store: ObjectStore, directory: str) -> SourceFormat:
    """Which format the ``_metadata`` in ``directory`` is, from its first 8 bytes (one small read).

    Raises:
        CheckpointNotFoundError: the directory has no ``_metadata``.
        StorageError: the store cannot be read.
    """
    key = _metadata_key(store, directory)
    try:
        head = store.get_range(key, 0, 8)
    except BucketNotFoundError:
        raise
    except NotFoundError as exc:
        raise CheckpointNotFoundError(
            f"Cannot find meta data file '{METADATA_FILE}' in directory '{store.describe(directory)}'; "
            "it is not a completed checkpoint or savepoint"
        ) from exc
    return SourceFormat.FLINK if looks_like_flink_metadata(head) else SourceFormat.KEYSTATE


def load_flink_checkpoint(store: ObjectStore, directory: str) -> FlinkCheckpoint:
    """Read and parse the Flink ``_metadata`` in ``directory``.

    Raises:
        CheckpointNotFoundError: the directory has no ``_metadata``.
        FlinkMetadataError: the file is not a Flink ``_metadata`` of format 3-6, or is damaged (a
            ``MetadataError``; the message names the byte offset).
        MetadataError: the file is larger than keystate reads (``validation.MAX_DOCUMENT_BYTES``).
    """
    key = _metadata_key(store, directory)
    where = store.describe(key)
    limit = validation.MAX_DOCUMENT_BYTES
    try:
        data = store.get_range(key, 0, limit + 1)
    except BucketNotFoundError:
        raise
    except NotFoundError as exc:
        raise CheckpointNotFoundError(
            f"Cannot find meta data file '{METADATA_FILE}' in directory '{store.describe(directory)}'; "
            "it is not a completed checkpoint or savepoint"
        ) from exc
    if len(data) > limit:
        raise MetadataError(f"{where}: the file is larger than {limit} bytes, the most keystate reads")
    return FlinkCheckpoint(store, directory, parse_flink_metadata(data, location=where))


def open_checkpoint(storage: CheckpointStorage, directory: str) -> AnyCheckpoint:
    """The completed checkpoint or savepoint in ``directory``, keystate's or Flink's (detected).

    Raises:
        CheckpointNotFoundError: the directory has no ``_metadata``.
        MetadataError: the metadata is invalid, in either format.
    """
    if detect_format(storage.store, directory) is SourceFormat.FLINK:
        return load_flink_checkpoint(storage.store, directory)
    return storage.load(directory)


def resolve_checkpoint(storage: CheckpointStorage, key: str = "") -> AnyCheckpoint:
    """What a user pointed at, in either format: a checkpoint or savepoint directory, its ``_metadata``, a
    job directory or a root (then the newest completed one below it).

    Where no Flink checkpoint is involved this is :meth:`CheckpointStorage.resolve`, unchanged. Below a root
    that holds Flink checkpoints, newest is by (timestamp, checkpoint id) as there: a Flink checkpoint has
    no known timestamp and counts as older than every keystate one; among Flink checkpoints the highest id
    wins. One that vanishes between listing and loading (retention) is skipped, and the listing repeated.

    Raises:
        CheckpointNotFoundError: nothing completed is there.
        MetadataError: the chosen metadata is invalid.
    """
    full = join_key(storage.base, key)
    if full.endswith("/" + METADATA_FILE) or full == METADATA_FILE:
        return _open_or_resolve(storage, full.rsplit("/", 1)[0] if "/" in full else "", key)
    if full and storage.store.exists(_metadata_key(storage.store, full)):
        return _open_or_resolve(storage, full, key)
    pointers = storage.discover(key)
    if not any(_is_flink(storage.store, p.directory) for p in _candidates(pointers)):
        return storage.resolve(key)
    best: AnyCheckpoint | None = None
    for round_ in range(_VANISHED_ROUNDS):
        best, vanished = _latest_once(storage, pointers if round_ == 0 else storage.discover(key))
        if not vanished:
            break
    if best is None:
        raise CheckpointNotFoundError(
            f"Cannot find checkpoint or savepoint at '{storage.store.describe(full)}': no directory with "
            f"'{METADATA_FILE}' there or below it"
        )
    return best


_VANISHED_ROUNDS = 3
"""Listings :func:`resolve_checkpoint` makes when checkpoints it found vanish before it loads them."""


def _open_or_resolve(storage: CheckpointStorage, directory: str, key: str) -> AnyCheckpoint:
    if _is_flink(storage.store, directory):
        return load_flink_checkpoint(storage.store, directory)
    return storage.resolve(key)  # keystate's, with its own errors for a checkpoint discarded meanwhile


def _is_flink(store: ObjectStore, directory: str) -> bool:
    try:
        return detect_format(store, directory) is SourceFormat.FLINK
    except CheckpointNotFoundError:
        return False  # gone meanwhile: whoever loads it next reports that


def _candidates(pointers: list[CheckpointPointer]) -> Iterator[CheckpointPointer]:
    """The pointers that can be the newest: every savepoint, and each job's newest checkpoint."""
    seen_jobs: set[str] = set()
    for pointer in pointers:
        if pointer.kind is CheckpointKind.CHECKPOINT:
            job_dir = pointer.directory.rsplit("/", 1)[0]
            if job_dir in seen_jobs:
                continue
            seen_jobs.add(job_dir)
        yield pointer


def _latest_once(storage: CheckpointStorage, pointers: list[CheckpointPointer]) -> tuple[AnyCheckpoint | None, bool]:
    best: AnyCheckpoint | None = None
    vanished = False
    seen_jobs: set[str] = set()
    for pointer in pointers:
        job_dir = pointer.directory.rsplit("/", 1)[0]
        if pointer.kind is CheckpointKind.CHECKPOINT and job_dir in seen_jobs:
            continue  # only the newest loadable checkpoint of each job can win
        try:
            candidate = open_checkpoint(storage, pointer.directory)
        except CheckpointNotFoundError:
            log.debug("%s was discarded while the latest checkpoint was looked for",
                      storage.store.describe(pointer.directory))  # fmt: skip
            vanished = True
            continue
        if pointer.kind is CheckpointKind.CHECKPOINT:
            seen_jobs.add(job_dir)
        if best is None or _newness(candidate) > _newness(best):
            best = candidate
    return best, vanished


def _newness(checkpoint: AnyCheckpoint) -> tuple[int, int]:
    timestamp = checkpoint.metadata.timestamp if isinstance(checkpoint, CompletedCheckpoint) else None
    return (-1 if timestamp is None else timestamp, checkpoint.checkpoint_id)


# --- verification --------------------------------------------------------------------------------------


class CheckStatus(StrEnum):
    OK = "ok"
    DAMAGED = "damaged"
    """Missing, of the wrong size, or a handle whose numbers contradict its bytes."""
    NOT_CHECKABLE = "not_checkable"
    """An absolute path this location cannot reach (another machine's disk, another store): not damage."""


@dataclass(frozen=True, slots=True)
class FlinkHandleCheck:
    """The verdict on one stream handle (a file, a part of one, or bytes inline in ``_metadata``)."""

    operator: str
    """The operator's uid, or its operator ID when the checkpoint stores no uid."""
    subtask: int
    """The subtask index; -1 for the operator's coordinator state."""
    handle: str
    """What was checked: ``inline <name>``, or the file's location."""
    size: int
    """The size the handle states."""
    status: CheckStatus
    detail: str | None = None
    """Why it is damaged or not checkable."""


FlinkStateHandle: TypeAlias = FlinkKeyedHandle | OperatorStreamStateHandle | FlinkChannelHandle | FlinkStreamHandle
"""Any handle a subtask or an operator's coordinator holds, or one nested in those."""


def stream_handles(handle: FlinkStateHandle) -> Iterator[FlinkStreamHandle]:
    """Every stream handle (the bytes of one file, of a part of one, or inline) under a state handle."""
    if isinstance(handle, KeyGroupsStateHandle):
        yield from stream_handles(handle.delegate)
    elif isinstance(handle, IncrementalRemoteKeyedStateHandle):
        yield from stream_handles(handle.meta_state)
        for item in (*handle.shared_state, *handle.private_state):
            yield from stream_handles(item.handle)
    elif isinstance(handle, ChangelogStateBackendHandle):
        for part in (*handle.materialized, *handle.non_materialized):
            yield from stream_handles(part)
    elif isinstance(handle, ChangelogStateHandleStreamImpl):
        for stream, _offset in handle.handles_and_offsets:
            yield from stream_handles(stream)
    elif isinstance(handle, InMemoryChangelogStateHandle):
        return  # its changes are inline in _metadata, already parsed
    elif isinstance(handle, OperatorStreamStateHandle | ChannelStateHandle | MergedChannelStateHandle):
        yield from stream_handles(handle.delegate)
    else:
        yield handle


def _offsets_fit(handle: object) -> str | None:
    """A handle's offsets must lie inside its stream: a reason when they do not."""
    if isinstance(handle, KeyGroupsStateHandle):
        size, offsets, what = handle.delegate.state_size, handle.offsets, "key-group offset"
    elif isinstance(handle, OperatorStreamStateHandle):
        size = handle.delegate.state_size
        offsets = tuple(o for entry in handle.states for o in entry.offsets)
        what = "operator state offset"
    else:
        return None
    bad = [o for o in offsets if not 0 <= o <= size]
    if bad:
        return f"{what} {bad[0]} lies outside its {size}-byte stream"
    return None


def verify_flink_checkpoint(
    checkpoint: FlinkCheckpoint, progress: Callable[[int, int, int], None] | None = None
) -> list[FlinkHandleCheck]:
    """Check that every file a Flink checkpoint names exists with the size its handle states, and that the
    offsets of every handle lie inside its stream. Inline handles were already parsed with ``_metadata``.
    Nothing is deserialized and no state is read: Flink's state files carry no checksums.

    Relative handles resolve against the ``_metadata`` directory, absolute ones through
    :meth:`FlinkCheckpoint.file_key`; an absolute path that this location cannot reach is reported
    ``NOT_CHECKABLE``, not damaged. Every read goes through the object store.

    Args:
        checkpoint: what to check.
        progress: called with (handles done, handles total, bytes done) after each handle.

    Raises:
        CheckpointDiscardedError: a file was missing because the checkpoint itself was deleted meanwhile.
    """
    todo: list[tuple[str, int, FlinkStreamHandle, str | None]] = []
    for op in checkpoint.metadata.operators:
        label = op.uid or op.operator_id
        if op.coordinator_state is not None:
            todo.append((label, -1, op.coordinator_state, None))
        for subtask in op.subtasks:
            for handle in subtask.handles():
                problem = _offsets_fit(handle)
                for stream in stream_handles(handle):
                    todo.append((label, subtask.index, stream, problem))
    sizes: dict[str, int | KeystateError] = {}
    checks: list[FlinkHandleCheck] = []
    done_bytes = 0
    for i, (label, index, stream, problem) in enumerate(todo):
        check = _check_stream(checkpoint, label, index, stream, sizes)
        if check.status is CheckStatus.DAMAGED and problem is None:
            _raise_if_discarded(checkpoint, check)
        if problem is not None and check.status is not CheckStatus.DAMAGED:
            check = FlinkHandleCheck(label, index, check.handle, check.size, CheckStatus.DAMAGED, problem)
        checks.append(check)
        done_bytes += stream.state_size
        if progress is not None:
            progress(i + 1, len(todo), done_bytes)
    return checks


def _raise_if_discarded(checkpoint: FlinkCheckpoint, check: FlinkHandleCheck) -> None:
    """A file that is missing while ``_metadata`` is gone too was deleted with its checkpoint: not damage."""
    try:
        present = checkpoint.is_present()
    except StorageError as exc:
        log.debug("cannot check whether %s still exists: %s", checkpoint.location, exc)
        return
    if not present:
        raise CheckpointDiscardedError(
            f"{checkpoint.kind} {checkpoint.checkpoint_id} at {checkpoint.location} was discarded while it was "
            f"verified ({check.handle}: {check.detail}); Flink's retention removes older checkpoints of a running "
            "job: verify the newest one",
            checkpoint_id=checkpoint.checkpoint_id,
            location=checkpoint.location,
        )


def _size_of(store: ObjectStore, key: str, cache: dict[str, int | KeystateError]) -> int | KeystateError:
    if key not in cache:
        try:
            cache[key] = store.size(key)
        except KeystateError as exc:  # missing, unsafe link, access denied, ...: this file's verdict
            cache[key] = exc
    return cache[key]


def _check_stream(
    checkpoint: FlinkCheckpoint,
    label: str,
    index: int,
    stream: FlinkStreamHandle,
    sizes: dict[str, int | KeystateError],
) -> FlinkHandleCheck:
    def verdict(handle: str, status: CheckStatus, detail: str | None = None) -> FlinkHandleCheck:
        return FlinkHandleCheck(label, index, handle, stream.state_size, status, detail)

    if isinstance(stream, ByteStreamStateHandle):
        return verdict(f"inline {stream.handle_name}", CheckStatus.OK)
    if isinstance(stream, EmptySegmentFileStateHandle):
        return verdict("empty segment", CheckStatus.OK)
    if isinstance(stream, RelativeFileStateHandle):
        try:
            key: str | None = join_key(checkpoint.directory, validate_key(stream.relative_path))
        except InvalidURIError as exc:
            return verdict(stream.relative_path, CheckStatus.DAMAGED, f"the relative path leaves the checkpoint: {exc}")
        path = stream.relative_path
        first, need, exact = 0, stream.size, True
    else:
        assert isinstance(stream, FileStateHandle | SegmentFileStateHandle)
        path = stream.path if isinstance(stream, FileStateHandle) else stream.file_path
        try:
            key = checkpoint.file_key(path)
        except InvalidURIError as exc:
            return verdict(path, CheckStatus.DAMAGED, f"the path leaves the checkpoint's root: {exc}")
        if isinstance(stream, SegmentFileStateHandle):
            first, need, exact = stream.start_pos, stream.size, False
        else:
            first, need, exact = 0, stream.size, True
    if key is None:
        return verdict(
            path,
            CheckStatus.NOT_CHECKABLE,
            f"an absolute path outside {checkpoint.location} (neither /{checkpoint.job_id or '<jobId>'}/ nor this "
            "checkpoint's directory appears in it): not checkable here",
        )
    where = checkpoint.store.describe(key)
    found = _size_of(checkpoint.store, key, sizes)
    if isinstance(found, KeystateError):
        reason = "is missing" if isinstance(found, NotFoundError) else f"cannot be read: {found}"
        return verdict(where, CheckStatus.DAMAGED, f"the file {reason}")
    if exact and found != need:
        return verdict(where, CheckStatus.DAMAGED, f"the handle states {need} bytes but the file has {found}")
    if not exact and first + need > found:
        return verdict(
            where,
            CheckStatus.DAMAGED,
            f"the segment [{first}, {first + need}) ends after the end of the {found}-byte file",
        )
    return verdict(where, CheckStatus.OK)
