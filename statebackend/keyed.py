"""The keyed state backend over a KV engine, and the LMDB and heap backends built from it."""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from keystate.statebackend._changes import DEFAULT_MAX_TRACKED_KEYS, ChangeTracker, Plan, extendable
from keystate.statebackend._delta import ChainReader, DeltaHeader, write_delta
from keystate.statebackend._entry_format import ttl_filter
from keystate.statebackend._heap import HeapKV
from keystate.statebackend._kv import Chunk, KVSnapshot, KVStore, sorted_in_slices
from keystate.statebackend._lmdb import LmdbKV
from keystate.statebackend._snapshot import SnapshotMeta, StateMeta, write_keyed_snapshot
from keystate.statebackend._states import make_state
from keystate.statebackend.errors import (
    KeyGroupOutOfRangeError,
    LmdbError,
    MaxParallelismMismatchError,
    StateError,
    StateMigrationError,
    StateRestoreError,
    StateSnapshotError,
)
from keystate.statebackend.keygroups import KEY_GROUP_DIGEST, KEY_GROUP_HASH
from keystate.statebackend.serializers import BytesSerializer, KeySerializer, Serializer
from keystate.statebackend.state import (
    KeyedSnapshot,
    KeyedStateBackend,
    MapStateDescriptor,
    SnapshotOptions,
    State,
    StateDescriptor,
)
from keystate.statebackend.ttl import Clock, system_clock_ms
from keystate.storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from keystate.storage.errors import KeystateError
from keystate.storage.format.keygroups import KeyGroupRange, check_max_parallelism
from keystate.storage.format.metadata import HandleScope, KeyedStateHandle
from keystate.storage.streams import StateOutputStream

__all__ = ["HeapKeyedStateBackend", "KVKeyedStateBackend", "LmdbKeyedStateBackend"]

_U16 = struct.Struct(">H")
MAX_KEY_BYTES = 400
"""Serialized keys longer than this are rejected (LMDB keys are limited to 511 bytes in total)."""
# Precomputed ">H" encodings: key-group prefixes and key-length prefixes (hot path of set_current_key).
_U16_BYTES = [_U16.pack(i) for i in range(1 << 15)]
_IMMUTABLE_KEYS = frozenset({bytes, str, int, float, bool})
"""Key types whose objects cannot change, so the same object serializes the same (not tuple: one may hold
a list that a custom key serializer accepts)."""


def _translated(chunk: Chunk, translate: dict[bytes, bytes]) -> Chunk:
    """A restored chunk with the snapshot's state ids replaced by ours, sorted again."""
    return sorted((k[:2] + translate.get(k[2:4], k[2:4]) + k[4:], v) for k, v in chunk)


class _SharedScope:
    """A checkpoint writer whose streams go to the job's ``shared/`` directory (a chain's base)."""

    def __init__(self, writer: CheckpointWriter) -> None:
        self._writer = writer

    def open_stream(self, hint: str, scope: HandleScope = HandleScope.SHARED) -> StateOutputStream:
        return self._writer.open_stream(hint, HandleScope.SHARED)


