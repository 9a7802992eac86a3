"""Checkpoint storage: the on-disk layout, writing a checkpoint, committing it, finding and loading it.

Layout under the storage base (docs/format.md section 1; docs/architecture.md#on-disk-layout)::

    <base>/<job_id>/chk-<id>/_metadata      written last, create-only; its presence = complete
    <base>/<job_id>/chk-<id>/...            exclusive state files of that checkpoint
    <base>/<job_id>/shared/...              state files several checkpoints may reference
    <base>/savepoints/savepoint-<job6>-<rand>/   self-contained savepoints

Writing a checkpoint touches only the objects it creates (no LIST): ``begin_*`` returns a
:class:`CheckpointWriter`, state streams are written through it, and :meth:`CheckpointWriter.commit`
writes ``_metadata`` create-only. If the create finds an object, the commit compares bytes: identical
bytes mean our own retried PUT landed (success); different bytes mean another writer won
(``CommitConflictError``). A failure whose outcome cannot be read back is ``CommitOutcomeUnknownError``.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from keystate.storage.base import ObjectStore, PutMode, join_key
from keystate.storage.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    CheckpointDiscardedError,
    CheckpointNotFoundError,
    CommitConflictError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    MetadataError,
    MissingStateFilesError,
    NotFoundError,
    RequestOutcomeUnknownError,
    StorageError,
)
from keystate.storage.format import validation
from keystate.storage.format._metadata_versions import dump_metadata, parse_metadata
from keystate.storage.format.metadata import (
    JOB_ID_PATTERN,
    CheckpointKind,
    CheckpointMetadata,
    HandleScope,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.format.statefile import BytesSource, ReadLimits, StateFileReader
from keystate.storage.format.transfer import StateHandle
from keystate.storage.statefile_io import StoreSource
from keystate.storage.streams import StateOutputStream, StreamOptions, state_file_name

__all__ = [
    "METADATA_FILE",
    "CheckpointPointer",
    "CheckpointStorage",
    "CheckpointWriter",
    "CompletedCheckpoint",
]

log = logging.getLogger(__name__)

METADATA_FILE = "_metadata"
SHARED_DIR = "shared"
CHECKPOINT_DIR = re.compile(r"chk-(0|[1-9][0-9]{0,18})")
SAVEPOINT_DIR = re.compile(r"savepoint-[0-9a-f]{6}-[0-9a-f]{12}")
_VANISHED_ROUNDS = 3
"""Discoveries :meth:`CheckpointStorage.latest` makes when checkpoints it found vanish before it loads them."""


@dataclass(frozen=True, slots=True)
class CheckpointPointer:
    """Where a completed checkpoint or savepoint lives, before its metadata is read."""

    kind: CheckpointKind
    directory: str
    """The checkpoint directory's key in the store."""
    checkpoint_id: int | None = None
    """Known from the directory name for checkpoints; ``None`` for savepoints until loaded."""


