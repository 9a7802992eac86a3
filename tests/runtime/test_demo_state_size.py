"""The demo's state is never stored larger than raw: a block zstd does not shrink is stored raw.

Demo-sized state is tiny (a few hundred bytes per state file, in blocks of tens of bytes: one per key
group), where a zstd frame is larger than its input. Every state file of the demo's savepoint and of
its retained checkpoints stores each block in at most its raw length, so a file is at most its raw
bytes plus the fixed framing: the 8-byte header, the 16-byte trailer and a 16-byte header per block.
"""

from __future__ import annotations

from pathlib import Path

from keystate.runtime.demo import run_demo
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.statefile import BLOCK_HEADER, END_MARKER, FILE_HEADER, TRAILER, StateFileReader
from keystate.storage.format.statefile import BytesSource as Bytes
from keystate.storage.uri import open_storage
from tests.runtime.e2e_support import run


def state_file_bytes(checkpoint: CompletedCheckpoint) -> list[tuple[str, bytes, int]]:
    """``(name, stored bytes, raw size)`` of every state file of a checkpoint."""
    out = []
    for handle in checkpoint.metadata.handles():
        key = checkpoint.state_key(handle)
        data = handle.data if key is None else checkpoint.storage.store.get(key)
        assert data is not None
        out.append((handle.describe, data, handle.raw_size))
    return out


def test_demo_state_files_are_never_larger_than_raw_plus_framing(tmp_path: Path) -> None:
    location = tmp_path / "demo"
    savepoint = run(run_demo(str(location), duration=1.5, out=lambda _: None, interval=0.1))
    storage = open_storage(str(location))
    checkpoints = [savepoint, *(storage.load(p.directory) for p in storage.list_checkpoints(savepoint.metadata.job_id))]
    files = [f for c in checkpoints for f in state_file_bytes(c)]
    assert files, "the demo has state"
    for name, data, raw_size in files:
        pos, blocks = FILE_HEADER.size, 0
        while (header := BLOCK_HEADER.unpack_from(data, pos))[0] != END_MARKER:
            stored, raw, _ = header
            assert stored <= raw, f"{name}: a block of {raw} raw bytes is stored in {stored}"
            pos += BLOCK_HEADER.size + stored
            blocks += 1
        assert len(data) <= raw_size + FILE_HEADER.size + TRAILER.size + BLOCK_HEADER.size * blocks, name
        assert StateFileReader(Bytes(data, name), raw_size=raw_size).verify() == raw_size
