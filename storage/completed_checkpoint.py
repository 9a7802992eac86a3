"""A completed checkpoint or savepoint (its ``_metadata`` exists): where its state files are, opening them,
and telling a checkpoint retention discarded while it was read from a damaged one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from keystate.storage.base import join_key
from keystate.storage.checkpoint_layout import METADATA_FILE, SHARED_DIR
from keystate.storage.errors import MetadataError, StorageError
from keystate.storage.format.metadata import CheckpointKind, CheckpointMetadata, HandleScope, StreamHandle
from keystate.storage.format.statefile import BytesSource, StateFileReader
from keystate.storage.statefile_io import StoreSource

if TYPE_CHECKING:
    from keystate.storage.checkpoints import CheckpointStorage

__all__ = ["CompletedCheckpoint"]

log = logging.getLogger(__name__)


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