class CompletedCheckpoint:
    """A checkpoint or savepoint whose ``_metadata`` exists; opens its state files."""

    def __init__(self, storage: CheckpointStorage, directory: str, metadata: CheckpointMetadata) -> None:
        self.storage = storage
        self.directory = directory
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"CompletedCheckpoint({self.location!r}, id={self.checkpoint_id})"

    @property
    def checkpoint_id(self) -> int:
        return self.metadata.checkpoint_id

    @property
    def kind(self) -> CheckpointKind:
        return self.metadata.kind

    @property
    def location(self) -> str:
        """The checkpoint directory as an absolute path or URI."""
        return self.storage.store.describe(self.directory)

    def state_key(self, handle: StreamHandle) -> str | None:
        """The object key a handle refers to (``None`` for inline handles).

        Raises:
            MetadataError: a savepoint refers to shared state (savepoints must be self-contained).
        """
        if handle.scope is HandleScope.INLINE:
            return None
        assert handle.path is not None  # guaranteed by StreamHandle's invariants
        if handle.scope is HandleScope.EXCLUSIVE:
            return join_key(self.directory, handle.path)
        if self.kind is CheckpointKind.SAVEPOINT:
            raise MetadataError(
                f"{self.location}: savepoint refers to shared state {handle.path!r}; savepoints must be self-contained"
            )
        job_dir = self.directory.rsplit("/", 1)[0] if "/" in self.directory else ""
        return join_key(job_dir, SHARED_DIR, handle.path)

    def is_present(self) -> bool:
        """Whether the checkpoint's ``_metadata`` still exists (one request). Retention deletes it first
        when it discards a checkpoint, so ``False`` means the checkpoint is gone, or going.

        Raises:
            StorageError: the store could not be asked.
        """
        return self.storage.store.exists(join_key(self.directory, METADATA_FILE))

    def raise_if_discarded(self, cause: BaseException) -> None:
        """After reading one of this checkpoint's state files failed with ``cause``: raise
        :class:`CheckpointDiscardedError` if the checkpoint was discarded meanwhile (its ``_metadata`` no
        longer exists), so that a checkpoint retention deleted while it was read is reported as exactly
        that, never as damage. Returns if the checkpoint is still there (or that cannot be told): then
        ``cause`` is the file's own failure.

        Raises:
            CheckpointDiscardedError: the checkpoint is gone; the error names the newest one left.
        """
        try:
            present = self.is_present()
        except StorageError as exc:
            log.debug("cannot check whether %s still exists: %s", self.location, exc)
            return
        if not present:
            raise self.storage.discarded_error(self.directory, self.checkpoint_id, self.kind) from cause

    def open_state(self, handle: StreamHandle) -> StateFileReader:
        """A reader over the state file a handle refers to (size and checksum are checked on read, and the
        storage's ``read_limits`` bound what it decodes)."""
        key = self.state_key(handle)
        if key is None:
            assert handle.data is not None
            source: BytesSource | StoreSource = BytesSource(
                handle.data, f"{self.location}/{METADATA_FILE} (inline state)"
            )
        else:
            source = StoreSource(self.storage.store, key)
        return StateFileReader(
            source,
            size=handle.size,
            checksum=handle.checksum,
            raw_size=handle.raw_size,
            compression=handle.compression,
            limits=self.storage.read_limits,
        )