class _Snapshot(KeyedSnapshot):
    """A full snapshot (``plan`` ``None``: exclusive, outside any chain) or an incremental one: a delta on
    ``plan.chain``, or a new shared base."""

    def __init__(
        self, backend: KVKeyedStateBackend, view: KVSnapshot, meta: SnapshotMeta, now: int, plan: Plan | None = None
    ) -> None:
        self._backend = backend
        self._view: KVSnapshot | None = view
        self._meta = meta
        self._now = now
        self._plan = plan
        self.based_on = None if plan is None or plan.chain is None else plan.chain.checkpoint_id

    def write(self, writer: CheckpointWriter, hint: str) -> KeyedStateHandle | None:
        view = self._view
        if view is None:
            raise StateSnapshotError("keyed snapshot was already written or released")
        b = self._backend
        plan, self._plan = self._plan, None
        if plan is not None and plan.chain is not None and not plan.chain.continues_in(writer):
            # A restored chain of a savepoint or another job (its files are not this job's): a new base.
            b.tracker.refuse(plan.chain)
            plan = Plan(plan.checkpoint_id, None)
            self.based_on = None
        try:
            handle = self._write(writer, hint, view, plan)
        except KeystateError as exc:
            if plan is not None:
                b.tracker.failed(plan.checkpoint_id)
            raise StateSnapshotError(
                f"operator {b.operator_uid!r} subtask {b.subtask_index}: keyed snapshot failed: {exc}"
            ) from exc
        except BaseException:
            if plan is not None:
                b.tracker.failed(plan.checkpoint_id)
            raise
        finally:
            self.release()
        if plan is not None:
            b.tracker.written(plan.checkpoint_id, handle)
        return handle

    def _write(
        self, writer: CheckpointWriter, hint: str, view: KVSnapshot, plan: Plan | None
    ) -> KeyedStateHandle | None:
        key_groups = self._backend.key_groups
        if plan is None:
            return write_keyed_snapshot(writer, hint, view, key_groups, self._meta, self._now)
        if plan.chain is None:  # a new base: shared, as later deltas reference it
            shared = cast(CheckpointWriter, _SharedScope(writer))
            handle = write_keyed_snapshot(shared, hint, view, key_groups, self._meta, self._now)
            if handle is not None and handle.stream.written_by is None and handle.stream.scope is HandleScope.SHARED:
                handle = replace(handle, stream=replace(handle.stream, written_by=plan.checkpoint_id))
            return handle
        keys = sorted_in_slices(set().union(*plan.changes))
        if not keys:
            return plan.chain.handle  # nothing changed: the confirmed chain as it is, no new file
        header = DeltaHeader(plan.checkpoint_id, plan.chain.checkpoint_id, self._meta)
        return write_delta(writer, hint, view, keys, plan.chain.handle, header, self._now)

    def release(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            view.release()
        plan, self._plan = self._plan, None
        if plan is not None:
            self._backend.tracker.failed(plan.checkpoint_id)


class KVKeyedStateBackend(KeyedStateBackend):
    """The keyed backend, written once over any :class:`~keystate.statebackend._kv.KVStore`.

    Args:
        kv: the engine (LMDB or heap).
        operator_uid: the operator's uid (used in messages and snapshot file names).
        subtask_index: the subtask's index.
        max_parallelism: the number of key groups.
        key_groups: the key groups this subtask owns.
        key_serializer: how keys become bytes (and hence key groups).
        clock: processing time in ms, for TTL.
        max_tracked_keys: changed keys remembered for incremental snapshots (keys only) before the next
            incremental snapshot is a full one instead (docs/statebackend.md, "Incremental snapshots").
    """

    def __init__(
        self,
        kv: KVStore,
        *,
        operator_uid: str,
        subtask_index: int,
        max_parallelism: int,
        key_groups: KeyGroupRange,
        key_serializer: Serializer[Any] | None = None,
        clock: Clock = system_clock_ms,
        max_tracked_keys: int = DEFAULT_MAX_TRACKED_KEYS,
    ) -> None:
        check_max_parallelism(max_parallelism)
        if not key_groups or key_groups.end >= max_parallelism:
            raise ValueError(f"key groups {key_groups} do not fit max_parallelism {max_parallelism}")
        self.kv = kv
        self.operator_uid = operator_uid
        self.subtask_index = subtask_index
        self.max_parallelism = max_parallelism
        self.key_groups = key_groups
        self.clock = clock
        self._key_ser: Serializer[Any] = key_serializer or KeySerializer()
        self._serialize_key = self._key_ser.serialize
        self._bytes_keys = type(self._key_ser) is BytesSerializer  # bytes keys serialize to themselves
        self._kg_start, self._kg_end = key_groups.start, key_groups.end
        self._current: Any = None
        self.key_group_prefix = b""
        self.key_part = b""
        self._registry: dict[str, StateMeta] = {}
        self._snapshot_meta: SnapshotMeta | None = None  # cached until the registry changes
        self._states: dict[str, tuple[StateDescriptor[Any], State]] = {}
        self._closed = False
        self.tracker = ChangeTracker(max_tracked_keys)
        """Epochs of changed keys and the confirmed chain (incremental snapshots)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.operator_uid!r}[{self.subtask_index}], key groups {self.key_groups})"

    # --- keys ----------------------------------------------------------------------------------------

    def set_current_key(self, key: Any) -> None:
        if key is self._current and key.__class__ in _IMMUTABLE_KEYS and self.key_part:
            return  # the same immutable key object again: same bytes, and the states' key caches stay valid
        raw = key if key.__class__ is bytes and self._bytes_keys else self._serialize_key(key)
        kg = KEY_GROUP_DIGEST(raw) % self.max_parallelism  # assign_key_group(), inlined (per record)
        if kg < self._kg_start or kg > self._kg_end:
            raise KeyGroupOutOfRangeError(
                f"operator {self.operator_uid!r} subtask {self.subtask_index}: key {key!r} is in key group {kg}, "
                f"outside this subtask's key groups {self.key_groups}; the key was routed to the wrong subtask"
            )
        if len(raw) > MAX_KEY_BYTES:
            raise StateError(
                f"operator {self.operator_uid!r}: key {str(key)[:40]!r}... serializes to {len(raw)} bytes, more "
                f"than {MAX_KEY_BYTES}; use a shorter key (e.g. a hash of it)"
            )
        self._current = key
        self.key_group_prefix = _U16_BYTES[kg]
        self.key_part = _U16_BYTES[len(raw)] + raw

    @property
    def current_key(self) -> Any:
        return self._current

    @property
    def key_serializer(self) -> Serializer[Any]:
        return self._key_ser

    # --- state registration --------------------------------------------------------------------------

    def _meta_for(self, descriptor: StateDescriptor[Any]) -> StateMeta:
        uks = descriptor.key_serializer.name if isinstance(descriptor, MapStateDescriptor) else None
        existing = self._registry.get(descriptor.name)
        if existing is None:
            sid = max((m.sid for m in self._registry.values()), default=0) + 1
            if sid > 0xFFFF:
                raise StateError(f"operator {self.operator_uid!r}: more than 65535 states")
            meta = StateMeta(sid, descriptor.name, descriptor.kind, descriptor.serializer.name, uks, descriptor.ttl)
            self._register(meta)
            return meta
        where = f"operator {self.operator_uid!r}: state {descriptor.name!r}"
        if existing.kind is not descriptor.kind:
            raise StateMigrationError(
                f"{where} was written as {existing.kind} state but is now declared {descriptor.kind}; "
                "use a new state name"
            )
        if (existing.serializer, existing.user_key_serializer) != (descriptor.serializer.name, uks):
            raise StateMigrationError(
                f"{where} was written with serializer {existing.serializer!r}"
                f"{f' / key serializer {existing.user_key_serializer!r}' if uks else ''} but the descriptor now "
                f"uses {descriptor.serializer.name!r}{f' / {uks!r}' if uks else ''}; state migration is not "
                "supported: keep the serializer or use a new state name"
            )
        if (existing.ttl is None) != (descriptor.ttl is None):
            raise StateMigrationError(
                f"{where}: TTL was {'enabled' if existing.ttl else 'disabled'} when the state was written and is "
                f"{'enabled' if descriptor.ttl else 'disabled'} now; the stored format differs, use a new state name"
            )
        if existing.ttl != descriptor.ttl:
            existing = StateMeta(existing.sid, existing.name, existing.kind, existing.serializer, uks, descriptor.ttl)
            self._register(existing)
        return existing

    def _register(self, meta: StateMeta) -> None:
        self._registry[meta.name] = meta
        self._snapshot_meta = None

    def _get_state(self, descriptor: StateDescriptor[Any]) -> State:
        self._check_open()
        known = self._states.get(descriptor.name)
        if known is not None:
            if known[0] != descriptor:
                self._meta_for(descriptor)  # raises if incompatible
                known = (descriptor, make_state(self, self._registry[descriptor.name].sid, descriptor))
                self._states[descriptor.name] = known
            return known[1]
        meta = self._meta_for(descriptor)
        state = make_state(self, meta.sid, descriptor)
        self._states[descriptor.name] = (descriptor, state)
        return state

    def registered_states(self) -> list[StateMeta]:
        """Every state registered or restored, by id."""
        return sorted(self._registry.values(), key=lambda m: m.sid)

    # --- iteration and cleanup -----------------------------------------------------------------------

    def keys(self, state_name: str, namespace: bytes = b"") -> Iterator[Any]:
        meta = self._registry.get(state_name)
        if meta is None:
            return
        ns_part = _U16.pack(len(namespace)) + namespace
        sid = _U16.pack(meta.sid)
        for kg in self.key_groups:
            previous = None
            for key, _ in self.kv.scan(_U16.pack(kg) + sid):
                (klen,) = _U16.unpack_from(key, 4)
                raw = key[6 : 6 + klen]
                if key[6 + klen : 8 + klen + len(namespace)] != ns_part or raw == previous:
                    continue
                previous = raw
                yield self._key_ser.deserialize(raw)

    def purge_expired(self) -> int:
        now = self.clock()
        removed = 0
        for meta in self._registry.values():
            if meta.ttl is None:
                continue
            sid = _U16.pack(meta.sid)
            for kg in self.key_groups:
                for key, value in self.kv.scan(_U16.pack(kg) + sid):
                    kept = ttl_filter(meta.kind, meta.ttl, now, value)
                    if kept is None:
                        self.kv.delete(key)
                        removed += 1
                    elif kept is not value:
                        self.kv.put(key, kept)
        return removed

    # --- snapshot and restore ------------------------------------------------------------------------

    def snapshot(self, checkpoint_id: int | None = None, options: SnapshotOptions | None = None) -> KeyedSnapshot:
        self._check_open()
        meta = self._snapshot_meta
        if meta is None:
            meta = self._snapshot_meta = SnapshotMeta(
                self._key_ser.name, KEY_GROUP_HASH, tuple(self.registered_states()), self.max_parallelism
            )
        if options is None or not options.incremental:
            return _Snapshot(self, self.kv.snapshot(), meta, self.clock())
        if checkpoint_id is None:
            raise ValueError("an incremental snapshot needs the checkpoint id it is for")
        # The epoch closes and the view opens with no write in between: the view holds exactly the changes.
        plan = self.tracker.plan(checkpoint_id, self.kv.take_changes(), options)
        try:
            view = self.kv.snapshot()
        except BaseException:
            self.tracker.failed(checkpoint_id)  # the epoch stays: its changes go into the next delta
            raise
        return _Snapshot(self, view, meta, self.clock(), plan)

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        self.tracker.complete(checkpoint_id)

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        self.tracker.abort(checkpoint_id)

    def restore(self, handles: Sequence[tuple[CompletedCheckpoint, KeyedStateHandle]]) -> None:
        self._check_open()
        if self._states:
            raise StateError(f"operator {self.operator_uid!r}: restore() must come before any state is used")
        ordered = sorted(handles, key=lambda ch: ch[1].key_groups.start)
        for checkpoint, _ in ordered:
            # Key groups are numbered modulo max_parallelism: under another one the same number holds
            # other keys, and no entry check could notice.
            recorded = checkpoint.metadata.operator(self.operator_uid)
            if recorded is not None and recorded.max_parallelism != self.max_parallelism:
                raise MaxParallelismMismatchError(
                    f"operator {self.operator_uid!r}: checkpoint {checkpoint.location} was written with "
                    f"max_parallelism {recorded.max_parallelism} but this backend has {self.max_parallelism}; "
                    f"keep {recorded.max_parallelism} or start without state"
                )
        # Every handle is checked before any is loaded, so a refused restore loads nothing.
        readers: list[tuple[ChainReader, SnapshotMeta, str]] = []
        for checkpoint, handle in ordered:
            if not handle.key_groups.intersection(self.key_groups):
                continue
            reader = ChainReader(checkpoint, handle, self.operator_uid)
            meta = reader.meta()
            where = f"operator {self.operator_uid!r}: state file {checkpoint.location}/{handle.stream.describe}"
            # Also under another uid: the snapshot records its max parallelism (or, format 1, the
            # checkpoint's metadata does for the operator that lists the handle).
            reader.check_max_parallelism(self.max_parallelism)
            if meta.key_group_hash != KEY_GROUP_HASH:
                raise StateMigrationError(
                    f"{where} was written with key-group hash {meta.key_group_hash!r}; this keystate uses "
                    f"{KEY_GROUP_HASH!r}"
                )
            if meta.key_serializer != self._key_ser.name:
                raise StateMigrationError(
                    f"{where} was written with key serializer {meta.key_serializer!r} but this backend uses "
                    f"{self._key_ser.name!r}; configure the same key serializer"
                )
            readers.append((reader, meta, where))
        for reader, meta, where in readers:
            translate = self._adopt(meta, where)
            chunks = reader.chunks(self.key_groups)
            if translate:
                chunks = ((kg, _translated(chunk, translate)) for kg, chunk in chunks)
            try:
                self.kv.bulk_load_chunks(chunks)
            except (StateRestoreError, LmdbError):  # LmdbError: the local disk, not the snapshot
                raise
            except KeystateError as exc:
                raise StateRestoreError(f"{where}: restore failed: {exc}") from exc
        # One handle of exactly our key groups (handles of other key groups add nothing): the next delta can
        # extend its chain (not after a rescale, nor the chain of a savepoint).
        mine = [(c, h) for c, h in ordered if h.key_groups.intersection(self.key_groups)]
        if len(mine) == 1 and mine[0][1].key_groups == self.key_groups and extendable(mine[0][1]):
            self.tracker.restored(*mine[0])
            self.kv.take_changes()  # from now on every change is tracked
        else:
            self.tracker.restored(None, None)

    def _adopt(self, meta: SnapshotMeta, where: str) -> dict[bytes, bytes]:
        """Register the snapshot's states; returns a map of snapshot state ids to ours where they differ."""
        translate: dict[bytes, bytes] = {}
        for state in meta.states:
            mine = self._registry.get(state.name)
            if mine is None:
                taken = {m.sid for m in self._registry.values()}
                sid = state.sid if state.sid not in taken else max(taken) + 1
                mine = StateMeta(sid, state.name, state.kind, state.serializer, state.user_key_serializer, state.ttl)
                self._register(mine)
            elif (mine.kind, mine.serializer, mine.user_key_serializer, mine.ttl is None) != (
                state.kind,
                state.serializer,
                state.user_key_serializer,
                state.ttl is None,
            ):
                raise StateMigrationError(
                    f"{where}: state {state.name!r} is {state.kind}/{state.serializer} there but "
                    f"{mine.kind}/{mine.serializer} in another handle of the same operator"
                )
            if mine.sid != state.sid:
                translate[_U16.pack(state.sid)] = _U16.pack(mine.sid)
        return translate

    # --- lifecycle -----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"operator {self.operator_uid!r} subtask {self.subtask_index}: backend is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.kv.stop_tracking()
            self.kv.close()


class HeapKeyedStateBackend(KVKeyedStateBackend):
    """Keyed state in dicts (small state, tests); snapshots are copy-on-write per key group."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(HeapKV(), **kwargs)


class LmdbKeyedStateBackend(KVKeyedStateBackend):
    """Keyed state in an LMDB environment under ``directory`` (a fresh temp dir by default).

    Incremental snapshots are this backend's default in the runtime (:attr:`incremental_default`).

    Args:
        directory: where the environment lives; it is deleted on :meth:`close` if keystate created it.
        map_size: the initial LMDB map size (it grows on demand).
        buffer_entries: size bound of the sorted write-back buffer, in keys.
        writemap: LMDB ``MDB_WRITEMAP``.
        **kwargs: see :class:`KVKeyedStateBackend`.
    """

    incremental_default = True

    def __init__(
        self,
        *,
        directory: str | Path | None = None,
        map_size: int = 256 << 20,
        buffer_entries: int = 100_000,
        writemap: bool = False,
        **kwargs: Any,
    ) -> None:
        self._owned = directory is None
        uid = str(kwargs.get("operator_uid", "op"))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)[:40] or "op"
        path = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix=f"keystate-{safe}-"))
        owner = f"operator {uid!r} subtask {kwargs.get('subtask_index', 0)}"
        self._lmdb = LmdbKV(path, map_size=map_size, buffer_entries=buffer_entries, writemap=writemap, owner=owner)
        try:
            super().__init__(self._lmdb, **kwargs)
        except BaseException:
            self._lmdb.close()  # releases the directory's lock
            raise
        self.directory = path

    def restore(self, handles: Sequence[tuple[CompletedCheckpoint, KeyedStateHandle]]) -> None:
        """See :meth:`KVKeyedStateBackend.restore`. The environment is emptied first (what an earlier owner
        left in the directory is not the checkpoint's state), also when no handle has entries for it."""
        self._check_open()
        if not self._states:
            self._lmdb.begin_restore()
        super().restore(handles)

    def delete_directory_on_close(self) -> None:
        """Remove the environment's directory on :meth:`close` (it is scratch space)."""
        self._owned = True

    def close(self) -> None:
        super().close()
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
