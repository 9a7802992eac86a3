"""Fixtures of the state-backend suite: every keyed test runs against LMDB and heap."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystate.statebackend import KVKeyedStateBackend, Serializer
from keystate.statebackend._lmdb_flush import Flusher
from keystate.statebackend._lmdb_layers import Layer
from keystate.storage import CheckpointStorage, KeyGroupRange
from tests.statebackend.support import BACKENDS, FULL, BackendFactory, ManualClock, make_backend, storage_at


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def new_backend(backend_kind: str) -> Iterator[BackendFactory]:
    """Creates keyed backends (of this test's kind unless told otherwise) and closes them all afterwards."""
    yield from _factory(backend_kind)


@pytest.fixture
def any_backend() -> Iterator[BackendFactory]:
    """Like ``new_backend`` without parametrizing the test: the kind defaults to LMDB."""
    yield from _factory("lmdb")


def _factory(backend_kind: str) -> Iterator[BackendFactory]:
    created: list[KVKeyedStateBackend] = []

    def factory(
        kind: str | None = None,
        *,
        key_groups: KeyGroupRange = FULL,
        max_parallelism: int = 128,
        subtask_index: int = 0,
        operator_uid: str = "op",
        clock: ManualClock | None = None,
        key_serializer: Serializer[Any] | None = None,
        buffer_entries: int = 3,
        map_size: int = 1 << 20,
    ) -> KVKeyedStateBackend:
        backend = make_backend(
            kind or backend_kind,
            key_groups=key_groups,
            max_parallelism=max_parallelism,
            subtask_index=subtask_index,
            operator_uid=operator_uid,
            clock=clock,
            key_serializer=key_serializer,
            buffer_entries=buffer_entries,
            map_size=map_size,
        )
        created.append(backend)
        return backend

    yield factory
    for backend in created:
        backend.close()


@pytest.fixture
def backend(new_backend: BackendFactory) -> KVKeyedStateBackend:
    """One backend owning all 128 key groups."""
    return new_backend()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    """Local checkpoint storage where every state stream is a file (not fsynced: see ``storage_at``)."""
    return storage_at(tmp_path / "checkpoints")


@pytest.fixture
def durable_storage(tmp_path: Path) -> CheckpointStorage:
    """Checkpoint storage exactly as ``open_storage`` gives it to a job."""
    return storage_at(tmp_path / "durable", durable=True)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every flusher write until set."""
    opened = threading.Event()
    original = Flusher._write

    def held(self: Flusher, layer: Layer) -> None:
        opened.wait(30)
        original(self, layer)

    monkeypatch.setattr(Flusher, "_write", held)
    yield opened
    opened.set()
