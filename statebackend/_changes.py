"""Which keys changed since the last completed checkpoint: the bookkeeping of incremental snapshots.

The engines record every key written or deleted in a *dirty-key set* (keys only, never values; the
:class:`~keystate.statebackend._kv.KVStore` ``take_changes`` swap). Each incremental snapshot closes an
*epoch*: the synchronous part swaps in a fresh set (O(1)) and files the old one under the snapshot's
checkpoint id. A delta for checkpoint ``n`` covers every epoch after the backend's last *confirmed*
checkpoint ``c`` (notified complete), so the changes of a checkpoint that failed or was aborted roll into
the next delta; its chain is ``chain(c) + [delta(n)]``. Confirming ``c`` frees the epochs up to ``c``.

A full base is written instead of a delta (materialization) when there is no confirmed chain (a fresh
backend, a rescaled restore, a confirmed checkpoint without state), when the chain already has
``max_chain_length`` deltas, when its deltas hold more than ``max_delta_ratio`` times its base's bytes,
or when the retained epochs hold more than ``max_tracked_keys`` keys (then they are dropped: the memory
of the tracking stays bounded even when no checkpoint is ever confirmed).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keystate.statebackend.state import SnapshotOptions
from keystate.storage.format.metadata import CheckpointKind, HandleScope, KeyedStateHandle

if TYPE_CHECKING:
    from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint

__all__ = ["DEFAULT_MAX_TRACKED_KEYS", "Chain", "ChangeTracker", "Plan", "extendable"]

log = logging.getLogger(__name__)

DEFAULT_MAX_TRACKED_KEYS = 8_000_000
"""Dirty keys the retained epochs may hold together (about 100 bytes each with 20-byte keys) before the
tracker drops them and the next incremental snapshot is a full one."""


@dataclass(frozen=True, slots=True)
class Chain:
    """A completed checkpoint's keyed handle that later deltas may extend."""

    checkpoint_id: int
    handle: KeyedStateHandle
    restored_from: CompletedCheckpoint | None = None
    """The checkpoint the backend restored this chain from (``None``: a chain the backend wrote itself)."""

    def continues_in(self, writer: CheckpointWriter) -> bool:
        """Whether a delta written by ``writer`` may reference this chain's files: always for a chain the
        backend wrote; for a restored one only if it is a checkpoint (not a savepoint) of the job the
        writer writes for, in the same job directory (shared paths resolve against the job directory of
        the checkpoint that references them, and only that job's retention keeps them)."""
        origin = self.restored_from
        if origin is None:
            return True
        return (
            origin.kind is CheckpointKind.CHECKPOINT
            and origin.metadata.job_id == writer.job_id
            and origin.location.rpartition("/")[0] == writer.location.rpartition("/")[0]
        )

    @property
    def base_bytes(self) -> int:
        return self.handle.stream.size

    @property
    def delta_bytes(self) -> int:
        return sum(d.stream.size for d in self.handle.deltas)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one incremental snapshot writes: a delta on ``chain`` of the keys in ``changes``, or (``chain``
    ``None``) a full base."""

    checkpoint_id: int
    chain: Chain | None
    changes: tuple[frozenset[bytes] | set[bytes], ...] = ()
    """The epochs after ``chain``'s checkpoint (closed, never changed again): their union is the delta's keys."""


def extendable(handle: KeyedStateHandle) -> bool:
    """Whether later deltas can reference this handle's files: its base is a shared file with its writer."""
    return handle.stream.scope is HandleScope.SHARED and handle.stream.written_by is not None


