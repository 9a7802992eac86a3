"""Valid inputs that the fuzzers mutate: the golden ``_metadata`` documents, the documented topology, state
files from ``StateFileWriter``, a real keyed snapshot (LMDB backend through ``CheckpointStorage``) and a
real checkpoint directory for the CLI, with copies of its files outside the root (:class:`CliTemplate`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystate.statebackend import (
    HeapKeyedStateBackend,
    IntSerializer,
    JsonSerializer,
    KeyGroupOutOfRangeError,
    ListStateDescriptor,
    LmdbKeyedStateBackend,
    MapStateDescriptor,
    PickleSerializer,
    StrSerializer,
    TtlConfig,
    ValueStateDescriptor,
)
from keystate.statebackend.keyed import KVKeyedStateBackend
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    InputEdge,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    OperatorState,
    Partitioning,
    StreamOptions,
    SubtaskState,
    open_storage,
)
from keystate.storage.checkpoints import METADATA_FILE
from keystate.storage.format import dump_metadata
from keystate.storage.format.statefile import (
    BLOCK_HEADER,
    END_MARKER,
    FILE_HEADER,
    Compression,
    StateFileSummary,
)
from keystate.storage.statefile_io import StateFileWriter

__all__ = [
    "CLI_JOB_ID",
    "DESIGN_TOPOLOGY",
    "GOLDEN_DIR",
    "SNAPSHOT_JOB_ID",
    "SNAPSHOT_UID",
    "CliTemplate",
    "SnapshotSample",
    "StateFile",
    "block_boundaries",
    "golden_documents",
    "keyed_backend",
    "kv_entries",
    "metadata_document",
    "write_cli_checkpoint",
    "write_snapshot_sample",
    "write_state_file",
]

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "storage" / "golden"
CLI_JOB_ID = "feedface" * 4
SNAPSHOT_JOB_ID = "5eed" * 8
SNAPSHOT_UID = "totals"
SNAPSHOT_MAX_PARALLELISM = 8
CLOCK_MS = 1_700_000_000_000
_U16 = struct.Struct(">H")

DESIGN_TOPOLOGY = b"""{"format_version": 1,
 "operators": [
   {"uid": "orders", "parallelism": 2, "max_parallelism": 128, "inputs": []},
   {"uid": "totals", "parallelism": 4, "inputs": [{"from": "orders", "partitioning": "hash"}]}]}
"""
"""The topology file example of docs/architecture.md#the-topology-file and docs/format.md, byte for byte."""


def golden_documents() -> dict[str, bytes]:
    """The golden ``_metadata`` files of every version (checkpoint and savepoint)."""
    return {p.stem: p.read_bytes() for p in sorted(GOLDEN_DIR.glob("metadata_v*_*.json"))}


# --- state files ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateFile:
    """A valid state file and what a reader must return for it."""

    data: bytes
    raw: bytes
    summary: StateFileSummary
    compression: Compression
    boundaries: tuple[int, ...]
    """File offsets of every block header, then the trailer's offset."""
    raw_offsets: tuple[int, ...]
    """For each boundary, the raw bytes before it."""

    def raw_between(self, start: int, end: int | None) -> bytes:
        """The raw bytes of the blocks from boundary ``start`` to boundary ``end`` (``None``: the trailer)."""
        a = self.raw_offsets[self.boundaries.index(start)]
        b = self.raw_offsets[-1] if end is None else self.raw_offsets[self.boundaries.index(end)]
        return self.raw[a:b]


