"""One contract test suite for CheckpointStorage, run over local, memory and S3 (moto) object stores."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage import (
    METADATA_FILE,
    AlreadyExistsError,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointNotFoundError,
    CheckpointProperties,
    CheckpointStorage,
    CheckpointWriter,
    CommitConflictError,
    CommitFailedError,
    CommitOutcomeUnknownError,
    CompletedCheckpoint,
    Compression,
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    MemoryObjectStore,
    MetadataError,
    ObjectInfo,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    PutMode,
    RequestOutcomeUnknownError,
    S3ObjectStore,
    StorageError,
    StorageUnavailableError,
    StreamOptions,
    SubtaskState,
)
from tests.conftest import BUCKET

JOB = "0123456789abcdef0123456789abcdef"
OTHER_JOB = "fedcba9876543210fedcba9876543210"
BASE = "ckpt"
OPTIONS = StreamOptions(inline_threshold=256, block_size=4096)


class FlakyStore(ObjectStore):
    """Delegates to a real store; ``_metadata`` writes and reads can be made to fail like a dropped connection."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.put_fails = False
        self.put_error: type[StorageUnavailableError] = StorageUnavailableError
        self.put_lands = False
        """When ``put_fails``: perform the put before raising (the response was lost, not the request)."""
        self.get_fails = False

    @staticmethod
    def _is_metadata(key: str) -> bool:
        return key.rsplit("/", 1)[-1] == METADATA_FILE

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def get(self, key: str) -> bytes:
        if self.get_fails and self._is_metadata(key):
            raise StorageUnavailableError(f"cannot read {self.describe(key)}: connection reset")
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def open_reader(self, key: str, start: int = 0) -> ObjectReader:
        return self.inner.open_reader(key, start)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def put(self, key: str, data: bytes, mode: PutMode = PutMode.OVERWRITE) -> None:
        if self.put_fails and self._is_metadata(key):
            if self.put_lands:
                self.inner.put(key, data, mode)
            raise self.put_error(f"cannot write {self.describe(key)}: connection reset")
        self.inner.put(key, data, mode)

    def open_writer(self, key: str, mode: PutMode = PutMode.OVERWRITE) -> ObjectWriter:
        return self.inner.open_writer(key, mode)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self.inner.delete_many(keys)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list_objects(prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        return self.inner.list_dirs(prefix)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)


@dataclass
class Written:
    metadata: CheckpointMetadata
    groups: dict[tuple[int, int], bytes]
    """(subtask index, key group) -> the raw bytes written for it."""


def write_state(
    writer: CheckpointWriter,
    *,
    timestamp: int = 1_000,
    shared: bool = True,
    properties: CheckpointProperties | None = None,
) -> Written:
    """Operator 'op' (parallelism 2, max 4): keyed state in an exclusive and a (requested) shared file,
    plus a tiny operator state that ends up inline."""
    rnd = random.Random(writer.directory + str(timestamp))
    groups: dict[tuple[int, int], bytes] = {}
    subtasks = []
    for index, scope in enumerate((HandleScope.EXCLUSIVE, HandleScope.SHARED if shared else HandleScope.EXCLUSIVE)):
        key_groups = KeyGroupRange(2 * index, 2 * index + 1)
        with writer.open_stream(f"op/{index}/keyed", scope) as stream:
            offsets = []
            for kg in key_groups:
                offsets.append(stream.start_block())
                groups[index, kg] = rnd.randbytes(300 * (kg + 1))
                stream.write(groups[index, kg])
            keyed = KeyedStateHandle(key_groups, tuple(offsets), stream.close())
        operator: tuple[OperatorStateHandle, ...] = ()
        if index == 0:
            with writer.open_stream("op/0/operator") as stream:
                stream.write(b"tiny")
                entry = OperatorStateEntry("list", DistributionMode.SPLIT, (0,), "bytes")
                operator = (OperatorStateHandle((entry,), stream.close()),)
        subtasks.append(SubtaskState(index, keyed=(keyed,), operator=operator))
    op = OperatorState("op", 2, 4, subtasks=tuple(subtasks))
    metadata = CheckpointMetadata(
        writer.checkpoint_id, writer.job_id, writer.kind, timestamp, (op,), properties or CheckpointProperties()
    )
    return Written(metadata, groups)


