"""The fuzzed properties, shared by the CI tests (``tests/fuzz/test_*.py``) and the long-run script
(``python -m tests.fuzz.run``).

Each :class:`Property` pairs a strategy (what hostile input looks like) with a check (what must hold for
it): the input loads correctly, or it raises the documented typed error and nothing else. The checks
let any other exception escape, so hypothesis reports it with a reproducible example.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import posixpath
import shutil
import struct
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import storage.validation
from runtime.restore_rules import check_restore
from statebackend import (
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    StateDescriptor,
    StateKind,
    ValueState,
    ValueStateDescriptor,
    safe_serializer,
)
from statebackend._snapshot import KeyedSnapshotReader
from statebackend.inspection import read_keyed_entries
from statebackend.keyed import KVKeyedStateBackend
from storage import (
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CompletedCheckpoint,
    HandleScope,
    InvalidURIError,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    MemoryObjectStore,
    MetadataError,
    OperatorState,
    StreamHandle,
    SubtaskState,
    Topology,
    TopologyError,
)
from storage.base import join_key, validate_key
from storage.checkpoints import METADATA_FILE
from storage.errors import KeystateError, StateFileError
from storage.statefile import (
    FILE_HEADER,
    MAGIC,
    BytesSource,
    Compression,
    StateFileReader,
    StateFileSummary,
    StateFileWriter,
    StoreSource,
)
from storage.uri import Location, parse_location
from tests.fuzz import samples
from tests.fuzz.strategies import (
    encoded_document,
    hostile_numbers,
    hostile_strings,
    json_values,
    mutated_bytes,
    mutated_document,
)
from tools.cli import run as cli_run
from tools.render import render_graph, render_operator, render_report, render_summary
from tools.summary import summarize

__all__ = [
    "KNOWN_BUGS",
    "KNOWN_HITS",
    "PROPERTIES",
    "FuzzContext",
    "Property",
    "check_cli_run",
    "inject_entry",
    "replace_meta",
    "run_cli",
    "run_property",
    "snapshot_checkpoint",
]

WHERE = "/fuzz/job/chk-1/_metadata"
TOPOLOGY_WHERE = "/fuzz/topology.json"
STATE_FILE_NAME = "/fuzz/chk-1/op/0/keyed.ksf"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class FuzzContext:
    """Scratch space and the valid samples (built once, lazily) that the properties mutate."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._ids = itertools.count(1)
        self._snapshot: samples.SnapshotSample | None = None
        self._cli: CliTemplate | None = None
        self._snapshot_storage: CheckpointStorage | None = None

    def fresh_dir(self, prefix: str) -> Path:
        path = self.scratch / f"{prefix}-{next(self._ids)}"
        path.mkdir(parents=True)
        return path

    def next_id(self) -> int:
        return next(self._ids)

    @property
    def statefiles(self) -> Path:
        """Where state-file examples are put to be read from disk."""
        path = self.scratch / "statefiles"
        path.mkdir(exist_ok=True)
        return path

    def snapshot(self) -> samples.SnapshotSample:
        if self._snapshot is None:
            self._snapshot = samples.write_snapshot_sample(self.scratch / "snapshot-sample")
        return self._snapshot

    def snapshot_storage(self) -> CheckpointStorage:
        if self._snapshot_storage is None:
            self._snapshot_storage = CheckpointStorage(LocalObjectStore(self.scratch / "snapshots", fsync=False))
        return self._snapshot_storage

    def cli_template(self) -> CliTemplate:
        if self._cli is None:
            self._cli = CliTemplate.build(self.scratch / "cli-template")
        return self._cli


@dataclass(frozen=True)
class Property:
    """One fuzzed property: ``check(ctx, example)`` must hold for every example ``strategy(ctx)`` draws."""

    target: str
    name: str
    strategy: Callable[[FuzzContext], st.SearchStrategy[Any]]
    check: Callable[[FuzzContext, Any], None]
    ci_examples: int

    @property
    def qualified(self) -> str:
        return f"{self.target}.{self.name}"


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]  # fmt: skip