class ChangeTracker:
    """Epochs of changed keys, the confirmed chain and the snapshots written but not yet confirmed.

    Epochs and the confirmed chain change on the task thread; :meth:`written` comes from the thread that
    wrote a snapshot, so the written handles are guarded by a lock.
    """

    def __init__(self, max_tracked_keys: int = DEFAULT_MAX_TRACKED_KEYS) -> None:
        self.max_tracked_keys = max_tracked_keys
        self._epochs: dict[int, set[bytes]] = {}  # checkpoint id that closed it -> keys changed in it, ascending
        self._confirmed: Chain | None = None
        self._confirmed_id: int | None = None  # also when that checkpoint held no state (no chain)
        self._floor = -1
        """Chains of checkpoints below this cannot be extended: the epochs after them were dropped."""
        self._lock = threading.Lock()
        self._written: dict[int, KeyedStateHandle | None] = {}
        self._taken: set[int] = set()  # incremental snapshots taken and not yet written, confirmed or aborted
        self._complete_early: set[int] = set()  # notified complete before their write finished

    @property
    def confirmed(self) -> Chain | None:
        return self._confirmed

    @property
    def tracked_keys(self) -> int:
        """Keys in the retained epochs (counted once per epoch)."""
        return sum(map(len, self._epochs.values()))

    def plan(self, checkpoint_id: int, closed: set[bytes], options: SnapshotOptions) -> Plan:
        """Close the epoch ending at ``checkpoint_id`` (its changed keys: ``closed``) and decide what the
        snapshot writes. Checkpoint ids increase; one that does not (a job restarted with new ids) starts
        over with a full base, as does an overflow of :attr:`max_tracked_keys`."""
        last = max(self._epochs, default=self._confirmed_id if self._confirmed_id is not None else -1)
        self._epochs[checkpoint_id] = closed
        with self._lock:
            self._taken.add(checkpoint_id)
        if checkpoint_id <= last or self.tracked_keys > self.max_tracked_keys:
            if checkpoint_id <= last:
                log.warning("incremental snapshot for checkpoint %d after %d: writing a full base", checkpoint_id, last)
            # This snapshot is full, and only a chain from here on can be extended.
            self._epochs = {checkpoint_id: set()}
            self._floor = checkpoint_id
            self._confirmed, self._confirmed_id = None, None
            return Plan(checkpoint_id, None)
        chain = self._confirmed
        if (
            chain is None
            or chain.checkpoint_id < self._floor
            or len(chain.handle.deltas) >= options.max_chain_length
            or chain.delta_bytes > options.max_delta_ratio * chain.base_bytes
        ):
            return Plan(checkpoint_id, None)
        return Plan(
            checkpoint_id, chain, tuple(keys for cid, keys in self._epochs.items() if cid > chain.checkpoint_id)
        )

    def written(self, checkpoint_id: int, handle: KeyedStateHandle | None) -> None:
        """The snapshot for ``checkpoint_id`` wrote ``handle`` (``None``: it held no state). Any thread."""
        with self._lock:
            if checkpoint_id not in self._taken:
                return  # aborted meanwhile
            self._taken.discard(checkpoint_id)
            self._written[checkpoint_id] = handle
            early = checkpoint_id in self._complete_early
        if early:
            self.complete(checkpoint_id)

    def failed(self, checkpoint_id: int) -> None:
        """The snapshot for ``checkpoint_id`` wrote nothing usable (its write failed or it was released)."""
        with self._lock:
            self._taken.discard(checkpoint_id)
            self._complete_early.discard(checkpoint_id)

    def complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: its chain becomes the one later deltas extend."""
        with self._lock:
            if checkpoint_id in self._taken:
                self._complete_early.add(checkpoint_id)
                return
            self._complete_early.discard(checkpoint_id)
            if checkpoint_id not in self._written:
                return  # not an incremental snapshot of this backend (a savepoint, another backend's)
            handle = self._written.pop(checkpoint_id)
            for older in [cid for cid in self._written if cid < checkpoint_id]:
                del self._written[older]  # subsumed: never confirmed now
            if self._confirmed_id is not None and checkpoint_id <= self._confirmed_id:
                return  # the chain only moves forward: based_on is a lower bound for later snapshots
            self._confirmed_id = checkpoint_id
            self._confirmed = None if handle is None or not extendable(handle) else Chain(checkpoint_id, handle)
        self._epochs = {cid: keys for cid, keys in self._epochs.items() if cid > checkpoint_id}

    def abort(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` will never complete: forget its handle; its epoch stays, so its
        changes go into the next delta."""
        with self._lock:
            self._taken.discard(checkpoint_id)
            self._complete_early.discard(checkpoint_id)
            self._written.pop(checkpoint_id, None)

    def restored(self, checkpoint: CompletedCheckpoint | None, handle: KeyedStateHandle | None) -> None:
        """The backend was restored from ``handle`` of ``checkpoint`` (``None``: not from one handle of its
        own key groups): the next delta extends that handle if it can be extended, the checkpoint is not
        a savepoint, and (checked when the delta is written, :meth:`Chain.continues_in`) it is a checkpoint
        of the job the delta is written for."""
        self._epochs = {}
        with self._lock:
            self._written.clear()
            self._taken.clear()
            self._complete_early.clear()
            savepoint = checkpoint is not None and checkpoint.kind is not CheckpointKind.CHECKPOINT
            if checkpoint is None or handle is None or savepoint or not extendable(handle):
                self._confirmed, self._confirmed_id = None, None
            else:
                self._confirmed_id = checkpoint.checkpoint_id
                self._confirmed = Chain(checkpoint.checkpoint_id, handle, checkpoint)

    def refuse(self, chain: Chain) -> None:
        """``chain`` (a restored one) cannot be continued by the checkpoints this backend now writes: the
        snapshots after it write full bases until one of them is confirmed. Any thread."""
        with self._lock:
            if self._confirmed is chain:
                self._confirmed = None