class CheckpointWriter:
    """Writes one checkpoint or savepoint: state streams first, ``_metadata`` last.

    Streams may be opened and written from several threads at once (one thread per stream).

    The writer records every exclusive state file it made durable (each stream it closed successfully),
    and :meth:`commit` refuses metadata that references an exclusive file it did not record: such a file
    may not exist, and a complete checkpoint must never point at nothing. Files that other writers wrote
    into the same checkpoint directory (worker processes of an embedding runtime, each with its own
    writer) are vouched for with :meth:`adopt`, with the handles the workers shipped.
    """

    def __init__(
        self,
        storage: CheckpointStorage,
        job_id: str,
        checkpoint_id: int,
        kind: CheckpointKind,
        directory: str,
    ) -> None:
        self._storage = storage
        self.job_id = job_id
        self.checkpoint_id = checkpoint_id
        self.kind = kind
        self.directory = directory
        self._lock = threading.Lock()
        self._written: list[str] = []
        self._durable: set[str] = set()  # paths of exclusive files this writer closed, or adopted
        self._streams: list[StateOutputStream] = []
        self._done = False  # no new streams, no second commit
        self._committed = False
        self._commit_failed = False  # the commit definitely did not happen: abort may remove our files
        self._uncertain: bytes | None = None  # the metadata of a commit whose outcome is unknown
        self._aborted = False
        self._inline_left = storage.options.inline_budget  # stored bytes more streams may inline

    @property
    def location(self) -> str:
        return self._storage.store.describe(self.directory)

    def _track(self, key: str) -> None:
        with self._lock:
            if self._aborted:
                # A stream still being written when the checkpoint was aborted: it must not create
                # an object that abort() can no longer remove (raising here aborts that stream).
                raise StorageError(f"{self.location}: the checkpoint was aborted; no new state files")
            self._written.append(key)

    def _reserve_inline(self, size: int) -> bool:
        """Whether a stream of ``size`` stored bytes may still be inlined (then its bytes are counted)."""
        with self._lock:
            if size > self._inline_left:
                return False
            self._inline_left -= size
            return True

    def _closed(self, handle: StreamHandle) -> None:
        if handle.scope is HandleScope.EXCLUSIVE and handle.path is not None:
            with self._lock:
                self._durable.add(handle.path)

    def adopt(self, handles: Iterable[StateHandle | SubtaskState]) -> None:
        """Vouch for state files another writer wrote into this checkpoint, so that :meth:`commit` accepts
        metadata that references them.

        An embedding runtime's worker processes write their streams with writers of their own and ship
        the handles (``handle_to_json`` / ``subtask_state_to_json`` in ``keystate.storage.format``); the
        coordinator adopts what it received, then commits. Adopting costs no I/O: a worker sends a handle
        only after its stream closed, that is after the file was durable. Inline handles (no file) and
        shared ones (under ``shared/``, not this checkpoint's directory) need no adoption and are
        ignored. Adopted files belong to their writers: :meth:`abort` never deletes them
        (:meth:`discard` does, on request).

        Args:
            handles: stream, keyed or operator state handles, or whole subtask states.

        Raises:
            StorageError: the checkpoint was already committed or aborted.
        """
        paths: set[str] = set()
        for item in handles:
            if isinstance(item, SubtaskState):
                streams: Iterable[StreamHandle] = item.handles()
            elif isinstance(item, StreamHandle):
                streams = (item,)
            else:
                streams = (item.stream,)
            paths.update(h.path for h in streams if h.scope is HandleScope.EXCLUSIVE and h.path is not None)
        with self._lock:
            if self._committed or self._aborted:
                raise StorageError(f"{self.location}: cannot adopt state files into a committed or aborted checkpoint")
            self._durable |= paths

    def open_stream(self, hint: str, scope: HandleScope = HandleScope.EXCLUSIVE) -> StateOutputStream:
        """Open a state stream named after ``hint`` (e.g. ``"orders/3/keyed"``).

        ``HandleScope.SHARED`` places the file under the job's ``shared/`` directory; in a savepoint,
        which must be self-contained, every stream is exclusive.
        """
        if self._done:
            raise StorageError(f"{self.location}: cannot open a stream on a committed or aborted checkpoint")
        if scope is HandleScope.INLINE:
            raise ValueError("inline is decided by the stream's size, not requested")
        if scope is HandleScope.SHARED and self.kind is CheckpointKind.SAVEPOINT:
            scope = HandleScope.EXCLUSIVE
        directory = self.directory
        if scope is HandleScope.SHARED:
            directory = join_key(self._storage.job_directory(self.job_id), SHARED_DIR)
        stream = StateOutputStream(
            self._storage.store,
            directory,
            state_file_name(hint),
            scope,
            self._storage.options,
            self._track,
            self._closed,
            self._reserve_inline,
        )
        with self._lock:
            self._streams.append(stream)
        return stream

    def commit(self, metadata: CheckpointMetadata) -> CompletedCheckpoint:
        """Write ``_metadata`` create-only: the commit point of the checkpoint.

        After ``CommitOutcomeUnknownError`` the same metadata may be committed again: the create-only
        write either lands now, or finds the identical bytes of the earlier attempt (complete), or
        another writer's (``CommitConflictError``).

        Before anything is written, every exclusive state file the metadata references (scope
        ``exclusive``: a path inside this checkpoint's directory) must have been written by this writer
        (a stream it closed successfully) or vouched for with :meth:`adopt`: a file written elsewhere
        (another process's writer) is accepted only once adopted. This costs no I/O. Inline handles
        have no file; shared files are not checked (an incremental checkpoint reuses them from earlier
        checkpoints). A refused commit leaves the writer as it was: adopt what is missing and commit
        again, or :meth:`abort`.

        Raises:
            MissingStateFilesError: the metadata references exclusive files neither written nor adopted
                (a ``CommitFailedError``; nothing was written).
            CommitConflictError: another writer already committed this checkpoint id.
            CommitFailedError: the commit did not happen; nothing changed. Also when the metadata is over
                what a reader accepts (``validation.MAX_DOCUMENT_BYTES``, ``MAX_DOCUMENT_CONTAINERS``):
                then nothing was written and the writer is as it was.
            CommitOutcomeUnknownError: the write failed in a way that may or may not have committed.
        """
        if (metadata.job_id, metadata.checkpoint_id, metadata.kind) != (
            self.job_id,
            self.checkpoint_id,
            self.kind,
        ):
            raise ValueError(
                f"metadata for {metadata.kind} {metadata.checkpoint_id} of job {metadata.job_id} does not match "
                f"the location {self.location} ({self.kind} {self.checkpoint_id} of job {self.job_id})"
            )
        self._check_files(metadata)
        data = dump_metadata(metadata)
        try:
            # What no reader would accept is not committed (a refused commit leaves the writer as it was).
            validation.check_document_limits(data, f"{self.location}/{METADATA_FILE}", CommitFailedError)
        except CommitFailedError as exc:
            raise CommitFailedError(
                f"{exc}; nothing was written: inline less state (StreamOptions.inline_budget, inline_threshold), "
                "or raise the limit in every process that reads this checkpoint"
            ) from None
        with self._lock:
            if self._uncertain is not None and self._uncertain != data:
                raise ValueError(f"{self.location}: a commit whose outcome is unknown can only be retried as it was")
            if self._done and self._uncertain is None:
                raise CommitFailedError(f"{self.location}: checkpoint was already committed or aborted")
            self._done = True
        key = join_key(self.directory, METADATA_FILE)
        store = self._storage.store
        try:
            try:
                store.put(key, data, PutMode.CREATE)
            except AlreadyExistsError:
                self._resolve_existing(key, data, None)
            except StorageError as exc:
                self._resolve_existing(key, data, exc)
        except CommitFailedError:
            self._commit_failed = True
            self._uncertain = None
            raise
        except CommitOutcomeUnknownError:
            # The same bytes may be committed again: identical bytes in place mean complete (section 2).
            self._uncertain = data
            raise
        self._uncertain = None
        self._committed = True
        with self._lock:
            self._streams = []  # closed; each refers back to us (reference cycles keep memory until a gc pass)
        return CompletedCheckpoint(self._storage, self.directory, metadata)

    def _check_files(self, metadata: CheckpointMetadata) -> None:
        """Raise ``MissingStateFilesError`` if the metadata references an exclusive file this writer
        neither closed nor adopted."""
        with self._lock:
            durable = set(self._durable)
        missing = tuple(
            (op.uid, st.index, handle)
            for op in metadata.operators
            for st in op.subtasks
            for handle in st.handles()
            if handle.scope is HandleScope.EXCLUSIVE and handle.path is not None and handle.path not in durable
        )
        if not missing:
            return
        shown = "; ".join(f"operator {uid!r} subtask {index}: {h.describe}" for uid, index, h in missing[:5])
        more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingStateFilesError(
            f"{self.location}: refusing to commit {self.kind} {self.checkpoint_id} of job {self.job_id}: its "
            f"metadata references {len(missing)} exclusive state file(s) this writer neither wrote nor adopted, "
            f"so they may not exist ({shown}{more}); nothing was written. Adopt the handles other writers "
            "(worker processes) shipped with writer.adopt(handles) before committing, or take the snapshot again",
            missing,
        )

    def _resolve_existing(self, key: str, data: bytes, cause: StorageError | None) -> None:
        """After a failed or conflicting create, read back what is there to learn the outcome."""
        store = self._storage.store
        name = f"{self.kind} {self.checkpoint_id} of job {self.job_id}"
        try:
            existing = store.get(key)
        except NotFoundError:
            if isinstance(cause, RequestOutcomeUnknownError):
                # A timeout or dropped connection after the PUT was sent: it may still land (STYLE 6).
                raise CommitOutcomeUnknownError(
                    f"{store.describe(key)}: the commit of {name} failed ({cause}) and its metadata is not there "
                    "yet; the write may still land: load the checkpoint later to learn whether it is complete"
                ) from cause
            raise CommitFailedError(f"{store.describe(key)}: {name} was not committed: {cause}") from cause
        except StorageError as exc:
            raise CommitOutcomeUnknownError(
                f"{store.describe(key)}: the commit of {name} failed ({cause or 'conflict'}) and reading it back "
                f"failed too ({exc}); load the checkpoint to learn whether it is complete"
            ) from exc
        if existing == data:
            log.info("commit of %s found its own metadata already in place (a retried write landed)", name)
            return
        raise CommitConflictError(
            f"{store.describe(key)}: {name} was already committed by another writer; this commit lost and "
            "changed nothing"
        ) from cause

    def abort(self) -> None:
        """Remove everything this checkpoint wrote (also after a ``CommitFailedError``), then the
        checkpoint directory if nothing else is left in it. Completed checkpoints are never touched:
        while a commit is in flight, after it succeeded, or after ``CommitOutcomeUnknownError`` (the
        commit may still land) this does nothing. Objects other writers placed in the directory
        (another coordinator writing the same checkpoint id) are never deleted: between any check and
        the delete that writer could commit, and its checkpoint would lose its files."""
        with self._lock:
            if self._aborted or self._committed or (self._done and not self._commit_failed):
                return
            self._aborted = True
            self._done = True
            streams, written = self._streams, list(self._written)
            self._streams = []
        for stream in streams:
            stream.abort()
        store = self._storage.store
        try:
            store.delete_many(written)
            store.remove_empty_dirs(self.directory)
        except StorageError as exc:
            log.warning("could not remove all files of aborted checkpoint %s: %s", self.location, exc)

    def discard(self, handles: Iterable[StreamHandle]) -> None:
        """Delete the state files of handles that will never be part of this checkpoint: a snapshot
        that finished after the checkpoint was aborted, or the part of a snapshot that failed halfway.
        Inline handles have no file. After :meth:`abort`, empty directories go too.

        Raises:
            StorageError: a file could not be deleted.
        """
        handles = list(handles)
        store = self._storage.store
        keys = []
        for handle in handles:
            if handle.path is None or handle.scope is HandleScope.INLINE:
                continue
            base = self.directory
            if handle.scope is HandleScope.SHARED:
                base = join_key(self._storage.job_directory(self.job_id), SHARED_DIR)
            keys.append(join_key(base, handle.path))
        with self._lock:
            if self._committed:
                raise StorageError(f"{self.location}: cannot discard state files of a completed checkpoint")
            aborted = self._aborted
            # Deleted files no longer vouch for metadata that would reference them.
            self._durable.difference_update(
                h.path for h in handles if h.scope is HandleScope.EXCLUSIVE and h.path is not None
            )
        store.delete_many(keys)
        if aborted:
            store.remove_empty_dirs(self.directory)


