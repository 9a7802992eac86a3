"""Writing one checkpoint or savepoint: state streams first, ``_metadata`` last, create-only.

The commit writes ``_metadata`` create-only. If the create finds an object, the commit compares bytes:
identical bytes mean our own retried PUT landed (success); different bytes mean another writer won
(``CommitConflictError``). A failure whose outcome cannot be read back is ``CommitOutcomeUnknownError``.
Shared state streams (under the job's ``shared/`` directory) get unique names below a directory named
after the checkpoint that writes them, ``by-chk-<id>/`` (:func:`shared_file_path`), and record it
(``written_by``). Before the commit, every shared file the metadata references must be in the store with
the size its handle records: a file deleted meanwhile (an orphan removal of another run) is never
committed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from keystate.storage.base import PutMode, join_key
from keystate.storage.checkpoint_layout import METADATA_FILE, SHARED_DIR
from keystate.storage.completed_checkpoint import CompletedCheckpoint
from keystate.storage.errors import (
    AlreadyExistsError,
    CommitConflictError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    MissingStateFilesError,
    NotFoundError,
    RequestOutcomeUnknownError,
    StorageError,
)
from keystate.storage.format import validation
from keystate.storage.format._metadata_versions import dump_metadata
from keystate.storage.format.metadata import CheckpointKind, CheckpointMetadata, HandleScope, StreamHandle, SubtaskState
from keystate.storage.format.transfer import StateHandle
from keystate.storage.streams import StateOutputStream, state_file_name

if TYPE_CHECKING:
    from keystate.storage.checkpoints import CheckpointStorage

__all__ = ["CheckpointWriter", "shared_file_path", "shared_file_writer"]

log = logging.getLogger(__name__)

SHARED_WRITER_PREFIX = "by-chk-"
"""Shared files live under ``shared/by-chk-<id>/``, ``<id>`` being the checkpoint that wrote them."""
_SHARED_WRITER_DIR = re.compile(r"by-chk-(0|[1-9][0-9]{0,18})")


def shared_file_path(checkpoint_id: int, hint: str) -> str:
    """A new shared file's path relative to the job's ``shared/`` directory:
    ``by-chk-<checkpoint_id>/<hint segments>/<last segment>-<16 hex>.ksf``. The first segment names the
    checkpoint that writes the file, so that the orphan removal of a later run can tell which checkpoint
    an unreferenced file belongs to without reading it (``SharedStateRegistry.remove_orphans``)."""
    return f"{SHARED_WRITER_PREFIX}{checkpoint_id}/{state_file_name(hint)}"


def shared_file_writer(path: str) -> int | None:
    """The checkpoint that wrote the shared file at ``path`` (relative to ``shared/``), from its first
    segment ``by-chk-<id>``; ``None`` for a path without one (written by an older keystate, or by hand)."""
    head, sep, _ = path.partition("/")
    found = _SHARED_WRITER_DIR.fullmatch(head) if sep else None
    return None if found is None else int(found.group(1))


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

        ``HandleScope.SHARED`` places the file under the job's ``shared/`` directory, with a unique name
        (a random suffix: writers in several processes never collide), and its handle records
        ``written_by`` = this checkpoint's id. A shared stream is never inlined, however small: later
        checkpoints reference it by path. In a savepoint, which must be self-contained, every stream is exclusive.
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
        shared = scope is HandleScope.SHARED
        stream = (_SharedOutputStream if shared else StateOutputStream)(
            self._storage.store,
            directory,
            shared_file_path(self.checkpoint_id, hint) if shared else state_file_name(hint),
            scope,
            self._storage.options,
            self._track,
            self._closed,
            _never_inline if shared else self._reserve_inline,
        )
        if isinstance(stream, _SharedOutputStream):
            stream.written_by = self.checkpoint_id
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
        have no file. Every **shared** file the metadata references, the ones this checkpoint wrote
        (``written_by`` = its id) and the ones it reuses from earlier checkpoints, must be in the store
        with the size its handle records: another run's orphan removal may have deleted it (a zombie
        writer's files, or a base only this writer's subtasks still built on), and a complete checkpoint
        must never point at nothing. This costs one listing of the job's ``shared/`` directory (on S3,
        one request per 1000 files). A refused
        commit leaves the writer as it was: adopt what is missing and commit again, or :meth:`abort`.

        Raises:
            MissingStateFilesError: the metadata references exclusive files neither written nor adopted,
                or shared files not in the store or of another size (a ``CommitFailedError``; nothing
                was written).
            CommitConflictError: another writer already committed this checkpoint id.
            CommitFailedError: the commit did not happen; nothing changed. Also when the shared files
                could not be listed, or the metadata is over what a reader accepts
                (``validation.MAX_DOCUMENT_BYTES``, ``MAX_DOCUMENT_CONTAINERS``): then nothing was written
                and the writer is as it was.
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
        self._check_shared_files(metadata)
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
        listed = _first_references(missing, lambda h: h.describe)
        raise MissingStateFilesError(
            f"{self.location}: refusing to commit {self.kind} {self.checkpoint_id} of job {self.job_id}: its "
            f"metadata references {len(missing)} exclusive state file(s) this writer neither wrote nor adopted, "
            f"so they may not exist ({listed}); nothing was written. Adopt the handles other writers "
            "(worker processes) shipped with writer.adopt(handles) before committing, or take the snapshot again",
            missing,
        )

    def _check_shared_files(self, metadata: CheckpointMetadata) -> None:
        """Raise ``MissingStateFilesError`` if a shared file the metadata references is not in the store
        with the size its handle records (``CommitFailedError`` if the store cannot tell)."""
        references = [
            (op.uid, st.index, handle)
            for op in metadata.operators
            for st in op.subtasks
            for handle in st.handles()
            if handle.scope is HandleScope.SHARED and handle.path is not None
        ]
        if not references:
            return
        shared_dir = join_key(self._storage.job_directory(self.job_id), SHARED_DIR)
        store = self._storage.store
        try:  # one listing (on S3, one request per 1000 files), however long the chains are
            found: dict[str, int] = {
                info.key[len(shared_dir) + 1 :]: info.size
                for info in store.list_objects(shared_dir)
                if info.key.startswith(shared_dir + "/")
            }
        except StorageError as exc:
            raise CommitFailedError(
                f"{self.location}: refusing to commit {self.kind} {self.checkpoint_id} of job {self.job_id}: "
                f"could not check that its shared state files exist ({exc}); nothing was written; commit again"
            ) from exc
        bad = [(uid, index, h) for uid, index, h in references if found.get(h.path or "") != h.size]
        if not bad:
            return

        def what(h: StreamHandle) -> str:
            size = found.get(h.path or "")
            state = "not in the store" if size is None else f"{size} bytes in the store"
            return f"{h.describe} (written by checkpoint {h.written_by}; expected {h.size} bytes, found {state})"

        listed = _first_references(bad, what)
        raise MissingStateFilesError(
            f"{self.location}: refusing to commit {self.kind} {self.checkpoint_id} of job {self.job_id}: its "
            f"metadata references {len(bad)} shared state file(s) under {store.describe(shared_dir)} that are "
            f"missing or not of their recorded size ({listed}); nothing was written. Another run of the job "
            "may have removed them as orphans (is a second coordinator running for this job id?): abort this "
            "checkpoint and restart the job from its latest completed checkpoint",
            tuple(bad),
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
        Inline handles have no file. Only files this checkpoint wrote are deleted: a shared handle whose
        ``written_by`` is another checkpoint (the base and earlier deltas an incremental snapshot
        references, which completed checkpoints reference too) is skipped. After :meth:`abort`, empty
        directories go too.

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
                if handle.written_by != self.checkpoint_id:
                    continue
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


def _never_inline(size: int) -> bool:
    return False


class _SharedOutputStream(StateOutputStream):
    """A stream into the job's ``shared/`` directory: its file handle records the writing checkpoint."""

    written_by: int | None = None

    def close(self) -> StreamHandle:
        handle = super().close()
        if handle.scope is HandleScope.SHARED and handle.written_by is None:
            handle = dataclasses.replace(handle, written_by=self.written_by)
        return handle


def _first_references(refs: Sequence[tuple[str, int, StreamHandle]], what: Callable[[StreamHandle], str]) -> str:
    """The first five ``(operator, subtask, handle)`` references of a refused commit, for its message."""
    shown = "; ".join(f"operator {uid!r} subtask {index}: {what(h)}" for uid, index, h in refs[:5])
    return shown + (f"; and {len(refs) - 5} more" if len(refs) > 5 else "")
