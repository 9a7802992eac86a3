"""Properties of (c) keyed snapshot payloads: a real LMDB snapshot, re-encoded with damage, restored into
a fresh backend and read through ``keystate.statebackend.inspection.read_keyed_entries``. Either consistently, or
with a typed error; the intact snapshot restores exactly what was written."""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any

import xxhash
from hypothesis import strategies as st

from keystate.statebackend import (
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
from keystate.statebackend._snapshot_reader import KeyedSnapshotReader
from keystate.statebackend.inspection import read_keyed_entries
from keystate.statebackend.keyed import KVKeyedStateBackend
from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    FormatError,
    HandleScope,
    KeyedStateHandle,
    KeyGroupRange,
    MetadataError,
    OperatorState,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.base import join_key
from keystate.storage.format.statefile import (
    Compression,
    StateFileSummary,
    format_checksum,
)
from keystate.storage.statefile_io import StateFileWriter
from tests.fuzz import samples
from tests.fuzz.cli_harness import check_cli_run, run_cli
from tests.fuzz.harness import FuzzContext, attempt_typed
from tests.fuzz.strategies import encoded_document, mutated_bytes, mutated_document

__all__ = [
    "HOSTILE_VALUES",
    "SnapshotExample",
    "check_snapshot",
    "hostile_sizes",
    "inject_entry",
    "replace_meta",
    "snapshot_checkpoint",
    "snapshot_mutated",
]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


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
            size, checksum = len(data), format_checksum(xxhash.xxh3_64_intdigest(data))
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
    writer.adopt([handle])  # written with a plain put above, not through a stream of this writer
    writer.commit(metadata)
    checkpoint = storage.load(writer.directory)
    handle = checkpoint.metadata.operators[0].subtasks[0].keyed[0]
    wanted = KeyGroupRange(*ex.restore_groups)
    ok_entries, entries = attempt_typed(lambda: list(read_keyed_entries(checkpoint, handle, uid, key_groups=wanted)))
    ok_pairs, pairs = attempt_typed(lambda: list(KeyedSnapshotReader(checkpoint, handle, uid).entries(wanted)))
    backend = samples.keyed_backend(ex.backend, wanted)
    again: tuple[bool, Any] = (False, None)
    try:
        ok_restore, restored = attempt_typed(lambda: backend.restore([(checkpoint, handle)]))
        state = samples.kv_entries(backend) if ok_restore else {}
        if ok_restore:
            attempt_typed(lambda: _use_restored_state(backend))
            rewriter = storage.begin_checkpoint(samples.SNAPSHOT_JOB_ID, ctx.next_id())
            again = attempt_typed(lambda: backend.snapshot().write(rewriter, f"{uid}/0/again"))
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
    # verify decodes with the restore's decoder: what a restore refuses as damage, verify refuses (a
    # restore may also refuse what depends on its backend, e.g. another max parallelism: not damage).
    verified = run_cli(["verify", location])
    check_cli_run(verified)
    if not ok_restore and isinstance(restored, FormatError):
        assert verified.code != 0, (restored, verified)
    if verified.code == 0:
        assert ok_entries, entries
        assert ok_pairs, pairs
    if ex.identity:
        assert verified.code == 0, verified
    return location