def block_boundaries(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Block offsets (then the trailer's) and the raw length before each, of a file known to be valid."""
    offsets: list[int] = []
    raws: list[int] = []
    pos, raw = FILE_HEADER.size, 0
    while True:
        stored, raw_len, _ = BLOCK_HEADER.unpack_from(data, pos)
        offsets.append(pos)
        raws.append(raw)
        if stored == END_MARKER:
            return tuple(offsets), tuple(raws)
        pos += BLOCK_HEADER.size + stored
        raw += raw_len


def write_state_file(chunks: list[bytes | None], compression: Compression, block_size: int) -> StateFile:
    """Write ``chunks`` in order (``None`` = ``start_block()``)."""
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=compression, block_size=block_size)
    raw = bytearray()
    for chunk in chunks:
        if chunk is None:
            writer.start_block()
        else:
            writer.write(chunk)
            raw += chunk
    summary = writer.finish()
    data = bytes(out)
    boundaries, raw_offsets = block_boundaries(data)
    return StateFile(data, bytes(raw), summary, compression, boundaries, raw_offsets)


# --- a keyed snapshot -------------------------------------------------------------------------------------


def kv_entries(backend: KVKeyedStateBackend) -> dict[bytes, bytes]:
    """Every stored entry of a keyed backend (composite key -> value)."""
    found: dict[bytes, bytes] = {}
    for kg in backend.key_groups:
        found.update(backend.kv.scan(_U16.pack(kg)))
    return found


def _fill(backend: KVKeyedStateBackend, keys: int) -> None:
    ttl = TtlConfig(3_600_000)
    count = backend.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0))
    names = backend.get_state(ListStateDescriptor[str](name="names", serializer=StrSerializer()))
    tags = backend.get_state(
        MapStateDescriptor[str, Any](name="tags", key_serializer=StrSerializer(), serializer=JsonSerializer())
    )
    seen = backend.get_state(ListStateDescriptor[int](name="seen", serializer=IntSerializer(), ttl=ttl))
    last = backend.get_state(ValueStateDescriptor[Any](name="last", serializer=JsonSerializer(), ttl=ttl))
    opaque = backend.get_state(ValueStateDescriptor[object](name="opaque", serializer=PickleSerializer()))
    for i in range(keys):
        key: Any = (f"user-{i}", i) if i % 3 == 0 else (f"user-{i}" if i % 3 == 1 else i)
        backend.set_current_key(key)
        count.update(i * 7 - 20)
        names.add_all([f"n{i}", "\u00e4\u00f6"])
        tags.put("tier", {"gold": i % 2 == 0, "score": i / 3})
        seen.add(i)
        last.update([i, "x"])
        if i % 5 == 0:
            opaque.update({"set": {1, 2}})


@dataclass(frozen=True, repr=False)
class SnapshotSample:
    """A keyed snapshot as written by the LMDB backend, taken apart for re-encoding."""

    raw: bytes
    """The raw payload: meta length, meta, then the entries of each key group."""
    kg_starts: tuple[int, ...]
    """Raw offset where each key group of ``key_groups`` starts (the first is the end of the meta)."""
    key_groups: KeyGroupRange
    max_parallelism: int
    entries: dict[bytes, bytes]
    """What the backend held: composite key -> value."""
    entry_fields: tuple[int, ...]
    """Raw offsets of every entry's key-length and value-length fields (targets for mutation)."""
    meta: bytes

    def __repr__(self) -> str:  # short: hypothesis shows it in the strategy of every failing example
        return f"SnapshotSample({len(self.raw)} raw bytes, {len(self.entries)} entries)"


def _entry_fields(raw: bytes, start: int) -> Iterator[int]:
    pos = start
    while pos + 2 <= len(raw):
        yield pos
        (kl,) = _U16.unpack_from(raw, pos)
        pos += 2 + kl
        if pos + 4 > len(raw):
            return
        yield pos
        (vl,) = struct.unpack_from(">I", raw, pos)
        pos += 4 + vl