def assert_readable(completed: CompletedCheckpoint, written: Written) -> None:
    assert completed.metadata == written.metadata
    op = completed.metadata.operator("op")
    assert op is not None
    for (index, kg), data in written.groups.items():
        subtask = op.subtask(index)
        assert subtask is not None
        keyed = subtask.keyed[0]
        start, end = keyed.offset_range(kg)
        reader = completed.open_state(keyed.stream)
        assert b"".join(reader.iter_range(start, end)) == data
        assert reader.verify() == keyed.stream.raw_size
    first = op.subtask(0)
    assert first is not None
    assert completed.open_state(first.operator[0].stream).read_all() == b"tiny"


def checkpoint(
    storage: CheckpointStorage, checkpoint_id: int, *, job: str = JOB, timestamp: int | None = None
) -> tuple[CompletedCheckpoint, Written]:
    writer = storage.begin_checkpoint(job, checkpoint_id)
    written = write_state(writer, timestamp=timestamp if timestamp is not None else 1_000 * checkpoint_id)
    return writer.commit(written.metadata), written


def savepoint(storage: CheckpointStorage, checkpoint_id: int, *, timestamp: int) -> tuple[CompletedCheckpoint, Written]:
    writer = storage.begin_savepoint(JOB, checkpoint_id)
    written = write_state(writer, timestamp=timestamp)
    return writer.commit(written.metadata), written


def keys(store: ObjectStore, prefix: str) -> list[str]:
    return sorted(o.key for o in store.list_objects(prefix))


def bare(metadata: CheckpointMetadata, **changes: Any) -> CheckpointMetadata:
    """Metadata without state, for commits whose content does not matter."""
    return dataclasses.replace(metadata, operators=(), **changes)


