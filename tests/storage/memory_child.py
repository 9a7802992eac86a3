"""Peak memory of one read, for ``test_memory_bounds.py``: run as a script, never collected.

Usage (with the repository root on ``PYTHONPATH``)::

    python tests/storage/memory_child.py ACTION ROOT [ARG]

``ROOT`` holds what :func:`prepare` wrote: a complete checkpoint (:data:`JOB_ID`, id 1) whose operators
each hold one crafted state file that is valid, block checksums and whole-file checksum included, but
decodes to far more than it stores (64 blocks of 16 MiB of zero bytes, 1 GiB from about 40 KB), and a
state file of 64 blocks of 64 MiB zeros in checkpoint 2 (the shape found by the red team, valid for the
reader before the 16 MiB block limit). The child loads the checkpoint, takes ``ru_maxrss`` as its baseline, runs the
read named by ``ACTION``, and prints one JSON line: ``{"baseline_kib", "peak_kib", "outcome"}``, where
``outcome`` is ``"ok"`` or the name of the exception the read raised.

Actions: ``verify`` (``StateFileReader.verify`` of every state file), ``restore-heap`` /
``restore-lmdb`` (a keyed backend restores the keyed file), ``restore-meta`` (the same, from the file
whose meta section is the bomb), ``restore-operator`` (an operator backend restores the operator file),
``dump`` (``keystate dump`` of both operators, in process), ``cli-verify`` (``keystate verify``), and
``parse-metadata FILE`` (``parse_metadata`` of the bytes of ``FILE``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import resource
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import xxhash

from keystate.statebackend._snapshot import SnapshotMeta, StateMeta
from keystate.statebackend.keygroups import KEY_GROUP_HASH
from keystate.statebackend.state import StateKind
from keystate.storage import LocalObjectStore, PutMode
from keystate.storage.checkpoints import METADATA_FILE, CheckpointStorage
from keystate.storage.format._metadata_versions import dump_metadata
from keystate.storage.format.keygroups import KeyGroupRange
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointProperties,
    DistributionMode,
    HandleScope,
    KeyedStateHandle,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.format.statefile import Compression, StateFileEncoder, format_checksum, zstd_compressor

JOB_ID = "0123456789abcdef0123456789abcdef"
BLOCK = 16 << 20
"""Raw bytes of each block of the bombs: the most a reader accepts by default."""
BLOCKS = 64
CHECKPOINT_DIR = f"{JOB_ID}/chk-1"
BIG_DIR = f"{JOB_ID}/chk-2"


def _zeros(encoder: StateFileEncoder, blocks: int, raw_per_block: int) -> int:
    frame = zstd_compressor(1).compress(bytes(raw_per_block))
    digest = xxhash.xxh3_64_intdigest(frame)
    for _ in range(blocks):
        encoder.write_block(frame, raw_per_block, digest)
    return blocks * raw_per_block


def _frame_block(encoder: StateFileEncoder, raw: bytes) -> int:
    frame = zstd_compressor(1).compress(raw)
    assert len(frame) < len(raw), "every block is a zstd frame smaller than its raw bytes: valid in format 1 and 2"
    encoder.write_block(frame, len(raw), xxhash.xxh3_64_intdigest(frame))
    return len(raw)


def _state_file(
    store: LocalObjectStore, name: str, write: Callable[[StateFileEncoder], int], directory: str = CHECKPOINT_DIR
) -> StreamHandle:
    """A zstd state file of format version 1 (read the same by every reader since), all blocks frames."""
    out = bytearray()
    encoder = StateFileEncoder(out.extend, Compression.ZSTD)
    raw = write(encoder)
    encoder.finish(raw)
    out[4:6] = b"\x00\x01"
    checksum = format_checksum(xxhash.xxh3_64_intdigest(out))
    store.put(f"{directory}/{name}", bytes(out), PutMode.CREATE)
    return StreamHandle(HandleScope.EXCLUSIVE, len(out), raw, checksum, Compression.ZSTD, path=name)


def _meta_block() -> bytes:
    states = (StateMeta(1, "count", StateKind.VALUE, "int64"),)
    meta = SnapshotMeta("key-v1", KEY_GROUP_HASH, states).to_json_bytes()
    return struct.pack(">I", len(meta)) + meta


def prepare(root: Path) -> None:
    """Write the checkpoint the actions read (about 200 KB on disk)."""
    store = LocalObjectStore(root, fsync=False)
    meta = _meta_block()
    offsets: list[int] = []

    def keyed(encoder: StateFileEncoder) -> int:
        raw = _frame_block(encoder, meta)
        offsets.append(encoder.pos)
        return raw + _zeros(encoder, BLOCKS, BLOCK)

    keyed_stream = _state_file(store, "keyed/0/keyed.ksf", keyed)
    keyed_handle = KeyedStateHandle(KeyGroupRange(0, 0), (offsets[0],), keyed_stream)
    meta_offsets: list[int] = []

    def meta_bomb(encoder: StateFileEncoder) -> int:
        raw = _zeros(encoder, BLOCKS, BLOCK)
        meta_offsets.append(encoder.pos)
        return raw

    meta_stream = _state_file(store, "meta/0/keyed.ksf", meta_bomb)
    meta_handle = KeyedStateHandle(KeyGroupRange(0, 0), (meta_offsets[0],), meta_stream)
    operator_stream = _state_file(store, "ops/0/operator.ksf", lambda e: _zeros(e, BLOCKS, BLOCK))
    entry = OperatorStateEntry("buffer", DistributionMode.SPLIT, (0,), "bytes")
    operator_handle = OperatorStateHandle((entry,), operator_stream)
    # The red team's file, 64 blocks of 64 MiB (valid before the 16 MiB block limit), in checkpoint 2:
    # only ``verify`` reads it (the reader before streamed it too, but its restore held it all).
    big_stream = _state_file(store, "big/0/operator.ksf", lambda e: _zeros(e, BLOCKS, 64 << 20), BIG_DIR)
    big_handle = OperatorStateHandle((entry,), big_stream)

    def op(uid: str, subtask: SubtaskState) -> OperatorState:
        return OperatorState(uid, 1, 128, subtasks=(subtask,))

    metadata = CheckpointMetadata(
        1,
        JOB_ID,
        CheckpointKind.CHECKPOINT,
        1,
        (
            op("keyed", SubtaskState(0, keyed=(keyed_handle,))),
            op("meta", SubtaskState(0, keyed=(meta_handle,))),
            op("ops", SubtaskState(0, operator=(operator_handle,))),
        ),
        CheckpointProperties(),
    )
    store.put(f"{CHECKPOINT_DIR}/{METADATA_FILE}", dump_metadata(metadata), PutMode.CREATE)
    big = (op("big", SubtaskState(0, operator=(big_handle,))),)
    big_metadata = CheckpointMetadata(2, JOB_ID, CheckpointKind.CHECKPOINT, 2, big, CheckpointProperties())
    store.put(f"{BIG_DIR}/{METADATA_FILE}", dump_metadata(big_metadata), PutMode.CREATE)


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


ADDRESS_SPACE = 3 << 30
"""The child's address-space limit: a read that regresses fails with ``MemoryError`` instead of taking
the machine's memory (the reader before these bounds needed 14 GiB for the keyed file)."""


