"""A process holding an LMDB backend, for the ownership tests in ``test_lmdb_ownership.py``: run as a script,
never collected.

Usage (with the repository root on ``PYTHONPATH``)::

    python tests/statebackend/lmdb_child.py fixed DIR KEYS     # LmdbKeyedStateBackend(directory=DIR)
    python tests/statebackend/lmdb_child.py scratch PARENT KEYS  # LmdbStateBackend(PARENT).create_keyed_backend

It writes ``KEYS`` keys (``count`` of key ``k`` is ``k * 7 + 1``: values no checkpoint holds), flushes them
into LMDB, prints ``ready <environment directory>`` and waits for a line on stdin; then it closes the
backend and exits. The tests SIGKILL it to leave its directory and lock file as a crash does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from keystate.statebackend import (
    IntSerializer,
    KeyGroupRange,
    LmdbKeyedStateBackend,
    LmdbStateBackend,
    ValueStateDescriptor,
)
from keystate.statebackend._lmdb import LmdbKV

COUNT = ValueStateDescriptor[int](name="count", serializer=IntSerializer())


def main(mode: str, where: str, keys: int) -> None:
    common: dict[str, Any] = {
        "operator_uid": "op",
        "subtask_index": 0,
        "max_parallelism": 128,
        "key_groups": KeyGroupRange(0, 127),
    }
    if mode == "fixed":
        backend = LmdbKeyedStateBackend(directory=Path(where), buffer_entries=100, **common)
    else:
        created = LmdbStateBackend(Path(where), buffer_entries=100).create_keyed_backend(**common)
        assert isinstance(created, LmdbKeyedStateBackend)
        backend = created
    count = backend.get_state(COUNT)
    for key in range(keys):
        backend.set_current_key(key)
        count.update(key * 7 + 1)
    assert isinstance(backend.kv, LmdbKV)
    assert backend.kv.flush()
    print(f"ready {backend.directory}", flush=True)
    sys.stdin.readline()
    backend.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