def write_snapshot_sample(root: Path, *, keys: int = 60) -> SnapshotSample:
    """Write one keyed snapshot with the LMDB backend through ``CheckpointStorage`` under ``root`` and
    return its payload and the entries it holds."""
    key_groups = KeyGroupRange(0, SNAPSHOT_MAX_PARALLELISM - 1)
    storage = CheckpointStorage(LocalObjectStore(root, fsync=False), options=StreamOptions(inline_threshold=0))
    backend = keyed_backend("lmdb", key_groups)
    try:
        _fill(backend, keys)
        entries = kv_entries(backend)
        writer = storage.begin_checkpoint(SNAPSHOT_JOB_ID, 1)
        handle = backend.snapshot().write(writer, f"{SNAPSHOT_UID}/0/keyed")
    finally:
        backend.close()
    assert handle is not None
    metadata = CheckpointMetadata(
        1, SNAPSHOT_JOB_ID, CheckpointKind.CHECKPOINT, CLOCK_MS,
        (OperatorState(SNAPSHOT_UID, 1, SNAPSHOT_MAX_PARALLELISM, subtasks=(SubtaskState(0, keyed=(handle,)),)),),
    )  # fmt: skip
    checkpoint = writer.commit(metadata)
    reader = checkpoint.open_state(handle.stream)
    raw_at: dict[int, int] = {}
    raw = bytearray()
    for offset, block in reader.iter_range_with_offsets(FILE_HEADER.size):
        raw_at[offset] = len(raw)
        raw += block
    trailer = handle.stream.size - BLOCK_HEADER.size
    raw_at[trailer] = len(raw)
    kg_starts = tuple(raw_at[o] for o in handle.offsets)
    assert bytes(raw) == reader.read_all()
    (meta_len,) = struct.unpack_from(">I", raw)
    fields = tuple(_entry_fields(bytes(raw), kg_starts[0]))
    return SnapshotSample(
        bytes(raw), kg_starts, key_groups, SNAPSHOT_MAX_PARALLELISM, entries, fields, bytes(raw[4 : 4 + meta_len])
    )


def keyed_backend(
    kind: str,
    key_groups: KeyGroupRange,
    *,
    operator_uid: str = SNAPSHOT_UID,
    subtask_index: int = 0,
    max_parallelism: int = SNAPSHOT_MAX_PARALLELISM,
) -> KVKeyedStateBackend:
    """A fresh keyed backend (``kind`` ``"lmdb"``, small and flushing often, or ``"heap"``) on the samples'
    fixed clock; by default one of the snapshot sample's operator, e.g. to restore it into."""
    common: dict[str, Any] = {
        "operator_uid": operator_uid,
        "subtask_index": subtask_index,
        "max_parallelism": max_parallelism,
        "key_groups": key_groups,
        "clock": lambda: CLOCK_MS,
    }
    if kind == "lmdb":
        return LmdbKeyedStateBackend(map_size=1 << 22, buffer_entries=16, **common)
    return HeapKeyedStateBackend(**common)


# --- a checkpoint for the CLI -----------------------------------------------------------------------------


def write_cli_checkpoint(root: Path) -> CheckpointMetadata:
    """chk-5 of a job with every kind of handle: keyed files (LMDB and heap), an operator-state file, an
    inline operator state, a fully finished and a partially finished operator."""
    storage = open_storage(str(root), options=StreamOptions(inline_threshold=96))
    writer = storage.begin_checkpoint(CLI_JOB_ID, 5)
    keyed: list[KeyedStateHandle] = []
    for index, (kind, key_groups) in enumerate((("lmdb", KeyGroupRange(0, 3)), ("heap", KeyGroupRange(4, 7)))):
        backend = keyed_backend(kind, key_groups, operator_uid="totals", subtask_index=index, max_parallelism=8)
        try:
            count = backend.get_state(ValueStateDescriptor[int](name="count", serializer=IntSerializer(), default=0))
            tags = backend.get_state(
                MapStateDescriptor[str, Any](name="tags", key_serializer=StrSerializer(), serializer=JsonSerializer())
            )
            names = backend.get_state(ListStateDescriptor[str](name="names", serializer=StrSerializer()))
            for i in range(40):
                try:
                    backend.set_current_key(f"k{i}")
                except KeyGroupOutOfRangeError:
                    continue  # owned by the other subtask
                count.update(i)
                tags.put("t", {"i": i, "s": "\u00e4"})
                names.add(f"n{i}")
            handle = backend.snapshot().write(writer, f"totals/{index}/keyed")
        finally:
            backend.close()
        assert handle is not None
        keyed.append(handle)
    sink = OperatorStateBackend("sink", 0)
    sink.get_list_state(ListStateDescriptor[Any](name="pending", serializer=JsonSerializer())).add_all(
        [{"txn": i, "rows": list(range(i))} for i in range(12)]
    )
    sink.get_union_list_state(ListStateDescriptor[str](name="offsets", serializer=StrSerializer())).add_all(
        ["a", "b", "c"]
    )
    sink_handle = sink.snapshot().write(writer, "sink/0/operator")
    audit = OperatorStateBackend("audit", 0)
    audit.get_list_state(ListStateDescriptor[int](name="n", serializer=IntSerializer())).add(3)
    audit_handle = audit.snapshot().write(writer, "audit/0/operator")
    assert sink_handle is not None
    assert audit_handle is not None
    metadata = CheckpointMetadata(
        5, CLI_JOB_ID, CheckpointKind.CHECKPOINT, CLOCK_MS,
        (
            OperatorState("src", 2, 128, fully_finished=True),
            OperatorState("totals", 2, 8, (InputEdge("src", Partitioning.HASH),),
                          subtasks=(SubtaskState(0, keyed=(keyed[0],)), SubtaskState(1, keyed=(keyed[1],)))),
            OperatorState("audit", 2, 128, (InputEdge("src", Partitioning.REBALANCE),),
                          subtasks=(SubtaskState(0, operator=(audit_handle,)), SubtaskState(1, finished=True))),
            OperatorState("sink", 1, 128, (InputEdge("totals", Partitioning.REBALANCE),),
                          subtasks=(SubtaskState(0, operator=(sink_handle,)),)),
        ),
    )  # fmt: skip
    writer.commit(metadata)
    return metadata