class CheckpointStorageContract:
    """Behaviour CheckpointStorage has over every object store. Subclasses provide ``raw_store``."""

    @pytest.fixture
    def flaky(self, raw_store: ObjectStore) -> FlakyStore:
        return FlakyStore(raw_store)

    @pytest.fixture
    def storage(self, flaky: FlakyStore) -> CheckpointStorage:
        return CheckpointStorage(flaky, BASE, options=OPTIONS)

    # --- writing and reading back ---------------------------------------------------------------------

    def test_commit_then_load_and_resolve(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        assert completed.directory == f"{BASE}/{JOB}/chk-1"
        assert completed.kind is CheckpointKind.CHECKPOINT
        assert completed.checkpoint_id == 1
        assert completed.location == storage.store.describe(completed.directory)
        assert storage.store.exists(f"{BASE}/{JOB}/chk-1/{METADATA_FILE}")
        assert_readable(completed, written)
        assert_readable(storage.load(completed.directory), written)
        assert_readable(storage.resolve(f"{JOB}/chk-1"), written)

    def test_inline_threshold_is_inclusive(self, raw_store: ObjectStore) -> None:
        threshold = 300
        options = StreamOptions(inline_threshold=threshold, compression=Compression.NONE, block_size=4096)
        storage = CheckpointStorage(raw_store, BASE, options=options)
        writer = storage.begin_checkpoint(JOB, 1)
        overhead = 8 + 16 + 16  # file header, one block header, trailer
        with writer.open_stream("at") as stream:
            stream.write(b"a" * (threshold - overhead))
            at = stream.close()
        assert at.scope is HandleScope.INLINE
        assert at.size == threshold
        assert at.path is None
        assert keys(raw_store, writer.directory) == [], "an inline stream writes no object"
        with writer.open_stream("above") as stream:
            stream.write(b"b" * (threshold - overhead + 1))
            above = stream.close()
        assert above.scope is HandleScope.EXCLUSIVE
        assert above.size == threshold + 1
        assert above.path is not None
        assert keys(raw_store, writer.directory) == [f"{writer.directory}/{above.path}"]
        assert raw_store.size(f"{writer.directory}/{above.path}") == threshold + 1
        completed = writer.commit(CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 1, ()))
        assert completed.open_state(at).read_all() == b"a" * (threshold - overhead)
        assert completed.open_state(above).read_all() == b"b" * (threshold - overhead + 1)

    def test_shared_streams_live_under_the_job_and_resolve(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        op = completed.metadata.operator("op")
        assert op is not None
        handles = list(op.handles())
        assert [h.scope for h in handles] == [HandleScope.EXCLUSIVE, HandleScope.INLINE, HandleScope.SHARED]
        shared = handles[2]
        assert shared.path is not None
        assert shared.path.startswith("op/1/keyed-")
        assert shared.path.endswith(".ksf")
        key = completed.state_key(shared)
        assert key == f"{BASE}/{JOB}/shared/{shared.path}"
        assert storage.store.exists(key)
        assert completed.state_key(handles[0]) == f"{BASE}/{JOB}/chk-1/{handles[0].path}"
        assert completed.state_key(handles[1]) is None
        assert_readable(storage.resolve(f"{JOB}/chk-1/{METADATA_FILE}"), written)

    def test_savepoints_are_self_contained(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_savepoint(JOB, 7)
        assert re.fullmatch(rf"{BASE}/savepoints/savepoint-{JOB[:6]}-[0-9a-f]{{12}}", writer.directory)
        assert storage.begin_savepoint(JOB, 7).directory != writer.directory
        written = write_state(writer, properties=CheckpointProperties(synchronous=True, drain=True))
        completed = writer.commit(written.metadata)
        assert completed.directory == writer.directory
        handles = list(written.metadata.handles())
        assert HandleScope.SHARED not in {h.scope for h in handles}, "shared requests become exclusive"
        assert keys(storage.store, f"{BASE}/{JOB}") == []
        assert all(k.startswith(writer.directory + "/") for k in keys(storage.store, BASE))
        loaded = storage.resolve(writer.directory.removeprefix(BASE + "/"))
        assert loaded.kind is CheckpointKind.SAVEPOINT
        assert loaded.metadata.properties.drain
        assert_readable(loaded, written)
        assert [p.directory for p in storage.discover("savepoints")] == [writer.directory]

    def test_savepoint_metadata_naming_shared_state_is_refused_on_read(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_savepoint(JOB, 1)
        handle = storage.begin_checkpoint(JOB, 1).open_stream("x", HandleScope.SHARED)
        handle.write(os.urandom(1000))
        shared = handle.close()
        op = OperatorState(
            "op", 1, 4, subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 0), (8,), shared),)),)
        )
        completed = writer.commit(CheckpointMetadata(1, JOB, CheckpointKind.SAVEPOINT, 1, (op,)))
        with pytest.raises(MetadataError, match="savepoints must be self-contained"):
            completed.open_state(shared)

    # --- commit semantics ----------------------------------------------------------------------------

    def test_second_commit_with_different_metadata_conflicts(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 3)
        loser = storage.begin_checkpoint(JOB, 3)
        with pytest.raises(CommitConflictError, match="already committed by another writer") as info:
            loser.commit(bare(written.metadata, timestamp=99))
        assert isinstance(info.value, CommitFailedError)
        assert isinstance(info.value, AlreadyExistsError)
        assert_readable(storage.load(completed.directory), written)

    def test_second_commit_with_identical_bytes_succeeds(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 3)
        again = storage.begin_checkpoint(JOB, 3).commit(written.metadata)
        assert again.metadata == written.metadata
        assert_readable(storage.load(completed.directory), written)

    @pytest.mark.parametrize(
        "change",
        [{"checkpoint_id": 2}, {"job_id": OTHER_JOB}, {"kind": CheckpointKind.SAVEPOINT}],
        ids=["id", "job", "kind"],
    )
    def test_commit_of_mismatched_metadata_is_refused(self, storage: CheckpointStorage, change: dict[str, Any]) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        good = CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 1, ())
        with pytest.raises(ValueError, match="does not match the location"):
            writer.commit(bare(good, **change))
        assert not storage.store.exists(f"{writer.directory}/{METADATA_FILE}")
        assert writer.commit(good).metadata == good, "a refused commit leaves the writer usable"
        with pytest.raises(CommitFailedError, match="already committed"):
            writer.commit(good)

    def test_put_that_landed_before_the_error_is_a_successful_commit(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer)
        flaky.put_fails = flaky.put_lands = True
        assert_readable(writer.commit(written.metadata), written)
        assert_readable(storage.load(writer.directory), written)

    def test_put_that_did_not_land_is_a_failed_commit(self, storage: CheckpointStorage, flaky: FlakyStore) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer)
        flaky.put_fails = True
        with pytest.raises(CommitFailedError, match="was not committed") as info:
            writer.commit(written.metadata)
        assert not isinstance(info.value, CommitConflictError)
        assert isinstance(info.value.__cause__, StorageUnavailableError)
        with pytest.raises(CheckpointNotFoundError):
            storage.load(writer.directory)
        assert storage.discover() == []
        assert keys(storage.store, BASE) != []
        writer.abort()  # the commit definitely failed: the coordinator's abort removes the state files
        assert keys(storage.store, BASE) == []

    def test_request_that_may_still_land_is_an_unknown_outcome(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        written = write_state(writer)
        flaky.put_fails, flaky.put_error = True, RequestOutcomeUnknownError
        with pytest.raises(CommitOutcomeUnknownError, match="may still land"):
            writer.commit(written.metadata)
        writer.abort()  # must leave the state files: the PUT may land after the read-back
        flaky.inner.put(f"{writer.directory}/{METADATA_FILE}", written.metadata.to_json_bytes(), PutMode.CREATE)
        assert_readable(storage.load(writer.directory), written)

    def test_abort_after_a_lost_conflict_removes_only_the_losers_files(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 3)
        loser = storage.begin_checkpoint(JOB, 3)
        lost = write_state(loser, timestamp=7)
        with pytest.raises(CommitConflictError):
            loser.commit(lost.metadata)
        loser.abort()
        assert_readable(storage.load(completed.directory), written)
        for handle in lost.metadata.handles():
            key = completed.state_key(handle)
            assert key is None or not storage.store.exists(key)

    def test_put_and_read_back_failing_is_an_unknown_outcome(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        for lands, checkpoint_id in ((False, 1), (True, 2)):
            writer = storage.begin_checkpoint(JOB, checkpoint_id)
            written = write_state(writer)
            flaky.put_fails, flaky.put_lands, flaky.get_fails = True, lands, True
            with pytest.raises(CommitOutcomeUnknownError, match="load the checkpoint") as info:
                writer.commit(written.metadata)
            assert not isinstance(info.value, CommitFailedError), "an unknown outcome is not a failed commit"
            flaky.put_fails = flaky.get_fails = False
            writer.abort()  # what a coordinator does next; it must not destroy a possibly complete checkpoint
            if lands:
                assert_readable(storage.load(writer.directory), written)
            else:
                with pytest.raises(CheckpointNotFoundError):
                    storage.load(writer.directory)

    def test_conflict_whose_read_back_fails_is_an_unknown_outcome(
        self, storage: CheckpointStorage, flaky: FlakyStore
    ) -> None:
        completed, written = checkpoint(storage, 1)
        flaky.get_fails = True
        with pytest.raises(CommitOutcomeUnknownError):
            storage.begin_checkpoint(JOB, 1).commit(bare(written.metadata, timestamp=5))
        assert_readable(storage.load(completed.directory), written)

    # --- abort ---------------------------------------------------------------------------------------

    def test_abort_removes_everything_the_checkpoint_wrote(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        before = keys(storage.store, BASE)
        writer = storage.begin_checkpoint(JOB, 2)
        write_state(writer)  # closed exclusive, shared and inline streams
        open_stream = writer.open_stream("op/9/keyed")
        open_stream.write(os.urandom(2000))  # past the inline threshold: an object write in progress
        open_shared = writer.open_stream("op/9/shared", HandleScope.SHARED)
        open_shared.write(os.urandom(2000))
        assert keys(storage.store, writer.directory) != []
        writer.abort()
        writer.abort()  # idempotent
        assert keys(storage.store, BASE) == before, "only the completed checkpoint's files are left"
        assert storage.discover() == [storage.discover()[0]]
        assert_readable(storage.load(completed.directory), written)
        with pytest.raises(StorageError):
            writer.open_stream("late")
        with pytest.raises(CommitFailedError):
            writer.commit(bare(written.metadata, checkpoint_id=2))
        with pytest.raises(StorageError):
            open_stream.write(b"x")

    def test_abort_never_touches_a_checkpoint_another_writer_completed(self, storage: CheckpointStorage) -> None:
        loser = storage.begin_checkpoint(JOB, 2)
        with loser.open_stream("op/0/keyed") as stream:
            stream.write(os.urandom(2000))
            loser_handle = stream.close()
        other = CheckpointStorage(storage.store, BASE, options=OPTIONS)
        completed, written = checkpoint(other, 2)
        loser.abort()
        assert_readable(storage.load(completed.directory), written)
        assert loser_handle.path is not None
        assert not storage.store.exists(f"{loser.directory}/{loser_handle.path}"), "the loser's own files go"

    def test_stream_aborted_on_error_leaves_nothing(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_checkpoint(JOB, 1)
        stream = writer.open_stream("op/0/keyed")

        def snapshot() -> None:
            with stream:
                stream.write(os.urandom(5000))
                raise RuntimeError("snapshot failed")

        with pytest.raises(RuntimeError, match="snapshot failed"):
            snapshot()
        assert keys(storage.store, BASE) == []
        with pytest.raises(StorageError, match="aborted"):
            stream.close()

    def test_inline_scope_cannot_be_requested(self, storage: CheckpointStorage) -> None:
        with pytest.raises(ValueError, match="inline"):
            storage.begin_checkpoint(JOB, 1).open_stream("x", HandleScope.INLINE)

    # --- finding -------------------------------------------------------------------------------------

    def test_incomplete_directories_are_never_listed(self, storage: CheckpointStorage) -> None:
        writer = storage.begin_checkpoint(JOB, 5)
        write_state(writer)
        assert keys(storage.store, writer.directory) != []
        assert storage.discover() == []
        assert storage.discover(JOB) == []
        assert storage.latest() is None
        for target in (f"{JOB}/chk-5", f"{JOB}/chk-5/{METADATA_FILE}", JOB, ""):
            with pytest.raises(CheckpointNotFoundError) as info:
                storage.resolve(target)
            assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(CheckpointNotFoundError, match="Cannot find meta data file '_metadata'"):
            storage.load(writer.directory)

    def test_discover_root_job_and_savepoints(self, storage: CheckpointStorage) -> None:
        for cid in (1, 2, 10):
            checkpoint(storage, cid)
        checkpoint(storage, 4, job=OTHER_JOB)
        sp, _ = savepoint(storage, 11, timestamp=5)
        storage.begin_checkpoint(JOB, 12).open_stream("x").close()  # incomplete
        storage.store.put(f"{BASE}/{JOB}/not-a-checkpoint/{METADATA_FILE}", b"{}")
        storage.store.put(f"{BASE}/unrelated/chk-3/{METADATA_FILE}", b"{}")
        root = storage.discover()
        assert [(p.kind, p.checkpoint_id) for p in root] == [
            (CheckpointKind.CHECKPOINT, 10),
            (CheckpointKind.CHECKPOINT, 4),
            (CheckpointKind.CHECKPOINT, 2),
            (CheckpointKind.CHECKPOINT, 1),
            (CheckpointKind.SAVEPOINT, None),
        ]
        assert root[1].directory == f"{BASE}/{OTHER_JOB}/chk-4"
        assert root[-1].directory == sp.directory
        assert [p.checkpoint_id for p in storage.discover(JOB)] == [10, 2, 1]
        assert [p.checkpoint_id for p in storage.list_checkpoints(JOB)] == [10, 2, 1]
        assert [p.directory for p in storage.discover("savepoints")] == [sp.directory]
        assert storage.discover("nothing-here") == []

    def test_latest_is_newest_by_timestamp_then_id_across_jobs_and_savepoints(self, storage: CheckpointStorage) -> None:
        checkpoint(storage, 5, timestamp=3_000)
        newest_checkpoint, _ = checkpoint(storage, 2, job=OTHER_JOB, timestamp=4_000)
        latest = storage.latest()
        assert latest is not None
        assert latest.directory == newest_checkpoint.directory
        sp, _ = savepoint(storage, 6, timestamp=4_000)  # same timestamp, higher id
        latest = storage.latest()
        assert latest is not None
        assert latest.directory == sp.directory
        job_latest = storage.latest(JOB)
        assert job_latest is not None
        assert job_latest.checkpoint_id == 5
        assert storage.resolve("").directory == sp.directory
        assert storage.resolve(OTHER_JOB).directory == newest_checkpoint.directory
        assert storage.resolve("savepoints").directory == sp.directory

    def test_resolve_accepts_directory_metadata_job_and_root(self, storage: CheckpointStorage) -> None:
        completed, written = checkpoint(storage, 1)
        _, newest_written = checkpoint(storage, 2)
        assert_readable(storage.resolve(f"{JOB}/chk-1"), written)
        assert_readable(storage.resolve(f"{JOB}/chk-1/{METADATA_FILE}"), written)
        assert_readable(storage.resolve(JOB), newest_written)
        assert_readable(storage.resolve(), newest_written)
        # A storage whose base is the checkpoint directory itself still reaches its job's shared files.
        direct = CheckpointStorage(storage.store, completed.directory)
        assert_readable(direct.resolve(), written)
        assert_readable(CheckpointStorage(storage.store, f"{completed.directory}/{METADATA_FILE}").resolve(), written)

    def test_load_refuses_metadata_of_another_checkpoint(self, storage: CheckpointStorage) -> None:
        metadata = CheckpointMetadata(7, JOB, CheckpointKind.CHECKPOINT, 1, ())
        storage.store.put(f"{BASE}/{JOB}/chk-5/{METADATA_FILE}", metadata.to_json_bytes())
        with pytest.raises(MetadataError, match="directory chk-5 holds metadata of checkpoint 7"):
            storage.load(f"{BASE}/{JOB}/chk-5")
        savepoint_md = CheckpointMetadata(5, JOB, CheckpointKind.SAVEPOINT, 1, ())
        storage.store.put(f"{BASE}/{JOB}/chk-5/{METADATA_FILE}", savepoint_md.to_json_bytes(), PutMode.OVERWRITE)
        with pytest.raises(MetadataError, match="holds metadata of savepoint 5"):
            storage.load(f"{BASE}/{JOB}/chk-5")

    def test_latest_skips_a_corrupt_newest_checkpoint_only_when_asked(self, storage: CheckpointStorage) -> None:
        good, written = checkpoint(storage, 1)
        storage.store.put(f"{BASE}/{JOB}/chk-2/{METADATA_FILE}", b'{"format_version": 1, "checkpoint_id": 2')
        with pytest.raises(MetadataError, match="chk-2"):
            storage.latest()
        with pytest.raises(MetadataError):
            storage.resolve(JOB)
        latest = storage.latest(skip_corrupt=True)
        assert latest is not None
        assert latest.directory == good.directory
        assert_readable(latest, written)

    def test_load_reads_a_bounded_amount(self, storage: CheckpointStorage) -> None:
        completed, _ = checkpoint(storage, 1)
        tracemalloc.start()
        try:
            storage.load(completed.directory)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 << 20, f"loading a small _metadata allocated {peak} bytes"

    # --- deleting ------------------------------------------------------------------------------------

    def test_discard_keeps_only_the_listed_shared_files(self, storage: CheckpointStorage) -> None:
        completed, _ = checkpoint(storage, 1)
        shared = [h for h in completed.metadata.handles() if h.scope is HandleScope.SHARED]
        assert len(shared) == 1
        assert shared[0].path is not None
        shared_key = completed.state_key(shared[0])
        assert shared_key is not None
        keep, _ = checkpoint(storage, 2)
        storage.discard(completed, keep_shared={shared[0].path})
        assert keys(storage.store, completed.directory) == []
        assert storage.store.exists(shared_key)
        assert [p.checkpoint_id for p in storage.discover(JOB)] == [2]
        third, _ = checkpoint(storage, 3)
        storage.discard(third)
        third_shared = [completed.state_key(h) for h in third.metadata.handles() if h.scope is HandleScope.SHARED]
        assert third_shared
        assert not any(k is not None and storage.store.exists(k) for k in third_shared)
        assert storage.store.exists(shared_key), "other checkpoints' shared files are not touched"
        assert [p.checkpoint_id for p in storage.discover(JOB)] == [2]
        assert storage.load(keep.directory).metadata == keep.metadata

    def test_cleanup_incomplete_removes_only_metadata_less_directories_below_the_id(
        self, storage: CheckpointStorage
    ) -> None:
        checkpoint(storage, 1)
        for cid in (2, 3, 4):
            write_state(storage.begin_checkpoint(JOB, cid))
        checkpoint(storage, 5, job=OTHER_JOB)
        write_state(storage.begin_checkpoint(OTHER_JOB, 2))
        removed = storage.cleanup_incomplete(JOB, below=4)
        assert removed == [f"{BASE}/{JOB}/chk-2", f"{BASE}/{JOB}/chk-3"]
        assert storage.store.list_dirs(f"{BASE}/{JOB}") == ["chk-1", "chk-4", "shared"]
        assert keys(storage.store, f"{BASE}/{OTHER_JOB}/chk-2") != []
        assert [p.checkpoint_id for p in storage.discover()] == [5, 1]

    def test_invalid_ids_are_refused(self, storage: CheckpointStorage) -> None:
        with pytest.raises(ValueError, match="job_id"):
            storage.begin_checkpoint("not-a-job", 1)
        with pytest.raises(ValueError, match="job_id"):
            storage.begin_savepoint(JOB.upper(), 1)
        with pytest.raises(ValueError, match="checkpoint ID"):
            storage.begin_checkpoint(JOB, -1)


class TestLocalCheckpointStorage(CheckpointStorageContract):
    @pytest.fixture
    def raw_store(self, tmp_path: Path) -> ObjectStore:
        return LocalObjectStore(tmp_path, fsync=False)

    def test_on_disk_layout(self, tmp_path: Path) -> None:
        storage = CheckpointStorage(LocalObjectStore(tmp_path), BASE, options=OPTIONS)
        checkpoint(storage, 1)
        chk = tmp_path / BASE / JOB / "chk-1"
        assert (chk / METADATA_FILE).is_file()
        assert [p.name for p in (chk / "op" / "0").iterdir() if p.name.startswith("keyed-")]
        assert [p.name for p in (tmp_path / BASE / JOB / "shared" / "op" / "1").iterdir()]

    def test_abort_leaves_no_directories_or_temp_files(self, tmp_path: Path) -> None:
        storage = CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), BASE, options=OPTIONS)
        writer = storage.begin_checkpoint(JOB, 1)
        write_state(writer, shared=False)
        stream = writer.open_stream("op/5/keyed")
        stream.write(os.urandom(5000))
        assert any(name.startswith(".tmp-") for _, _, names in os.walk(tmp_path) for name in names)
        writer.abort()
        assert not (tmp_path / BASE / JOB / "chk-1").exists()
        assert [name for _, _, names in os.walk(tmp_path) for name in names] == []


class TestMemoryCheckpointStorage(CheckpointStorageContract):
    @pytest.fixture
    def raw_store(self) -> ObjectStore:
        return MemoryObjectStore("contract")


class TestS3CheckpointStorage(CheckpointStorageContract):
    @pytest.fixture
    def raw_store(self, s3_client: Any) -> ObjectStore:
        return S3ObjectStore(BUCKET, "tenant", client=s3_client)

    def test_objects_land_under_the_prefix(self, s3_client: Any) -> None:
        storage = CheckpointStorage(S3ObjectStore(BUCKET, "tenant", client=s3_client), BASE, options=OPTIONS)
        checkpoint(storage, 1)
        listed = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET)["Contents"]]
        assert f"tenant/{BASE}/{JOB}/chk-1/{METADATA_FILE}" in listed
        assert all(k.startswith(f"tenant/{BASE}/{JOB}/") for k in listed)
        assert any(k.startswith(f"tenant/{BASE}/{JOB}/shared/") for k in listed)