def run_property(prop: Property, ctx: FuzzContext, *, max_examples: int | None = None, seed: int | None = None) -> int:
    """Run one property; returns how many examples ran. Without ``seed`` the run is derandomized (the
    same examples every time, as CI needs); no example database is read or written either way.

    Raises:
        whatever the check raised for the (shrunk) failing example; hypothesis reports the example.
    """
    count = 0
    strategy = prop.strategy(ctx)

    def body(example: Any) -> None:
        nonlocal count
        count += 1
        prop.check(ctx, example)

    test = given(strategy)(body)
    test = settings(
        max_examples=max_examples or prop.ci_examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=_HEALTH,
        print_blob=False,
    )(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()
    return count


# --- (a) _metadata ------------------------------------------------------------------------------------


def _checkpoint_directory(m: CheckpointMetadata) -> str:
    if m.kind is CheckpointKind.SAVEPOINT:
        return f"root/savepoints/savepoint-{m.job_id[:6]}-0123456789ab"
    return f"root/{m.job_id}/chk-{m.checkpoint_id}"


def _check_handle_path(checkpoint: CompletedCheckpoint, handle: StreamHandle) -> None:
    """A handle of accepted metadata resolves to a key inside its checkpoint's directory (or the job's
    ``shared/``): relative, no ``..`` / ``.`` / empty segments, nothing a filesystem would normalize."""
    if handle.scope is HandleScope.INLINE:
        assert handle.path is None
        assert handle.data is not None
        assert len(handle.data) == handle.size
        assert checkpoint.state_key(handle) is None
        return
    path = handle.path
    assert path is not None
    assert handle.data is None
    assert not path.startswith("/"), path
    assert "\\" not in path, path
    assert ":" not in path.split("/")[0], path
    assert all(segment not in ("", ".", "..") for segment in path.split("/")), path
    assert posixpath.normpath(path) == path, path
    assert all(c.isascii() and c.isprintable() for c in path), path
    try:
        key = checkpoint.state_key(handle)
    except MetadataError:
        assert handle.scope is HandleScope.SHARED
        assert checkpoint.kind is CheckpointKind.SAVEPOINT
        return
    if handle.scope is HandleScope.EXCLUSIVE:
        base = checkpoint.directory
    else:
        base = join_key(checkpoint.directory.rsplit("/", 1)[0], "shared")
    assert key == f"{base}/{path}", (key, base, path)
    assert posixpath.normpath(key) == key
    assert key.startswith(base + "/")
    validate_key(key)


def check_accepted_metadata(m: CheckpointMetadata) -> None:
    """Accepted metadata round-trips, keeps its paths inside the checkpoint, and every tool can show it."""
    data = m.to_json_bytes()
    again = CheckpointMetadata.from_json_bytes(data, WHERE)
    assert again == m
    assert again.to_json_bytes() == data
    checkpoint = CompletedCheckpoint(CheckpointStorage(MemoryObjectStore("fuzz"), "root"), _checkpoint_directory(m), m)
    for handle in m.handles():
        _check_handle_path(checkpoint, handle)
    summary = summarize(checkpoint)
    json.dumps(summary.to_dict(), allow_nan=False)
    report = check_restore(m, m.topology())
    json.dumps(report.to_dict(), allow_nan=False)
    texts = [render_summary(summary), render_graph(summary, "mermaid"), render_graph(summary, "dot"),
             render_report(report, len(m.operators))]  # fmt: skip
    texts += [render_operator(summary, op.uid) for op in m.operators]
    for text in texts:
        text.encode("utf-8")  # what a UTF-8 terminal or pipe needs


def _names(error: Exception, where: str) -> None:
    """A format error's message starts with the file it is about (docs/format.md section 4.2)."""
    message = str(error)
    assert message.startswith(where + ":"), message


def check_metadata_bytes(ctx: FuzzContext, data: bytes) -> None:
    """``from_json_bytes`` returns metadata that round-trips, or raises ``MetadataError`` naming the file."""
    try:
        metadata = CheckpointMetadata.from_json_bytes(data, WHERE)
    except MetadataError as exc:
        _names(exc, WHERE)
        return
    check_accepted_metadata(metadata)


def _golden_docs() -> list[Any]:
    return [json.loads(data) for data in samples.golden_documents().values()]


def metadata_arbitrary_bytes(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), st.binary(max_size=64).map(lambda b: b'{"format_version":1,' + b))


def metadata_arbitrary_json(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    top = st.dictionaries(
        st.sampled_from(["format_version", "checkpoint_id", "job_id", "kind", "timestamp", "properties",
                         "operators", "x"]),
        json_values(nan=True),
    )  # fmt: skip
    return st.one_of(json_values(nan=True), top).flatmap(encoded_document)


def metadata_mutated(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    docs = _golden_docs()
    mutated = st.sampled_from(docs).flatmap(lambda doc: mutated_document(doc)).map(lambda pair: pair[0])
    return mutated.flatmap(encoded_document)


def metadata_plausible(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    docs = _golden_docs()
    mutated = st.sampled_from(docs).flatmap(lambda doc: mutated_document(doc, plausible=True))
    return mutated.map(lambda pair: json.dumps(pair[0], ensure_ascii=False).encode("utf-8", "surrogatepass"))


def metadata_damaged(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    originals = list(samples.golden_documents().values())
    truncated = st.sampled_from(originals).flatmap(lambda d: st.integers(0, len(d)).map(lambda n: d[:n]))
    flipped = st.sampled_from(originals).flatmap(lambda d: mutated_bytes(d)).map(lambda pair: pair[0])
    return st.one_of(truncated, flipped)


# --- (b) state files ------------------------------------------------------------------------------------

_STATE_ERRORS = (StateFileError,)  # ChecksumMismatchError and UnsupportedStateFileVersionError are subclasses


@dataclass(frozen=True)
class StateFileExample:
    file: samples.StateFile | None
    """The valid file this example was made from (``None`` for arbitrary bytes)."""
    data: bytes
    params: dict[str, Any]
    """Handle expectations passed to the reader: none, the true ones, or hostile ones."""
    true_params: bool
    start: int
    end: int | None
    on_disk: bool
    log: tuple[str, ...] = ()


def _attempt(action: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> tuple[bool, Any]:
    try:
        return True, action()
    except allowed as exc:
        return False, exc


def check_state_file(ctx: FuzzContext, ex: StateFileExample) -> None:
    """verify / read_all / iter_range_with_offsets return correct results or raise ``StateFileError``."""
    if ex.on_disk:
        name = f"f-{ctx.next_id()}.ksf"
        (ctx.statefiles / name).write_bytes(ex.data)
        source: BytesSource | StoreSource = StoreSource(LocalObjectStore(ctx.statefiles, fsync=False), name)
    else:
        source = BytesSource(ex.data, STATE_FILE_NAME)

    def reader() -> StateFileReader:
        return StateFileReader(source, **ex.params)

    try:
        ok_verify, verified = _attempt(lambda: reader().verify(), _STATE_ERRORS)
        ok_all, everything = _attempt(lambda: reader().read_all(), _STATE_ERRORS)
        ok_range, blocks = _attempt(lambda: list(reader().iter_range_with_offsets(ex.start, ex.end)), _STATE_ERRORS)
    finally:
        if ex.on_disk:
            (ctx.statefiles / name).unlink()
    assert ok_verify == ok_all, (verified, everything)
    if ok_all:
        assert verified == len(everything)
    else:
        assert type(verified) is type(everything), (verified, everything)
    if ok_range:
        offsets = [offset for offset, _ in blocks]
        assert offsets == sorted(set(offsets))
        assert all(o >= ex.start for o in offsets)
        if ex.end is not None:
            assert all(o < ex.end for o in offsets)
    f = ex.file
    if f is None:
        return
    intact = ex.data == f.data
    if ok_all and ex.params.get("checksum") == f.summary.checksum:
        assert intact, "a changed file passed the whole-file checksum"
    if ok_all and intact:
        assert everything == f.raw
    if intact and ex.true_params:
        assert ok_all, everything
        expected = ex.start in f.boundaries and (ex.end is None or (ex.end in f.boundaries and ex.end >= ex.start))
        if ex.end == ex.start and ok_range:
            assert blocks == []  # an empty range reads nothing, wherever it is
            return
        assert ok_range == expected, (ex.start, ex.end, f.boundaries, blocks)
        if ok_range:
            assert all(o in f.boundaries for o, _ in blocks)
            assert b"".join(b for _, b in blocks) == f.raw_between(ex.start, ex.end)


@st.composite
def _state_files(draw: st.DrawFn) -> samples.StateFile:
    payload = st.one_of(st.binary(max_size=80), st.tuples(st.binary(min_size=1, max_size=4), st.integers(1, 60)).map(
        lambda t: t[0] * t[1]))  # fmt: skip
    chunks = draw(st.lists(st.one_of(st.none(), payload), max_size=8))
    compression = draw(st.sampled_from(list(Compression)))
    block_size = draw(st.sampled_from([1, 3, 16, 64, 1 << 20]))
    return samples.write_state_file(chunks, compression, block_size)


def _reader_params(draw: st.DrawFn, f: samples.StateFile | None) -> tuple[dict[str, Any], bool]:
    mode = draw(st.sampled_from(["true", "none", "hostile"] if f is not None else ["none", "hostile"]))
    if mode == "none":
        return {}, False
    if mode == "true" and f is not None:
        return {"size": f.summary.size, "checksum": f.summary.checksum, "raw_size": f.summary.raw_size,
                "compression": f.compression}, True  # fmt: skip
    sizes = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 24, 0xFFFFFFF0, 2**63 - 1]))
    params: dict[str, Any] = {
        "size": draw(st.one_of(st.none(), sizes)),
        "checksum": draw(st.one_of(st.none(), st.integers(0, 2**64 - 1).map(lambda d: f"xxh3-64:{d:016x}"))),
        "raw_size": draw(st.one_of(st.none(), sizes)),
        "compression": draw(st.one_of(st.none(), st.sampled_from(list(Compression)))),
    }
    if f is not None and draw(st.booleans()):
        params["checksum"] = f.summary.checksum
    return params, False


def _range(draw: st.DrawFn, data: bytes, f: samples.StateFile | None) -> tuple[int, int | None]:
    anywhere = st.integers(0, len(data) + 32)
    points = st.one_of(anywhere, st.sampled_from(f.boundaries)) if f is not None else anywhere
    start = draw(st.one_of(points, st.just(FILE_HEADER.size)))
    end = draw(st.one_of(st.none(), points))
    return start, end


@st.composite
def statefile_mutated(draw: st.DrawFn) -> StateFileExample:
    f = draw(_state_files())
    log: tuple[str, ...] = ()
    data = f.data
    if draw(st.integers(0, 3)):
        fields = [0, 4, 6, 7, *itertools.chain.from_iterable((b, b + 4, b + 8, b + 16) for b in f.boundaries)]
        data, changes = draw(mutated_bytes(f.data, positions=fields))
        log = tuple(changes)
    params, true_params = _reader_params(draw, f)
    start, end = _range(draw, data, f)
    return StateFileExample(f, data, params, true_params, start, end, draw(st.integers(0, 4)) == 0, log)


@st.composite
def statefile_arbitrary(draw: st.DrawFn) -> StateFileExample:
    header = FILE_HEADER.pack(MAGIC, 1, draw(st.integers(0, 2)), 0)
    data = draw(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: header + b)))
    params, _ = _reader_params(draw, None)
    start, end = _range(draw, data, None)
    return StateFileExample(None, data, params, False, start, end, draw(st.integers(0, 4)) == 0)