def metadata_document(metadata: CheckpointMetadata) -> Any:
    return json.loads(dump_metadata(metadata))


@dataclass(frozen=True, repr=False)
class CliTemplate:
    """A real checkpoint root, and what the CLI fuzzer needs to damage copies of it."""

    root: Path
    metadata: bytes
    document: Any
    state_files: tuple[str, ...]
    """State files, relative to the checkpoint directory."""
    topology: Path
    outside: Path
    """A directory next to the roots (outside every one) holding copies of the state files and metadata,
    and of the whole checkpoint directory under ``tree/``."""

    def __repr__(self) -> str:
        return f"CliTemplate({str(self.root)!r})"

    @property
    def checkpoint(self) -> str:
        return f"{CLI_JOB_ID}/chk-5"

    @property
    def state_dirs(self) -> tuple[str, ...]:
        """The directories that hold state files, relative to the checkpoint directory."""
        parents = {p for name in self.state_files for p in Path(name).parents if p != Path(".")}
        return tuple(sorted(p.as_posix() for p in parents))

    @classmethod
    def build(cls, base: Path) -> CliTemplate:
        root = base / "root"
        metadata = write_cli_checkpoint(root)
        directory = root / CLI_JOB_ID / "chk-5"
        files = tuple(sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.ksf")))
        outside = base / "outside"
        outside.mkdir()
        for i, name in enumerate(files):
            shutil.copyfile(directory / name, outside / f"state-{i}.ksf")
        shutil.copyfile(directory / METADATA_FILE, outside / METADATA_FILE)
        (outside / "subdir").mkdir()
        shutil.copytree(directory, outside / "tree")  # what a linked directory of the checkpoint points to
        topology = base / "topology.json"
        topology.write_bytes(metadata.topology().to_json_bytes())
        data = (directory / METADATA_FILE).read_bytes()
        return cls(root, data, json.loads(data), files, topology, outside)

    def link_target(self, name: str, target: str, link: Path) -> Path:
        """What a symlink at ``link``, in place of ``name`` (a state file or ``_metadata``), points to:
        ``same`` the copy of that file outside the root, ``other`` another state file's copy, ``devnull``,
        ``dangling`` a missing file, ``subdir`` a directory, ``loop`` the link itself, ``root`` ``/``."""
        index = self.state_files.index(name) if name in self.state_files else 0
        other = (index + 1) % len(self.state_files)
        return {
            "same": self.outside / (METADATA_FILE if name == METADATA_FILE else f"state-{index}.ksf"),
            "other": self.outside / f"state-{other}.ksf",
            "devnull": Path(os.devnull),
            "dangling": self.outside / "missing",
            "subdir": self.outside / "subdir",
            "loop": link,
            "root": Path("/"),
        }[target]