def main(argv: list[str]) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    from keystate.statebackend.backends import HeapStateBackend, LmdbStateBackend
    from keystate.storage.format._metadata_versions import parse_metadata
    from keystate.tools.cli import main as cli

    action, root = argv[0], Path(argv[1])
    if action == "parse-metadata":
        data = Path(argv[2]).read_bytes()
        _measure(lambda: parse_metadata(data, argv[2]))
        return
    storage = CheckpointStorage(LocalObjectStore(root, fsync=False))
    checkpoint = storage.load(CHECKPOINT_DIR)

    def only(uid: str) -> SubtaskState:
        operator = checkpoint.metadata.operator(uid)
        assert operator is not None
        return operator.subtasks[0]

    def restore_keyed(kind: str, uid: str) -> None:
        backend = HeapStateBackend() if kind == "heap" else LmdbStateBackend(tempfile.mkdtemp(dir=root))
        keyed = backend.create_keyed_backend(
            operator_uid=uid, subtask_index=0, max_parallelism=128, key_groups=KeyGroupRange(0, 127)
        )
        try:
            keyed.restore([(checkpoint, only(uid).keyed[0])])
        finally:
            keyed.close()

    def restore_operator() -> None:
        backend = HeapStateBackend().create_operator_backend(operator_uid="ops", subtask_index=0)
        backend.restore([(checkpoint, only("ops").operator[0])])

    def verify() -> None:
        errors = []
        for completed in (checkpoint, storage.load(BIG_DIR)):
            for handle in completed.metadata.handles():
                try:
                    completed.open_state(handle).verify()
                except Exception as exc:  # each file on its own; the big one is refused
                    errors.append(type(exc).__name__)
        if errors:
            raise RuntimeError(" ".join(errors))

    def run_cli(*args: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli(list(args))
        if code:
            raise SystemExit(code)

    def dump() -> None:
        location = str(root / CHECKPOINT_DIR)
        codes = []
        for uid in ("keyed", "ops"):
            try:
                run_cli("dump", location, "--operator", uid)
                codes.append("0")
            except SystemExit as exc:
                codes.append(str(exc.code))
        if codes != ["0", "0"]:
            raise RuntimeError("dump exit codes " + " ".join(codes))

    actions: dict[str, Callable[[], object]] = {
        "verify": verify,
        "restore-heap": lambda: restore_keyed("heap", "keyed"),
        "restore-lmdb": lambda: restore_keyed("lmdb", "keyed"),
        "restore-meta": lambda: restore_keyed("heap", "meta"),
        "restore-operator": restore_operator,
        "dump": dump,
        "cli-verify": lambda: run_cli("verify", str(root / CHECKPOINT_DIR)),
    }
    _measure(actions[action])


def _measure(run: Callable[[], object]) -> None:
    gc.collect()
    baseline = _maxrss_kib()
    try:
        run()
        outcome = "ok"
    except BaseException as exc:  # reported, not raised: the parent checks which
        outcome = f"{type(exc).__name__}: {exc}"[:400]
    print(json.dumps({"baseline_kib": baseline, "peak_kib": _maxrss_kib(), "outcome": outcome}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