# --- (c) keyed snapshot payloads -----------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotExample:
    data: bytes
    """The re-encoded (and possibly damaged) state file."""
    size: int
    raw_size: int
    checksum: str
    compression: Compression
    key_groups: tuple[int, int]
    offsets: tuple[int, ...]
    operator_max_parallelism: int
    backend: str
    restore_groups: tuple[int, int]
    identity: bool
    log: tuple[str, ...]

    def __repr__(self) -> str:  # the file is rebuilt from the seed; its bytes would flood the report
        return (
            f"SnapshotExample({len(self.data)} bytes, size={self.size}, raw_size={self.raw_size}, "
            f"{self.compression.value}, key_groups={self.key_groups}, offsets={self.offsets}, "
            f"max_parallelism={self.operator_max_parallelism}, {self.backend} restoring {self.restore_groups}, "
            f"identity={self.identity}, log={self.log!r})"
        )


def _encode(
    raw: bytes, starts: list[int], compression: Compression, block_size: int
) -> tuple[bytes, list[int], StateFileSummary]:
    """``raw`` as a state file with a block boundary at each of ``starts``; returns the file, the boundaries'
    file offsets (the key-group offsets of a handle) and the writer's summary."""
    out = bytearray()
    writer = StateFileWriter(out.extend, compression=compression, block_size=block_size)
    offsets: list[int] = []
    position = 0
    for start in starts:
        writer.write(raw[position:start])
        position = start
        offsets.append(writer.start_block())
    writer.write(raw[position:])
    summary = writer.finish()
    return bytes(out), offsets, summary


_JSON_BOMBS = (b"1e999", b"-1e999", b"[1e400]", b'"\\ud800"', b'{"k":"\\udfff"}', b"[" * 995 + b"]" * 995,
               b"1" * 5000, b"NaN", b"\xff")  # fmt: skip
HOSTILE_VALUES: tuple[bytes, ...] = (
    b"", bytes(7), bytes(8), bytes(600), *_JSON_BOMBS,
    *(struct.pack(">q", samples.CLOCK_MS) + bomb for bomb in _JSON_BOMBS),  # behind a TTL timestamp
)  # fmt: skip
"""Stored values a writer never produces: shorter than a TTL header, JSON that decodes to Infinity, to a
lone surrogate, to nesting or digits beyond what the encoder handles."""


def _reencoded(sample: samples.SnapshotSample, raw: bytes, starts: list[int], what: str) -> SnapshotExample:
    data, offsets, summary = _encode(raw, starts, Compression.NONE, 1 << 20)
    groups = (sample.key_groups.start, sample.key_groups.end)
    return SnapshotExample(
        data, summary.size, summary.raw_size, summary.checksum, Compression.NONE, groups, tuple(offsets),
        sample.max_parallelism, "heap", groups, False, (what,),
    )  # fmt: skip