class CheckpointStorage:
    """Checkpoints and savepoints under ``base`` in an object store.

    Args:
        store: where the bytes go.
        base: the key prefix of the storage root inside the store ("" = the store's root).
        options: how state streams are written.
        savepoint_dir: the directory (under ``base``) savepoints go to.
        read_limits: what a state file read from here may declare (``ReadLimits``: 16 MiB per block,
            4 GiB per file by default); restores and the tools read through these.
    """

    def __init__(
        self,
        store: ObjectStore,
        base: str = "",
        *,
        options: StreamOptions | None = None,
        savepoint_dir: str = "savepoints",
        read_limits: ReadLimits | None = None,
    ) -> None:
        self.store = store
        self.base = base.strip("/")
        self.options = options or StreamOptions()
        self.savepoint_dir = savepoint_dir
        self.read_limits = read_limits or ReadLimits()

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.location!r})"

    @property
    def location(self) -> str:
        return self.store.describe(self.base)

    def job_directory(self, job_id: str) -> str:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(f"job_id {job_id!r} is not 32 lowercase hex digits")
        return join_key(self.base, job_id)

    # --- writing -------------------------------------------------------------------------------------

    def begin_checkpoint(self, job_id: str, checkpoint_id: int) -> CheckpointWriter:
        """Start writing checkpoint ``checkpoint_id`` of ``job_id`` under ``<job_id>/chk-<id>/``."""
        if checkpoint_id < 0:
            raise ValueError(f"invalid checkpoint ID: {checkpoint_id}")
        directory = join_key(self.job_directory(job_id), f"chk-{checkpoint_id}")
        return CheckpointWriter(self, job_id, checkpoint_id, CheckpointKind.CHECKPOINT, directory)

    def begin_savepoint(self, job_id: str, checkpoint_id: int) -> CheckpointWriter:
        """Start writing a self-contained savepoint under ``savepoints/savepoint-<job6>-<random>/``."""
        self.job_directory(job_id)  # validates the id
        name = f"savepoint-{job_id[:6]}-{uuid.uuid4().hex[:12]}"
        directory = join_key(self.base, self.savepoint_dir, name)
        return CheckpointWriter(self, job_id, checkpoint_id, CheckpointKind.SAVEPOINT, directory)

    # --- finding and loading -------------------------------------------------------------------------

    def load(self, directory: str) -> CompletedCheckpoint:
        """Load the completed checkpoint in ``directory`` (a key in the store).

        Raises:
            CheckpointNotFoundError: the directory has no ``_metadata``.
            MetadataError: the metadata is invalid (or disagrees with the directory name).
        """
        key = join_key(directory, METADATA_FILE)
        where = self.store.describe(key)
        try:
            # One byte past the limit, read when called (the limit is configurable), so an oversized
            # document is refused after reading at most that much.
            data = self.store.get_range(key, 0, validation.MAX_DOCUMENT_BYTES + 1)
        except BucketNotFoundError:
            raise
        except NotFoundError as exc:
            raise CheckpointNotFoundError(
                f"Cannot find meta data file '{METADATA_FILE}' in directory '{self.store.describe(directory)}'; "
                "it is not a completed checkpoint or savepoint"
            ) from exc
        metadata = parse_metadata(data, where)
        parent, _, name = directory.rpartition("/")
        parent_name = parent.rpartition("/")[2]
        m = CHECKPOINT_DIR.fullmatch(name)
        if m and (int(m.group(1)) != metadata.checkpoint_id or metadata.kind is not CheckpointKind.CHECKPOINT):
            raise MetadataError(
                f"{where}: directory {name} holds metadata of {metadata.kind} {metadata.checkpoint_id}; "
                "the checkpoint directory was renamed or its metadata replaced"
            )
        if m and JOB_ID_PATTERN.fullmatch(parent_name) and parent_name != metadata.job_id:
            raise MetadataError(
                f"{where}: job directory {parent_name} holds a checkpoint of job {metadata.job_id}; "
                "the metadata was copied from another job"
            )
        if SAVEPOINT_DIR.fullmatch(name) and metadata.kind is not CheckpointKind.SAVEPOINT:
            raise MetadataError(f"{where}: savepoint directory {name} holds a {metadata.kind}, not a savepoint")
        return CompletedCheckpoint(self, directory, metadata)

    def _has_metadata(self, directory: str) -> bool:
        return self.store.exists(join_key(directory, METADATA_FILE))

    def newest_checkpoint_in(self, job_directory: str) -> CheckpointPointer | None:
        """The completed checkpoint with the highest id in a job directory (a key in the store), or
        ``None``; one listing, then one existence check per checkpoint directory from the newest down.
        """
        ids = sorted(
            (int(m.group(1)) for name in self.store.list_dirs(job_directory) if (m := CHECKPOINT_DIR.fullmatch(name))),
            reverse=True,
        )
        for checkpoint_id in ids:
            directory = join_key(job_directory, f"chk-{checkpoint_id}")
            if self._maybe_complete(directory):
                return CheckpointPointer(CheckpointKind.CHECKPOINT, directory, checkpoint_id)
        return None

    def discarded_error(
        self, directory: str, checkpoint_id: int | None, kind: CheckpointKind
    ) -> CheckpointDiscardedError:
        """The error for a checkpoint or savepoint in ``directory`` found gone while it was read: it
        names the newest completed checkpoint of the same job still there (best effort)."""
        where = self.store.describe(directory)
        what = f"{kind} {checkpoint_id}" if checkpoint_id is not None else str(kind)
        if kind is CheckpointKind.SAVEPOINT:
            return CheckpointDiscardedError(
                f"{what} ({where}) was deleted while it was read; its _metadata no longer exists",
                checkpoint_id=checkpoint_id,
                location=where,
            )
        newest = None
        try:
            newest = self.newest_checkpoint_in(directory.rpartition("/")[0])
        except StorageError as exc:
            log.debug("cannot list the checkpoints next to %s: %s", where, exc)
        if newest is None:
            latest = "no newer completed checkpoint of the job was found"
        else:
            latest = f"the latest is {newest.checkpoint_id} ({self.store.describe(newest.directory)}): read that one"
        return CheckpointDiscardedError(
            f"{what} was discarded while it was read (retention removed it after a newer checkpoint completed; "
            f"it is not damaged, it is gone: {where}); {latest}",
            checkpoint_id=checkpoint_id,
            location=where,
            latest_id=newest.checkpoint_id if newest is not None else None,
            latest_location=self.store.describe(newest.directory) if newest is not None else None,
        )

    def _maybe_complete(self, directory: str) -> bool:
        """Whether a directory has ``_metadata``; one that cannot even be checked is reported (so
        loading it shows the error, so only a debug line here) rather than failing the whole listing."""
        try:
            return self._has_metadata(directory)
        except NotFoundError:
            return False
        except StorageError as exc:
            log.debug("cannot check %s for %s: %s", self.store.describe(directory), METADATA_FILE, exc)
            return True

    def discover(self, key: str = "") -> list[CheckpointPointer]:
        """Completed checkpoints and savepoints under ``key`` (relative to the base).

        ``key`` may be the storage root, a job directory, or a savepoints directory. Directories
        without ``_metadata`` are incomplete and never reported. Checkpoints come newest id first.
        """
        top = join_key(self.base, key)
        found: list[CheckpointPointer] = []

        def scan(directory: str, depth: int) -> None:
            for name in self.store.list_dirs(directory):
                child = join_key(directory, name)
                if m := CHECKPOINT_DIR.fullmatch(name):
                    found.append(CheckpointPointer(CheckpointKind.CHECKPOINT, child, int(m.group(1))))
                elif SAVEPOINT_DIR.fullmatch(name):
                    found.append(CheckpointPointer(CheckpointKind.SAVEPOINT, child))
                elif depth == 0 and (JOB_ID_PATTERN.fullmatch(name) or name == self.savepoint_dir):
                    scan(child, 1)

        scan(top, 0)
        complete = [p for p in found if self._maybe_complete(p.directory)]
        complete.sort(key=lambda p: (p.kind is CheckpointKind.CHECKPOINT, p.checkpoint_id or 0), reverse=True)
        return complete

    def list_checkpoints(self, job_id: str) -> list[CheckpointPointer]:
        """Completed checkpoints (not savepoints) of one job, newest first."""
        return [p for p in self.discover(job_id) if p.kind is CheckpointKind.CHECKPOINT]

    def latest(self, key: str = "", *, skip_corrupt: bool = False) -> CompletedCheckpoint | None:
        """The newest completed checkpoint or savepoint under ``key`` by (timestamp, id).

        Args:
            key: storage root (default), a job directory or a savepoints directory, relative to base.
            skip_corrupt: if the newest metadata cannot be read, log it and use the next one
                (what a job does on recovery) instead of raising (what a tool does).
        """
        best: CompletedCheckpoint | None = None
        for _ in range(_VANISHED_ROUNDS):
            best, vanished = self._latest_once(key, skip_corrupt)
            if not vanished:
                break
            # A checkpoint discovered complete was gone when loaded: retention discarded it because a
            # newer one completed meanwhile, which the next discovery sees.
        return best

    def _latest_once(self, key: str, skip_corrupt: bool) -> tuple[CompletedCheckpoint | None, bool]:
        best: CompletedCheckpoint | None = None
        vanished = False
        seen_jobs: set[str] = set()
        for pointer in self.discover(key):
            if pointer.kind is CheckpointKind.CHECKPOINT:
                job_dir = pointer.directory.rsplit("/", 1)[0]
                if job_dir in seen_jobs:
                    continue  # only the newest loadable checkpoint of each job can win
            try:
                candidate = self.load(pointer.directory)
            except CheckpointNotFoundError:
                # Complete when discovered, gone now: discarded meanwhile, not damaged. The next one wins.
                log.debug("%s was discarded while the latest checkpoint was looked for",
                          self.store.describe(pointer.directory))  # fmt: skip
                vanished = True
                continue
            except (MetadataError, NotFoundError) as exc:
                if not skip_corrupt:
                    raise
                log.warning("skipping unreadable checkpoint %s: %s", self.store.describe(pointer.directory), exc)
                continue
            if pointer.kind is CheckpointKind.CHECKPOINT:
                seen_jobs.add(pointer.directory.rsplit("/", 1)[0])
            order = (candidate.metadata.timestamp, candidate.checkpoint_id)
            if best is None or order > (best.metadata.timestamp, best.checkpoint_id):
                best = candidate
        return best, vanished

    def resolve(self, key: str = "") -> CompletedCheckpoint:
        """Load what a user pointed at: a checkpoint or savepoint directory, its ``_metadata``, a job
        directory or a storage root (then the newest completed checkpoint or savepoint below it).

        Raises:
            CheckpointNotFoundError: nothing completed is there.
        """
        full = join_key(self.base, key)
        if full.endswith("/" + METADATA_FILE) or full == METADATA_FILE:
            return self.load(full.rsplit("/", 1)[0] if "/" in full else "")
        if full and self._has_metadata(full):
            try:
                return self.load(full)
            except CheckpointNotFoundError as exc:
                # There a moment ago, gone now: discarded while it was being read.
                name = full.rpartition("/")[2]
                m = CHECKPOINT_DIR.fullmatch(name)
                kind = CheckpointKind.SAVEPOINT if SAVEPOINT_DIR.fullmatch(name) else CheckpointKind.CHECKPOINT
                raise self.discarded_error(full, int(m.group(1)) if m else None, kind) from exc
        latest = self.latest(key)
        if latest is None:
            raise CheckpointNotFoundError(
                f"Cannot find checkpoint or savepoint at '{self.store.describe(full)}': no directory with "
                f"'{METADATA_FILE}' there or below it"
            )
        return latest

    # --- deleting ------------------------------------------------------------------------------------

    def discard(self, checkpoint: CompletedCheckpoint, *, keep_shared: set[str] | None = None) -> None:
        """Delete a completed checkpoint: ``_metadata`` first (so it is never seen half-deleted), then
        its exclusive files, then the shared files no path in ``keep_shared`` names.
        """
        store = self.store
        store.delete(join_key(checkpoint.directory, METADATA_FILE))
        keys: list[str] = []
        for handle in checkpoint.metadata.handles():
            if handle.scope is HandleScope.SHARED and handle.path in (keep_shared or set()):
                continue
            key = checkpoint.state_key(handle)
            if key is not None:
                keys.append(key)
        store.delete_many(keys)
        store.delete_prefix(checkpoint.directory)

    def cleanup_incomplete(self, job_id: str, below: int) -> list[str]:
        """Delete checkpoint directories of ``job_id`` with id < ``below`` that have no ``_metadata``
        (left by a crash or an abort that could not finish). Returns the directories removed.
        """
        removed: list[str] = []
        job_dir = self.job_directory(job_id)
        for name in self.store.list_dirs(job_dir):
            m = CHECKPOINT_DIR.fullmatch(name)
            if m and int(m.group(1)) < below:
                directory = join_key(job_dir, name)
                if not self._has_metadata(directory):
                    self.store.delete_prefix(directory)
                    removed.append(directory)
        return removed
