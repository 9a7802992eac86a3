"""Shared by the CheckpointStorage contract tests (``test_checkpoint_writing``, ``test_checkpoint_finding``):
the contract's fixtures over every object store (local, memory, S3 through moto), a store whose
``_metadata`` requests can be made to fail, and helpers that write checkpoints and check them read back."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import (
    METADATA_FILE,
    CheckpointMetadata,
    CheckpointProperties,
    CheckpointStorage,
    CheckpointWriter,
    CompletedCheckpoint,
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectInfo,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    PutMode,
    S3ObjectStore,
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
    """Base of the contract test classes: each test runs over every object store (``raw_store``), through
    a :class:`FlakyStore` (``flaky``) under a :class:`CheckpointStorage` (``storage``)."""

    @pytest.fixture(params=["local", "memory", "s3"])
    def raw_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
        if request.param == "local":
            return LocalObjectStore(tmp_path, fsync=False)
        if request.param == "memory":
            return MemoryObjectStore("contract")
        return S3ObjectStore(BUCKET, "tenant", client=request.getfixturevalue("s3_client"))

    @pytest.fixture
    def flaky(self, raw_store: ObjectStore) -> FlakyStore:
        return FlakyStore(raw_store)

    @pytest.fixture
    def storage(self, flaky: FlakyStore) -> CheckpointStorage:
        return CheckpointStorage(flaky, BASE, options=OPTIONS)