def inject_entry(sample: samples.SnapshotSample, state: str, value: bytes) -> SnapshotExample:
    """The sample's snapshot with one more entry: the first key of ``state`` again, with ``value``."""
    sid = next(s["id"] for s in json.loads(sample.meta)["states"] if s["name"] == state)
    key = next(k for k in sorted(sample.entries) if _U16.unpack_from(k, 2)[0] == sid)
    i = _U16.unpack_from(key)[0] - sample.key_groups.start
    entry = _U16.pack(len(key)) + key + _U32.pack(len(value)) + value
    at = sample.kg_starts[i + 1] if i + 1 < len(sample.kg_starts) else len(sample.raw)
    raw = sample.raw[:at] + entry + sample.raw[at:]
    starts = [s if s < at else s + len(entry) for s in sample.kg_starts]
    return _reencoded(sample, raw, starts, f"inject {state}={value[:20]!r}")


def replace_meta(sample: samples.SnapshotSample, meta: bytes) -> SnapshotExample:
    """The sample's snapshot with another meta section (length prefix adjusted)."""
    shift = len(meta) - len(sample.meta)
    raw = _U32.pack(len(meta)) + meta + sample.raw[4 + len(sample.meta) :]
    return _reencoded(sample, raw, [s + shift for s in sample.kg_starts], f"meta={meta[:40]!r}")


@st.composite
def snapshot_mutated(draw: st.DrawFn, sample: samples.SnapshotSample) -> SnapshotExample:
    raw = sample.raw
    starts = list(sample.kg_starts)
    log: list[str] = []
    ops = draw(st.lists(st.sampled_from(["payload", "fields", "meta", "starts", "inject"]), max_size=3))
    for op in ops:
        if op == "inject":
            # A well-framed entry the writer never produces: odd key lengths (LMDB keys stop at 511
            # bytes), unknown state ids, empty values; its key group prefix matches where it is put.
            i = draw(st.integers(0, len(starts) - 1))
            kg = sample.key_groups.start + i
            real = sorted(k for k in sample.entries if _U16.unpack_from(k)[0] == kg)
            use_real: bool = draw(st.booleans())
            if real and use_real:
                key = draw(st.sampled_from(real))  # a real key with another value (e.g. shorter than its TTL)
            else:
                sid = draw(st.one_of(st.integers(1, 6), st.integers(0, 0xFFFF)))
                rest_len = draw(st.sampled_from([0, 1, 2, 3, 4, 50, 503, 504, 507, 508, 600, 2000, 0xFFFF - 4]))
                key = _U16.pack(kg) + _U16.pack(sid) + bytes(rest_len)
            value = draw(st.one_of(st.binary(max_size=16), st.sampled_from(HOSTILE_VALUES)))
            entry = _U16.pack(len(key)) + key + _U32.pack(len(value)) + value
            at = draw(st.sampled_from([starts[i], starts[i + 1] if i + 1 < len(starts) else len(raw)]))
            raw = raw[:at] + entry + raw[at:]
            starts = [s if s < at or (s == at and j <= i) else s + len(entry) for j, s in enumerate(starts)]
            changes = [f"entry kg={kg} key={len(key)}B value={len(value)}B at {at}"]
        elif op == "payload":
            raw, changes = draw(mutated_bytes(raw, positions=[0, *starts]))
        elif op == "fields":
            raw, changes = draw(mutated_bytes(raw, positions=sample.entry_fields, max_ops=2))
        elif op == "meta":
            doc, changes = draw(mutated_document(json.loads(sample.meta)))
            meta = draw(encoded_document(doc))
            old = min(_U32.unpack_from(raw)[0], len(raw) - 4) if len(raw) >= 4 else 0
            length = len(meta) if draw(st.integers(0, 4)) else draw(st.sampled_from([0, old, 2**32 - 1]))
            shift = len(meta) - old
            raw = _U32.pack(length) + meta + raw[min(len(raw), 4 + old) :]
            starts = [max(0, s + shift) for s in starts]
        else:
            i = draw(st.integers(0, len(starts) - 1))
            starts[i] = max(0, starts[i] + draw(st.integers(-40, 40)))
            changes = [f"start[{i}]={starts[i]}"]
        starts = sorted(min(s, len(raw)) for s in starts)
        log.append(f"{op}: {changes}")
    compression = draw(st.sampled_from(list(Compression)))
    block_size = draw(st.sampled_from([7, 64, 1 << 20]))
    data, offsets, summary = _encode(raw, starts, compression, block_size)
    size, raw_size, checksum = summary.size, summary.raw_size, summary.checksum
    key_groups = (sample.key_groups.start, sample.key_groups.end)
    max_p = sample.max_parallelism
    handle_ops = draw(st.lists(st.sampled_from(["file", "offsets", "groups", "max_p", "sizes"]), max_size=2))
    for op in handle_ops:
        if op == "file":
            data, changes = draw(mutated_bytes(data, positions=offsets))
            size, checksum = len(data), _whole_checksum(data)
        elif op == "offsets":
            i = draw(st.integers(0, len(offsets) - 1))
            offsets[i] = draw(st.integers(0, size + 8))
            offsets.sort()
            changes = [f"offsets={offsets}"]
        elif op == "groups":
            a = draw(st.integers(0, max_p - 1))
            key_groups = (a, a + len(offsets) - 1)
            changes = [f"key_groups={key_groups}"]
        elif op == "max_p":
            max_p = draw(st.sampled_from([1, 4, 16, 128]))
            changes = [f"max_parallelism={max_p}"]
        else:
            size, raw_size = draw(hostile_sizes(size)), draw(hostile_sizes(raw_size))
            changes = [f"size={size} raw_size={raw_size}"]
        log.append(f"{op}: {changes}")
    a = draw(st.integers(0, sample.max_parallelism - 1))
    b = draw(st.integers(a, sample.max_parallelism - 1))
    return SnapshotExample(
        data, size, raw_size, checksum, compression, key_groups, tuple(offsets), max_p,
        draw(st.sampled_from(["lmdb", "heap"])), (a, b), not ops and not handle_ops, tuple(log),
    )  # fmt: skip


