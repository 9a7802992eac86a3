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

:class:`CheckpointStorage` lives here; the layout's names and :class:`CheckpointPointer` in
``checkpoint_layout``, :class:`CompletedCheckpoint` in ``completed_checkpoint`` and
:class:`CheckpointWriter` in ``checkpoint_writer``, all importable from here too.
"""

from __future__ import annotations

import logging
import uuid

from keystate.storage.base import ObjectStore, join_key
from keystate.storage.checkpoint_layout import (
    CHECKPOINT_DIR,
    METADATA_FILE,
    SAVEPOINT_DIR,
    SHARED_DIR,
    CheckpointPointer,
)
from keystate.storage.checkpoint_writer import CheckpointWriter
from keystate.storage.completed_checkpoint import CompletedCheckpoint
from keystate.storage.errors import (
    BucketNotFoundError,
    CheckpointDiscardedError,
    CheckpointNotFoundError,
    MetadataError,
    NotFoundError,
    StorageError,
)
from keystate.storage.format import validation
from keystate.storage.format._metadata_versions import parse_metadata
from keystate.storage.format.metadata import JOB_ID_PATTERN, CheckpointKind, HandleScope
from keystate.storage.format.statefile import ReadLimits
from keystate.storage.streams import StreamOptions

__all__ = [
    "CHECKPOINT_DIR",
    "METADATA_FILE",
    "SAVEPOINT_DIR",
    "SHARED_DIR",
    "CheckpointPointer",
    "CheckpointStorage",
    "CheckpointWriter",
    "CompletedCheckpoint",
]

log = logging.getLogger(__name__)

_VANISHED_ROUNDS = 3
"""Discoveries :meth:`CheckpointStorage.latest` makes when checkpoints it found vanish before it loads them."""


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
        its exclusive files, then the shared files no path in ``keep_shared`` names. A running job's
        retention keeps every shared file here and leaves them to its
        :class:`~keystate.storage.shared_registry.SharedStateRegistry`, which knows what else needs them.
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
