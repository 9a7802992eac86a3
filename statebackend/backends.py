"""State backend factories: what a runtime configures (``"lmdb"`` or ``"heap"``) and asks for backends."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from keystate.statebackend._lmdb import LmdbKV
from keystate.statebackend._lmdb_env import remove_dead_scratch
from keystate.statebackend.keyed import HeapKeyedStateBackend, LmdbKeyedStateBackend
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.statebackend.serializers import Serializer
from keystate.statebackend.state import KeyedStateBackend
from keystate.statebackend.ttl import Clock, system_clock_ms
from keystate.storage.format.keygroups import KeyGroupRange

__all__ = ["HeapStateBackend", "LmdbStateBackend", "StateBackend", "state_backend"]


class StateBackend(ABC):
    """Creates the keyed and operator backends of operator subtasks."""

    name: str
    incremental_default: bool = False
    """Whether a runtime takes incremental snapshots of this backend's keyed state when its configuration
    leaves it open (``CheckpointConfig(incremental=None)``)."""

    @abstractmethod
    def create_keyed_backend(
        self,
        *,
        operator_uid: str,
        subtask_index: int,
        max_parallelism: int,
        key_groups: KeyGroupRange,
        key_serializer: Serializer[Any] | None = None,
        clock: Clock = system_clock_ms,
    ) -> KeyedStateBackend:
        """A keyed backend for one subtask of a keyed operator."""

    def create_operator_backend(self, *, operator_uid: str, subtask_index: int) -> OperatorStateBackend:
        """An operator (non-keyed) state backend for one subtask."""
        return OperatorStateBackend(operator_uid, subtask_index)


class HeapStateBackend(StateBackend):
    """Keyed state in memory (small state, tests)."""

    name = "heap"

    def create_keyed_backend(
        self,
        *,
        operator_uid: str,
        subtask_index: int,
        max_parallelism: int,
        key_groups: KeyGroupRange,
        key_serializer: Serializer[Any] | None = None,
        clock: Clock = system_clock_ms,
    ) -> KeyedStateBackend:
        return HeapKeyedStateBackend(
            operator_uid=operator_uid,
            subtask_index=subtask_index,
            max_parallelism=max_parallelism,
            key_groups=key_groups,
            key_serializer=key_serializer,
            clock=clock,
        )


class LmdbStateBackend(StateBackend):
    """Keyed state in LMDB environments, one per subtask, under ``directory``.

    Each environment is a scratch directory ``keystate-<uid>-<subtask>-<8 hex>`` under ``directory``, locked
    by its backend while open and deleted on close. Before creating the first one, the scratch directories
    there that a dead process left (a killed task never deletes its own) are deleted: those whose lock
    nobody holds (:meth:`remove_dead_scratch`).

    Args:
        directory: local working directory for the environments (default: the system temp dir).
            It is scratch space: state survives only through checkpoints.
        map_size: initial map size per environment (grows on demand).
        buffer_entries: size of the sorted write-back buffer, in keys.
        writemap: LMDB ``MDB_WRITEMAP``.
    """

    name = "lmdb"
    incremental_default = True

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        map_size: int = 256 << 20,
        buffer_entries: int = 100_000,
        writemap: bool = False,
    ) -> None:
        self.directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        self.map_size = map_size
        self.buffer_entries = buffer_entries
        self.writemap = writemap
        self._scratch_checked = False
        self._scratch_lock = threading.Lock()  # subtasks create their backends on several threads at once

    def remove_dead_scratch(self) -> list[Path]:
        """Delete the scratch directories under :attr:`directory` whose owner process is gone: those named
        like keystate's scratch directories whose lock can be taken (a live backend holds its lock; the
        kernel releases it when the process dies, however it dies). Returns the deleted directories.

        Runs once by itself, before the first :meth:`create_keyed_backend`."""
        return remove_dead_scratch(self.directory)

    def create_keyed_backend(
        self,
        *,
        operator_uid: str,
        subtask_index: int,
        max_parallelism: int,
        key_groups: KeyGroupRange,
        key_serializer: Serializer[Any] | None = None,
        clock: Clock = system_clock_ms,
    ) -> KeyedStateBackend:
        with self._scratch_lock:
            if not self._scratch_checked:
                self._scratch_checked = True
                self.remove_dead_scratch()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in operator_uid)[:40] or "op"
        path = self.directory / f"keystate-{safe}-{subtask_index}-{uuid.uuid4().hex[:8]}"
        backend = LmdbKeyedStateBackend(
            directory=path,
            map_size=self.map_size,
            buffer_entries=self.buffer_entries,
            writemap=self.writemap,
            operator_uid=operator_uid,
            subtask_index=subtask_index,
            max_parallelism=max_parallelism,
            key_groups=key_groups,
            key_serializer=key_serializer,
            clock=clock,
        )
        backend.delete_directory_on_close()
        if isinstance(backend.kv, LmdbKV):
            backend.kv.set_owner(f"operator {operator_uid!r} subtask {subtask_index}")
        return backend


def state_backend(name: str, **options: Any) -> StateBackend:
    """A backend by configuration name: ``"lmdb"`` (the default) or ``"heap"``."""
    if name == "lmdb":
        return LmdbStateBackend(**options)
    if name == "heap":
        if options:
            raise ValueError(f"the heap backend takes no options, found {sorted(options)}")
        return HeapStateBackend()
    raise ValueError(f"unknown state backend {name!r}; use 'lmdb' or 'heap'")