def hostile_sizes(true: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, true - 1, true + 1, 0xFFFFFFF0, 2**63 - 1]), st.integers(0, 2**40)).filter(
        lambda n: n >= 0
    )


def _whole_checksum(data: bytes) -> str:
    import xxhash

    return f"xxh3-64:{xxhash.xxh3_64_intdigest(data):016x}"


KNOWN_BUGS: dict[str, str] = {}
"""Untyped errors the fuzzer found in code owned by someone else, reported and not yet fixed there. The
checks count them (``python -m tests.fuzz.run`` prints how often) instead of failing; remove an entry once
its fix lands, and the fuzzer enforces it from then on."""

KNOWN_HITS: dict[str, int] = dict.fromkeys(KNOWN_BUGS, 0)


def known_bug(exc: BaseException) -> str | None:
    """The id of the known bug ``exc`` is, judged by its type and the frame that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    origin = Path(last.filename).as_posix()
    if type(exc).__module__.startswith("lmdb") and any(f.filename.endswith("statebackend/_lmdb.py") for f in frames):
        return "lmdb-long-key"
    if isinstance(exc, struct.error) and origin.endswith("statebackend/keyed.py") and last.name == "keys":
        return "short-composite-key"
    if isinstance(exc, struct.error) and origin.endswith("statebackend/_states.py"):
        return "short-ttl-value"
    return None


def _attempt_typed(action: Callable[[], Any]) -> tuple[bool, Any]:
    """Like ``_attempt`` with any ``KeystateError`` allowed, and known (reported) bugs counted."""
    try:
        return True, action()
    except KeystateError as exc:
        return False, exc
    except Exception as exc:
        bug = known_bug(exc)
        if bug is None or bug not in KNOWN_BUGS:  # fixed bugs are enforced again
            raise
        KNOWN_HITS[bug] += 1
        return False, exc


def _use_restored_state(backend: KVKeyedStateBackend, limit: int = 30) -> None:
    """Read restored state through the state API, as a job would (states with safe serializers only)."""
    for meta in backend.registered_states():
        serializer = safe_serializer(meta.serializer)
        if serializer is None:
            continue  # e.g. pickle: never decoded from untrusted bytes
        descriptor: StateDescriptor[Any]
        user_keys = safe_serializer(meta.user_key_serializer or "")
        try:
            if meta.kind is StateKind.VALUE:
                descriptor = ValueStateDescriptor[Any](name=meta.name, serializer=serializer, ttl=meta.ttl)
            elif meta.kind is StateKind.LIST:
                descriptor = ListStateDescriptor[Any](name=meta.name, serializer=serializer, ttl=meta.ttl)
            elif meta.kind is StateKind.MAP and user_keys is not None:
                descriptor = MapStateDescriptor[Any, Any](
                    name=meta.name, key_serializer=user_keys, serializer=serializer, ttl=meta.ttl
                )
            else:
                continue
        except ValueError:
            continue  # a name no descriptor can have (e.g. empty): no job could ask for this state
        state = backend.get_state(descriptor)
        for key in itertools.islice(backend.keys(meta.name), limit):
            backend.set_current_key(key)
            if isinstance(state, ValueState):
                state.value()
            elif isinstance(state, ListState):
                state.get()
            elif isinstance(state, MapState):
                list(state.items())


def check_snapshot(ctx: FuzzContext, ex: SnapshotExample) -> None:
    """A damaged keyed snapshot restores into a fresh backend and reads through ``read_keyed_entries``
    either consistently, or with a typed error; the intact one restores exactly what was written. The
    restored state can be read through the state API and snapshotted again, with typed errors only."""
    snapshot_checkpoint(ctx, ex)


def snapshot_checkpoint(ctx: FuzzContext, ex: SnapshotExample) -> str | None:
    """:func:`check_snapshot`, returning the checkpoint directory it wrote (``None``: the handle is invalid)."""
    sample = ctx.snapshot()
    storage = ctx.snapshot_storage()
    checkpoint_id = ctx.next_id()
    writer = storage.begin_checkpoint(samples.SNAPSHOT_JOB_ID, checkpoint_id)
    path = f"{samples.SNAPSHOT_UID}/0/keyed-{checkpoint_id}.ksf"
    storage.store.put(join_key(writer.directory, path), ex.data)
    uid = samples.SNAPSHOT_UID
    try:
        stream = StreamHandle(HandleScope.EXCLUSIVE, ex.size, ex.raw_size, ex.checksum, ex.compression, path=path)
        handle = KeyedStateHandle(KeyGroupRange(*ex.key_groups), ex.offsets, stream)
        metadata = CheckpointMetadata(
            checkpoint_id, samples.SNAPSHOT_JOB_ID, CheckpointKind.CHECKPOINT, samples.CLOCK_MS,
            (OperatorState(uid, 1, ex.operator_max_parallelism, subtasks=(SubtaskState(0, keyed=(handle,)),)),),
        )  # fmt: skip
    except MetadataError:
        assert not ex.identity
        return None  # such a handle cannot be written or read: the metadata model refuses it
    writer.commit(metadata)
    checkpoint = storage.load(writer.directory)
    handle = checkpoint.metadata.operators[0].subtasks[0].keyed[0]
    wanted = KeyGroupRange(*ex.restore_groups)
    ok_entries, entries = _attempt_typed(lambda: list(read_keyed_entries(checkpoint, handle, uid, key_groups=wanted)))
    ok_pairs, pairs = _attempt_typed(lambda: list(KeyedSnapshotReader(checkpoint, handle, uid).entries(wanted)))
    backend = samples.restore_target(ex.backend, wanted)
    again: tuple[bool, Any] = (False, None)
    try:
        ok_restore, restored = _attempt_typed(lambda: backend.restore([(checkpoint, handle)]))
        state = samples.kv_entries(backend) if ok_restore else {}
        if ok_restore:
            _attempt_typed(lambda: _use_restored_state(backend))
            rewriter = storage.begin_checkpoint(samples.SNAPSHOT_JOB_ID, ctx.next_id())
            again = _attempt_typed(lambda: backend.snapshot().write(rewriter, f"{uid}/0/again"))
            rewriter.abort()
    finally:
        backend.close()
    if ok_restore:
        assert ok_pairs, pairs
        assert state == dict(pairs)
    if ex.identity:
        expected = {k: v for k, v in sample.entries.items() if _U16.unpack_from(k)[0] in wanted}
        assert ok_entries, entries
        assert ok_pairs, pairs
        assert ok_restore, restored
        assert state == expected
        assert dict(pairs) == expected
        assert len(entries) == len(expected)
        assert again[0], again
    location = storage.store.describe(writer.directory)
    result = run_cli(["dump", location, "--operator", uid])
    check_cli_run(result)
    if ex.identity:
        assert result.code == 0, result
    return location


# --- (d) topology files ---------------------------------------------------------------------------------


def check_topology_bytes(ctx: FuzzContext, data: bytes) -> None:
    """``Topology.from_json_bytes`` returns a topology that round-trips, or raises ``TopologyError``."""
    try:
        topology = Topology.from_json_bytes(data, TOPOLOGY_WHERE)
    except TopologyError as exc:
        _names(exc, TOPOLOGY_WHERE)
        return
    written = topology.to_json_bytes()
    again = Topology.from_json_bytes(written, TOPOLOGY_WHERE)
    assert again == topology
    assert again.to_json_bytes() == written
    order = topology.topological_order()
    assert sorted(op.uid for op in order) == sorted(op.uid for op in topology)
    for op in topology:
        assert op.parallelism <= op.effective_max_parallelism <= 32768


def topology_arbitrary(ctx: FuzzContext) -> st.SearchStrategy[bytes]:
    operator = st.fixed_dictionaries(
        {"uid": st.one_of(st.sampled_from(["a", "b", "c"]), hostile_strings()),
         "parallelism": hostile_numbers()},
        optional={"max_parallelism": st.one_of(st.none(), hostile_numbers()),
                  "inputs": st.lists(st.fixed_dictionaries({"from": st.sampled_from(["a", "b", "c"]),
                                                            "partitioning": st.sampled_from(
                                                                ["forward", "hash", "rescale", "x"])}), max_size=3),
                  "extra": json_values()},
    )  # fmt: skip
    doc = st.fixed_dictionaries(
        {"format_version": st.one_of(st.just(1), hostile_numbers()), "operators": st.lists(operator, max_size=4)}
    )
    return st.one_of(json_values(nan=True), doc).flatmap(encoded_document)


def topology_mutated(ctx: FuzzContext | None = None) -> st.SearchStrategy[bytes]:
    design = json.loads(samples.DESIGN_TOPOLOGY)
    mutated = mutated_document(design).map(lambda pair: pair[0]).flatmap(encoded_document)
    damaged = mutated_bytes(samples.DESIGN_TOPOLOGY).map(lambda pair: pair[0])
    return st.one_of(mutated, damaged)


# --- (e) storage locations ------------------------------------------------------------------------------


def check_location(ctx: FuzzContext, text: str) -> None:
    """``parse_location`` returns a location whose path cannot leave its container, or ``InvalidURIError``."""
    try:
        location = parse_location(text)
    except InvalidURIError:
        return
    assert isinstance(location, Location)
    assert location.scheme in ("file", "s3")
    path = location.path
    if path:
        assert not path.startswith("/"), path
        assert not path.endswith("/"), path
        assert all(segment not in ("", ".", "..") for segment in path.split("/")), path
        validate_key(path)
    if location.scheme == "s3":
        assert location.bucket
        assert ".." not in location.bucket
        str(location).encode("utf-8")  # what boto3 sends
    else:
        assert location.bucket == ""
        os.fsencode(str(location))  # what the filesystem is asked for


def locations(ctx: FuzzContext) -> st.SearchStrategy[str]:
    scheme = st.sampled_from(["", "/", "file://", "file:///", "FILE:///", "file://localhost/", "file://host/",
                              "s3://", "S3://", "s3:/", "s3:///", "http://", "~/", "./", "../"])  # fmt: skip
    bucket = st.sampled_from(["", "bucket", "my.bucket-1", "a..b", "B", "ab", "x" * 64, "bucket:80", "u@bucket"])
    piece = st.one_of(
        st.sampled_from(
            [
                "..",
                ".",
                "",
                "a",
                "%2e%2e",
                "%2E%2e",
                "%2F",
                "%00",
                "%ff",
                "%",
                "~",
                "?",
                "#",
                "\\",
                " ",
                "\n",
                "\x00",
                "\ud800",
                "\udcff",
                "chk-1",
                "_metadata",
            ]
        ),
        st.text(max_size=6),
    )
    path = st.lists(piece, max_size=6).map("/".join)
    built = st.tuples(scheme, bucket, path).map(lambda t: f"{t[0]}{t[1]}/{t[2]}" if t[0].endswith("//") else
                                               f"{t[0]}{t[2]}")  # fmt: skip
    return st.one_of(built, st.text(max_size=60), hostile_strings())


# --- (f) the CLI ----------------------------------------------------------------------------------------


@dataclass
class CliRun:
    argv: list[str]
    code: int
    out: str
    err: str
    touched: list[tuple[str, str]] = field(default_factory=list)
    """File-system events (event name, path) seen while the command ran."""


_RECORDING: list[list[tuple[str, str]]] = []
_WRITE_EVENTS = frozenset({"os.remove", "os.rename", "os.link", "os.symlink", "os.mkdir", "os.rmdir",
                           "shutil.rmtree", "os.truncate", "os.chmod", "os.utime"})  # fmt: skip
_READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDING or (event not in _READ_EVENTS and event not in _WRITE_EVENTS):
        return
    try:
        target = args[0] if args else ""
        if isinstance(target, int) or target is None:
            return
        path = os.fsdecode(os.fspath(target))
        kind = event
        if event == "open":
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            kind = "open-write" if writes else "open"
        _RECORDING[-1].append((kind, path))
    except Exception:  # an audit hook must never raise into the audited code
        return


sys.addaudithook(_audit)


def run_cli(argv: list[str]) -> CliRun:
    """Run ``keystate`` in process, with stdout a strict UTF-8 stream (like a terminal or a pipe)."""
    raw_out = io.BytesIO()
    out = io.TextIOWrapper(raw_out, encoding="utf-8", errors="strict", newline="\n", write_through=True)
    err = io.StringIO()
    touched: list[tuple[str, str]] = []
    _RECORDING.append(touched)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_run(argv)
            except SystemExit as exc:  # argparse: bad usage
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        _RECORDING.pop()
    out.flush()
    text = raw_out.getvalue().decode("utf-8")
    out.detach()
    return CliRun(argv, code, text, err.getvalue(), touched)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_cli_run(result: CliRun, *, confined_to: tuple[Path, ...] = (), watched: Path | None = None) -> None:
    """Exit 0, 1 or 2; exit 2 with exactly one line on stderr and no traceback; nothing on stderr
    otherwise; JSON output is strict JSON; read-only commands write nothing; every file the command
    touched under ``watched`` lies under one of ``confined_to``."""
    command = result.argv[0]
    assert result.code in (0, 1, 2), result
    assert "Traceback" not in result.err, result
    assert "Traceback" not in result.out, result
    if result.code == 2:
        assert result.err.endswith("\n"), result
        assert result.err.count("\n") == 1, result
        assert "internal error" not in result.err, result
    else:
        assert result.err == "", result
    if result.code == 1:
        assert command in ("verify", "check-restore") or "--verify" in result.argv, result
    if result.code in (0, 1) and "--json" in result.argv:
        json.loads(result.out, parse_constant=_reject_constant)
    if command == "dump" and result.code == 0:
        for line in result.out.splitlines():
            json.loads(line, parse_constant=_reject_constant)
    writes = [t for t in result.touched if t[0] in _WRITE_EVENTS or t[0] == "open-write"]
    assert not writes, (result.argv, writes)
    if watched is not None:
        for _, path in result.touched:
            if _under(path, watched):
                assert any(_under(path, c) for c in confined_to), (result.argv, path)


def _under(path: str | Path, base: Path) -> bool:
    """Whether ``path``, normalized lexically (symlinks are not resolved), is ``base`` or below it."""
    full = os.path.normpath(os.path.abspath(path))
    top = os.path.normpath(os.path.abspath(base))
    return full == top or full.startswith(top + os.sep)


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
    """A directory next to the roots (outside every one) holding copies of the state files and metadata."""

    def __repr__(self) -> str:
        return f"CliTemplate({str(self.root)!r})"

    @property
    def checkpoint(self) -> str:
        return f"{samples.CLI_JOB_ID}/chk-5"

    @classmethod
    def build(cls, base: Path) -> CliTemplate:
        root = base / "root"
        metadata = samples.write_cli_checkpoint(root)
        directory = root / samples.CLI_JOB_ID / "chk-5"
        files = tuple(sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.ksf")))
        outside = base / "outside"
        outside.mkdir()
        for i, name in enumerate(files):
            shutil.copyfile(directory / name, outside / f"state-{i}.ksf")
        shutil.copyfile(directory / METADATA_FILE, outside / METADATA_FILE)
        (outside / "subdir").mkdir()
        topology = base / "topology.json"
        topology.write_bytes(metadata.topology().to_json_bytes())
        data = (directory / METADATA_FILE).read_bytes()
        return cls(root, data, json.loads(data), files, topology, outside)


@dataclass(frozen=True)
class CliExample:
    mutations: tuple[tuple[Any, ...], ...]
    location: str
    uid: str
    key_group: int | None
    json_output: bool
    topology: bytes | None
    limit_document: bool

    def __repr__(self) -> str:  # file contents are rebuilt from the seed; their bytes would flood the report
        def short(value: Any) -> str:
            return f"<{len(value)} bytes>" if isinstance(value, bytes) and len(value) > 64 else repr(value)

        mutations = [tuple(short(v) for v in m) for m in self.mutations]
        return (
            f"CliExample(mutations={mutations}, location={self.location!r}, uid={self.uid[:40]!r}, "
            f"key_group={self.key_group}, json={self.json_output}, topology={short(self.topology)}, "
            f"limit_document={self.limit_document})"
        )


@st.composite
def cli_examples(draw: st.DrawFn, template: CliTemplate) -> CliExample:
    mutations: list[tuple[Any, ...]] = []
    files = template.state_files
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["metadata-plausible", "metadata-plausible", "metadata-json", "metadata-bytes",
                                     "state-bytes", "state-bytes", "delete", "symlink",
                                     "directory", "sparse-metadata", "metadata-symlink", "extra-checkpoint",
                                     "savepoint"]))  # fmt: skip
        if kind in ("metadata-json", "metadata-plausible"):
            doc, _ = draw(mutated_document(template.document, plausible=kind == "metadata-plausible"))
            mutations.append(("metadata", draw(encoded_document(doc))))
        elif kind == "metadata-bytes":
            mutations.append(("metadata", draw(mutated_bytes(template.metadata))[0]))
        elif kind == "state-bytes":
            name = draw(st.sampled_from(files))
            data = (template.root / template.checkpoint / name).read_bytes()
            boundaries, _ = samples.block_boundaries(data)
            fields = [0, 4, 6, 7, *itertools.chain.from_iterable((b, b + 4, b + 8) for b in boundaries)]
            mutations.append(("state", name, draw(mutated_bytes(data, positions=fields))[0]))
        elif kind in ("delete", "directory"):
            mutations.append((kind, draw(st.sampled_from(files))))
        elif kind == "symlink":
            target = draw(st.sampled_from(["same", "other", "devnull", "dangling", "subdir", "loop", "root"]))
            mutations.append(("symlink", draw(st.sampled_from(files)), target))
        elif kind == "metadata-symlink":
            mutations.append(("symlink", METADATA_FILE, draw(st.sampled_from(["same", "dangling", "subdir",
                                                                                "loop", "devnull"]))))  # fmt: skip
        elif kind == "sparse-metadata":
            mutations.append(("sparse", draw(st.sampled_from([(1 << 20) + 1, 300 << 20]))))
        else:
            doc, _ = draw(mutated_document(template.document, max_mutations=2))
            if kind == "savepoint" and isinstance(doc, dict):
                doc["kind"] = "savepoint"
            mutations.append((kind, draw(st.integers(0, 12)), draw(encoded_document(doc))))
    location = draw(st.sampled_from(["root", "job", "checkpoint", "metadata", "file-uri"]))
    uid = draw(st.one_of(st.sampled_from(["totals", "sink", "audit", "src"]), hostile_strings()))
    key_group = draw(st.one_of(st.none(), st.integers(-1, 9)))
    topology = draw(st.one_of(st.none(), topology_mutated()))
    return CliExample(tuple(mutations), location, uid, key_group, draw(st.booleans()), topology,
                      any(m[0] == "sparse" for m in mutations))  # fmt: skip


def _apply(template: CliTemplate, root: Path, mutation: tuple[Any, ...]) -> None:
    directory = root / template.checkpoint
    kind = mutation[0]
    if kind == "metadata":
        path = directory / METADATA_FILE
        if path.is_symlink() or path.is_dir():
            return
        path.write_bytes(mutation[1])
    elif kind == "state":
        path = directory / mutation[1]
        if path.is_symlink() or not path.is_file():
            return
        path.write_bytes(mutation[2])
    elif kind == "delete":
        path = directory / mutation[1]
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    elif kind == "directory":
        path = directory / mutation[1]
        if path.is_symlink() or path.is_file():
            path.unlink()
        path.mkdir(exist_ok=True)
    elif kind == "symlink":
        name, target = mutation[1], mutation[2]
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        index = template.state_files.index(name) if name in template.state_files else 0
        other = (index + 1) % len(template.state_files)
        targets = {
            "same": template.outside / (METADATA_FILE if name == METADATA_FILE else f"state-{index}.ksf"),
            "other": template.outside / f"state-{other}.ksf",
            "devnull": Path(os.devnull),
            "dangling": template.outside / "missing",
            "subdir": template.outside / "subdir",
            "loop": path,
            "root": Path("/"),
        }
        path.symlink_to(targets[target])
    elif kind == "sparse":
        path = directory / METADATA_FILE
        if path.is_symlink() or path.is_dir():
            return
        with open(path, "r+b") as f:
            f.truncate(mutation[1])
    else:
        parent = root / samples.CLI_JOB_ID if kind == "extra-checkpoint" else root / "savepoints"
        name = f"chk-{mutation[1]}" if kind == "extra-checkpoint" else f"savepoint-feedfa-{mutation[1]:012x}"
        (parent / name).mkdir(parents=True, exist_ok=True)
        path = parent / name / METADATA_FILE
        if not path.is_symlink() and not path.is_dir():
            path.write_bytes(mutation[2])


@contextlib.contextmanager
def document_limit(limit: int | None) -> Iterator[None]:
    """Lower the ``_metadata`` size limit (so a test need not write hundreds of megabytes)."""
    if limit is None:
        yield
        return
    saved = storage.validation.MAX_DOCUMENT_BYTES
    storage.validation.MAX_DOCUMENT_BYTES = limit
    try:
        yield
    finally:
        storage.validation.MAX_DOCUMENT_BYTES = saved


def check_cli(ctx: FuzzContext, ex: CliExample) -> None:
    """inspect / verify / dump / check-restore / list on a damaged copy of a real checkpoint: exit 0, 1
    or 2, at most one line on stderr, no traceback, no write, no file outside the location touched."""
    template = ctx.cli_template()
    work = ctx.fresh_dir("cli")
    root = work / "root"
    shutil.copytree(template.root, root, symlinks=True)
    try:
        for mutation in ex.mutations:
            _apply(template, root, mutation)
        topology = template.topology
        if ex.topology is not None:
            topology = work / "topology.json"
            topology.write_bytes(ex.topology)
        location = {
            "root": str(root),
            "job": str(root / samples.CLI_JOB_ID),
            "checkpoint": str(root / template.checkpoint),
            "metadata": str(root / template.checkpoint / METADATA_FILE),
            "file-uri": f"file://{root / template.checkpoint}",
        }[ex.location]
        json_flag = ["--json"] if ex.json_output else []
        commands: list[list[str]] = [
            ["inspect", location, *json_flag],
            ["inspect", location, "--operator", ex.uid] if not ex.json_output else ["inspect", location, "--graph"],
            ["verify", location, *json_flag],
            ["dump", location, "--operator", ex.uid]
            + ([] if ex.key_group is None else ["--key-group", str(ex.key_group)]),
            ["check-restore", location, "--topology", str(topology), *json_flag],
            ["list", str(root), *json_flag],
        ]
        confined = (root, topology, template.outside)
        with document_limit(1 << 20 if ex.limit_document else None):
            for argv in commands:
                check_cli_run(run_cli(argv), confined_to=confined, watched=ctx.scratch)
        if not ex.mutations and ex.topology is None:
            assert run_cli(["verify", location]).code == 0
    finally:
        shutil.rmtree(work)


# --- the registry ---------------------------------------------------------------------------------------


def _uri_check(ctx: FuzzContext, text: Any) -> None:
    check_location(ctx, text)


PROPERTIES: tuple[Property, ...] = (
    Property("metadata", "arbitrary_bytes", metadata_arbitrary_bytes, check_metadata_bytes, 300),
    Property("metadata", "arbitrary_json", metadata_arbitrary_json, check_metadata_bytes, 200),
    Property("metadata", "mutated_golden", metadata_mutated, check_metadata_bytes, 600),
    Property("metadata", "plausible_golden", metadata_plausible, check_metadata_bytes, 400),
    Property("metadata", "damaged_golden", metadata_damaged, check_metadata_bytes, 300),
    Property("statefile", "arbitrary_bytes", lambda ctx: statefile_arbitrary(), check_state_file, 300),
    Property("statefile", "mutated", lambda ctx: statefile_mutated(), check_state_file, 400),
    Property("snapshot", "mutated", lambda ctx: snapshot_mutated(ctx.snapshot()), check_snapshot, 150),
    Property("topology", "arbitrary", topology_arbitrary, check_topology_bytes, 300),
    Property("topology", "mutated_design", topology_mutated, check_topology_bytes, 300),
    Property("uri", "arbitrary", locations, _uri_check, 600),
    Property("cli", "damaged_checkpoint", lambda ctx: cli_examples(ctx.cli_template()), check_cli, 80),
)
"""Every fuzzed property with the number of examples it runs in CI."""
