"""Hostile delta files whose checksums are valid: every check of the delta parser (``_delta.py``) is reached
and raises ``StateRestoreError`` (or ``MaxParallelismMismatchError``) naming what is wrong, where, what was
expected and what was found.

Each file is written through a real ``CheckpointWriter`` stream (``storage/format/statefile.py`` blocks,
checksums and trailer), laid out exactly as ``write_delta`` lays it out: ``>I header length | header JSON``,
then one block run per key group of the handle. So the block checksums pass and the parser's own checks
are what fails. A property closes it: arbitrary bytes as a header or as a key group's data raise nothing
but ``StateRestoreError``, in bounded time and memory.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystate.statebackend import StateRestoreError
from keystate.statebackend._delta import ChainReader, DeltaHeader, DeltaReader
from keystate.statebackend._entry_format import MAX_STORED_KEY_BYTES
from keystate.statebackend._snapshot import MAX_SNAPSHOT_META, SnapshotMeta, StateMeta
from keystate.statebackend.errors import MaxParallelismMismatchError
from keystate.statebackend.state import StateKind
from keystate.statebackend.ttl import TtlConfig
from keystate.storage import CheckpointStorage, CompletedCheckpoint, HandleScope, KeyedStateHandle, KeyGroupRange
from tests.statebackend.incremental_support import VALUE, checkpoint
from tests.statebackend.support import FULL, JOB_ID, make_backend, storage_at

_HEADER_LEN = struct.Struct(">I")
_KEY_LEN = struct.Struct(">H")
_VALUE_LEN = struct.Struct(">I")
TOMBSTONE = 0xFFFFFFFF
KG = 3
"""The key group the crafted entries belong to."""


@dataclasses.dataclass
class Chain:
    storage: CheckpointStorage
    second: CompletedCheckpoint
    """Checkpoint 2: a base (checkpoint 1) and one delta, as a heap backend wrote them."""
    handle: KeyedStateHandle
    meta: SnapshotMeta
    """The real delta's snapshot meta (one value state)."""

    @property
    def sid(self) -> int:
        return self.meta.states[0].sid


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    storage = storage_at(tmp_path / "checkpoints")
    backend = make_backend("heap")
    try:
        value = backend.get_state(VALUE)
        for k in range(60):
            backend.set_current_key(k)
            value.update(k)
        checkpoint(storage, backend, 1)
        for k in range(0, 60, 7):
            backend.set_current_key(k)
            value.update(k + 1000)
        second, handle, _ = checkpoint(storage, backend, 2)
    finally:
        backend.close()
    assert handle is not None
    assert len(handle.deltas) == 1
    meta = DeltaReader(second, handle.deltas[0], "op").header().meta
    return Chain(storage, second, handle, meta)


def header(chain: Chain, **changes: Any) -> bytes:
    """The header JSON of a delta of checkpoint 3 based on 2, with top-level fields replaced (``None``
    removes a field)."""
    doc: dict[str, Any] = json.loads(DeltaHeader(3, 2, chain.meta).to_json_bytes())
    for name, value in changes.items():
        if value is None:
            doc.pop(name)
        else:
            doc[name] = value
    return json.dumps(doc).encode()


def meta_doc(meta: SnapshotMeta) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(meta.to_json_bytes())
    return doc


def craft(
    chain: Chain,
    head: bytes,
    groups: dict[int, bytes] | None = None,
    *,
    key_groups: KeyGroupRange = FULL,
    prefix: bytes | None = None,
    checkpoint_id: int = 3,
) -> KeyedStateHandle:
    """A delta file written like ``write_delta`` writes one: ``>I len(head) | head`` (or ``prefix``), then
    for each key group of ``key_groups`` a block boundary and ``groups[kg]``; valid checksums throughout."""
    writer = chain.storage.begin_checkpoint(JOB_ID, checkpoint_id)
    with writer.open_stream("op/0/keyed", HandleScope.SHARED) as stream:
        stream.write(_HEADER_LEN.pack(len(head)) + head if prefix is None else prefix)
        marks = []
        for kg in key_groups:
            marks.append(stream.mark_block())
            stream.write((groups or {}).get(kg, b""))
        handle = stream.close()
        offsets = tuple(stream.block_offset(mark) for mark in marks)
    return KeyedStateHandle(key_groups, offsets, handle)


def reader(chain: Chain, delta: KeyedStateHandle) -> DeltaReader:
    return DeltaReader(chain.second, delta, "op")


def key(sid: int, n: int, kg: int = KG, length: int = 12) -> bytes:
    """A composite key: ``>H key group | >H state id | key bytes`` (``length`` bytes in all)."""
    return _KEY_LEN.pack(kg) + _KEY_LEN.pack(sid) + n.to_bytes(length - 4, "big")


def entry(k: bytes, value: bytes | None) -> bytes:
    if value is None:
        return _KEY_LEN.pack(len(k)) + k + _VALUE_LEN.pack(TOMBSTONE)
    return _KEY_LEN.pack(len(k)) + k + _VALUE_LEN.pack(len(value)) + value


def entries_error(chain: Chain, data: bytes, *, meta: SnapshotMeta | None = None) -> StateRestoreError:
    """The error reading ``data`` as key group ``KG``'s entries raises."""
    head = DeltaHeader(3, 2, meta or chain.meta).to_json_bytes()
    delta = craft(chain, head, {KG: data})
    with pytest.raises(StateRestoreError) as caught:
        list(reader(chain, delta).chunks(FULL))
    return caught.value


def at(pos: int, kg: int = KG) -> str:
    """The location part of an entry error."""
    return rf"delta file .*\.ksf: key group {kg}, byte {pos} of its data \(which starts at file offset \d+\)"


def ttl_meta(chain: Chain, kind: StateKind = StateKind.VALUE) -> SnapshotMeta:
    state = dataclasses.replace(chain.meta.states[0], kind=kind, ttl=TtlConfig(60_000))
    return dataclasses.replace(chain.meta, states=(state,))


def test_a_crafted_delta_that_is_well_formed_reads(chain: Chain) -> None:
    """The crafting itself is sound: a well-formed file reads back entry for entry."""
    changes = [(key(chain.sid, 1), b"\x00" * 5), (key(chain.sid, 2), None), (key(chain.sid, 3), b"v")]
    delta = craft(chain, header(chain), {KG: b"".join(entry(k, v) for k, v in changes)})
    assert list(reader(chain, delta).chunks(FULL)) == [(KG, changes)]


# --- the header (DeltaReader.header, DeltaHeader.from_json_bytes) -------------------------------------------


def header_error(chain: Chain, head: bytes, **kwargs: Any) -> str:
    with pytest.raises(StateRestoreError) as caught:
        reader(chain, craft(chain, head, **kwargs)).header()
    return str(caught.value)


def test_header_shorter_than_its_length_field(chain: Chain) -> None:
    message = header_error(chain, b"", prefix=b"\x00\x01")
    assert re.search(r"delta file .*: delta header is truncated: expected at least 4 bytes before the first "
                     r"key group, found 2", message)  # fmt: skip


@pytest.mark.parametrize("declared", [0, 5000])
def test_header_length_field_that_does_not_match(chain: Chain, declared: int) -> None:
    head = header(chain)
    message = header_error(chain, head, prefix=_HEADER_LEN.pack(declared) + head)
    assert f"delta header declares {declared} bytes but {len(head)} precede the first key group" in message


def test_header_length_over_the_meta_limit(chain: Chain) -> None:
    head = header(chain, padding="x" * MAX_SNAPSHOT_META)  # declared == actual, but over the limit
    message = header_error(chain, head)
    assert f"delta header of {len(head)} bytes is over the {MAX_SNAPSHOT_META}-byte limit a restore reads" in message


def test_first_key_group_offset_beyond_any_header_is_refused_before_reading(chain: Chain) -> None:
    # Base64 of random bytes: about 3 MB stored before the first key group, more than any header takes.
    padding = base64.b64encode(random.Random(3).randbytes(3 * MAX_SNAPSHOT_META)).decode()
    message = header_error(chain, header(chain, padding=padding))
    assert "more than a delta header takes" in message
    assert "delta header of" not in message, "refused before the header was read"


def test_entry_truncated_in_its_key_with_a_plausible_length(chain: Chain) -> None:
    data = _KEY_LEN.pack(100) + b"\x00" * 18
    assert re.search(at(0) + ": entry truncated: expected 104 more bytes, found 18", str(entries_error(chain, data)))


def test_header_that_is_not_json(chain: Chain) -> None:
    message = header_error(chain, b"{not json")
    assert "(header)" in message
    assert "JSON" in message


def test_header_that_is_not_an_object(chain: Chain) -> None:
    assert "(header): a delta header must be a JSON object" in header_error(chain, b"[1, 2]")


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_header_of_another_delta_format_version(chain: Chain, version: object) -> None:
    message = header_error(chain, header(chain, delta_format_version=version))  # None: no such field
    assert f"delta_format_version {version!r} is not supported (this keystate reads 1)" in message
    assert "is this a delta file?" in message


def test_header_with_an_unknown_field(chain: Chain) -> None:
    assert "surprise" in header_error(chain, header(chain, surprise=1))


@pytest.mark.parametrize("field", ["checkpoint_id", "based_on", "snapshot"])
def test_header_without_a_field(chain: Chain, field: str) -> None:
    assert field in header_error(chain, header(chain, **{field: None}))


@pytest.mark.parametrize(("field", "value"), [("checkpoint_id", -1), ("checkpoint_id", "3"), ("based_on", 1.5)])
def test_header_ids_that_are_not_checkpoint_ids(chain: Chain, field: str, value: object) -> None:
    message = header_error(chain, header(chain, **{field: value}))
    assert field in message
    assert repr(value) in message or str(value) in message


@pytest.mark.parametrize("based_on", [3, 4])
def test_header_that_extends_itself_or_a_later_checkpoint(chain: Chain, based_on: int) -> None:
    message = header_error(chain, header(chain, based_on=based_on))
    assert f"delta of checkpoint 3 claims to extend checkpoint {based_on}; a delta extends an earlier" in message


def test_header_snapshot_that_is_not_an_object(chain: Chain) -> None:
    message = header_error(chain, header(chain, snapshot=[1]))
    assert "field 'snapshot' must be the keyed snapshot meta object" in message


def test_header_snapshot_meta_that_is_damaged(chain: Chain) -> None:
    doc = meta_doc(chain.meta)
    doc["states"][0]["kind"] = "teapot"
    message = header_error(chain, header(chain, snapshot=doc))
    assert "(header).snapshot" in message
    assert "kind" in message


def test_header_snapshot_meta_without_max_parallelism(chain: Chain) -> None:
    doc = meta_doc(dataclasses.replace(chain.meta, max_parallelism=None))
    message = header_error(chain, header(chain, snapshot=doc))
    assert "(header).snapshot: a delta's snapshot meta records its max_parallelism" in message


def test_header_of_another_checkpoint_than_the_handle_says(chain: Chain) -> None:
    delta = craft(chain, header(chain, checkpoint_id=5))  # the writer of checkpoint 3 wrote it
    with pytest.raises(StateRestoreError, match="the handle says checkpoint 3 wrote it, its header says 5"):
        reader(chain, delta).header()


def test_handle_key_groups_beyond_the_header_max_parallelism(chain: Chain) -> None:
    doc = meta_doc(dataclasses.replace(chain.meta, max_parallelism=64))
    with pytest.raises(StateRestoreError, match=r"names key groups 0\.\.127, but the delta was written with max_par"):
        reader(chain, craft(chain, header(chain, snapshot=doc))).header()


# --- entries (DeltaReader.chunks: _parse_uniform, then _parse_checked) -------------------------------------


def test_entry_header_truncated(chain: Chain) -> None:
    data = entry(key(chain.sid, 1), b"v") + b"\x00"
    pos = len(data) - 1
    assert re.search(at(pos) + ": entry header truncated: expected 2 bytes, found 1", str(entries_error(chain, data)))


@pytest.mark.parametrize("length", [0, 7, 0xFFFF])
def test_key_of_an_impossible_length(chain: Chain, length: int) -> None:
    data = _KEY_LEN.pack(length) + b"\x00" * 16
    assert re.search(at(0) + rf": key of {length} bytes; expected 8\.\.\d+", str(entries_error(chain, data)))


def test_entry_truncated_in_its_key(chain: Chain) -> None:
    data = _KEY_LEN.pack(12) + key(chain.sid, 1)[:6]
    assert re.search(at(0) + ": entry truncated: expected 16 more bytes, found 6", str(entries_error(chain, data)))


def test_entry_of_another_key_group(chain: Chain) -> None:
    data = entry(key(chain.sid, 1, kg=KG + 2), b"v")
    assert re.search(at(0) + f": entry of key group {KG + 2}, expected {KG}", str(entries_error(chain, data)))


def test_entry_of_an_unknown_state(chain: Chain) -> None:
    data = entry(key(chain.sid, 1), b"v") + entry(key(chain.sid + 40, 2), b"v")
    pos = len(entry(key(chain.sid, 1), b"v"))
    assert re.search(at(pos) + f": entry of unknown state id {chain.sid + 40}", str(entries_error(chain, data)))


@pytest.mark.parametrize("order", [(2, 1), (1, 1)], ids=["descending", "duplicate"])
def test_keys_out_of_order_in_uniform_entries(chain: Chain, order: tuple[int, int]) -> None:
    """Every entry of the same shape (the ``_parse_uniform`` fast path): it declines, the checked path names
    the entry."""
    first, second = (entry(key(chain.sid, n), b"vvvv") for n in order)
    message = str(entries_error(chain, first + second))
    assert re.search(at(len(first)) + ": keys out of order: expected strictly increasing keys", message)


def test_keys_out_of_order_in_mixed_entries(chain: Chain) -> None:
    first = entry(key(chain.sid, 5), None)
    data = first + entry(key(chain.sid, 4), b"a longer value")
    assert re.search(at(len(first)) + ": keys out of order", str(entries_error(chain, data)))


def test_uniform_entries_of_another_key_group(chain: Chain) -> None:
    data = b"".join(entry(key(chain.sid, n, kg=KG + 1), b"vvvv") for n in range(4))
    assert re.search(at(0) + f": entry of key group {KG + 1}, expected {KG}", str(entries_error(chain, data)))


def test_uniform_entries_of_an_unknown_state(chain: Chain) -> None:
    data = b"".join(entry(key(chain.sid + 1, n), b"vvvv") for n in range(4))
    assert re.search(at(0) + f": entry of unknown state id {chain.sid + 1}", str(entries_error(chain, data)))


def test_value_longer_than_the_key_group(chain: Chain) -> None:
    k = key(chain.sid, 1)
    data = _KEY_LEN.pack(len(k)) + k + _VALUE_LEN.pack(100) + b"abc"
    message = str(entries_error(chain, data))
    assert re.search(at(0) + ": value of 100 bytes, found 3 before the key group's end", message)


def test_ttl_value_shorter_than_its_timestamp_in_uniform_entries(chain: Chain) -> None:
    data = b"".join(entry(key(chain.sid, n), b"abc") for n in range(3))  # the fast path takes these
    message = str(entries_error(chain, data, meta=ttl_meta(chain)))
    name = chain.meta.states[0].name
    assert re.search(at(0) + f": value of state '{name}' has 3 bytes; expected at least the 8-byte TTL timestamp",
                     message)  # fmt: skip


def test_ttl_value_shorter_than_its_timestamp_in_mixed_entries(chain: Chain) -> None:
    first = entry(key(chain.sid, 1), None)
    data = first + entry(key(chain.sid, 2), b"abc")
    message = str(entries_error(chain, data, meta=ttl_meta(chain)))
    assert re.search(at(len(first)) + ": value of state .* has 3 bytes; expected at least the 8-byte TTL", message)


def test_list_state_with_ttl_whose_frames_are_damaged(chain: Chain) -> None:
    data = entry(key(chain.sid, 1), b"\x00\x00\x00\x09abc")  # a frame claims 9 bytes, 3 follow
    message = str(entries_error(chain, data, meta=ttl_meta(chain, StateKind.LIST)))
    assert re.search(at(0) + f": list state '{chain.meta.states[0].name}' with TTL: ", message)


# --- the chain (ChainReader.meta, merge_metas, check_max_parallelism) ---------------------------------------


def extended(chain: Chain, delta: KeyedStateHandle) -> ChainReader:
    """The real chain (base of 1, delta of 2) with ``delta`` (of checkpoint 3) after them."""
    handle = dataclasses.replace(chain.handle, deltas=(*chain.handle.deltas, delta))
    return ChainReader(chain.second, handle, "op")


def test_a_well_formed_extension_of_the_chain_reads(chain: Chain) -> None:
    assert extended(chain, craft(chain, header(chain))).meta().states == chain.meta.states


def test_chain_delta_based_on_a_checkpoint_before_the_previous_file(chain: Chain) -> None:
    delta = craft(chain, header(chain, based_on=1))  # the file before it was written by checkpoint 2
    with pytest.raises(StateRestoreError, match=r"the delta extends checkpoint 1, but the file before it in the "
                       r"chain was written by checkpoint 2; the deltas are out of order"):  # fmt: skip
        extended(chain, delta).meta()


@pytest.mark.parametrize(
    "change",
    [{"key_serializer": "other"}, {"key_group_hash": "other"}, {"max_parallelism": 256}],
    ids=["key-serializer", "hash", "max-parallelism"],
)
def test_chain_delta_of_another_backend(chain: Chain, change: dict[str, Any]) -> None:
    meta = dataclasses.replace(chain.meta, **change)
    delta = craft(chain, DeltaHeader(3, 2, meta).to_json_bytes())
    with pytest.raises(StateRestoreError) as caught:
        extended(chain, delta).meta()
    message = str(caught.value)
    assert "but the chain's base with" in message
    assert "the files do not belong to one chain" in message
    assert str(next(iter(change.values()))) in message


@pytest.mark.parametrize("what", ["name", "kind", "same-name-other-id"])
def test_chain_delta_that_renames_or_retypes_a_state_id(chain: Chain, what: str) -> None:
    state = chain.meta.states[0]
    if what == "name":
        states: tuple[StateMeta, ...] = (dataclasses.replace(state, name="renamed"),)
    elif what == "kind":
        states = (dataclasses.replace(state, kind=StateKind.LIST),)
    else:
        states = (dataclasses.replace(state, sid=state.sid + 1),)
    delta = craft(chain, DeltaHeader(3, 2, dataclasses.replace(chain.meta, states=states)).to_json_bytes())
    with pytest.raises(StateRestoreError) as caught:
        extended(chain, delta).meta()
    message = str(caught.value)
    assert re.search(rf"state id {states[0].sid} is '{states[0].name}' \({states[0].kind}/", message)
    assert "record another state under that id or name; the files do not belong to one chain" in message


def test_chain_checked_against_another_max_parallelism(chain: Chain) -> None:
    reader_ = extended(chain, craft(chain, header(chain)))
    with pytest.raises(MaxParallelismMismatchError, match="max_parallelism 128 but this backend has 64"):
        reader_.check_max_parallelism(64)


# --- arbitrary bytes ---------------------------------------------------------------------------------------

_SMALL = KeyGroupRange(KG, KG)
_LIMIT_S = 2.0
_LIMIT_BYTES = 8 << 20


def _bounded(call: Any) -> None:
    """Run ``call``: it returns or raises ``StateRestoreError``, within ``_LIMIT_S`` and ``_LIMIT_BYTES``."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        call()
    except StateRestoreError:
        pass
    finally:
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < _LIMIT_S, f"took {elapsed:.2f} s"
    assert peak < _LIMIT_BYTES, f"peak {peak} bytes"


_entries = st.lists(
    st.tuples(st.integers(0, 40), st.sampled_from([KG, KG + 1]), st.sampled_from([1, 2]), st.binary(max_size=24)),
    max_size=8,
)
"""(key length, key group, state id, value; 3 bytes: a tombstone) of well-framed entries."""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=512),
        st.tuples(st.integers(0, MAX_STORED_KEY_BYTES + 8), st.binary(max_size=64)).map(
            lambda t: _KEY_LEN.pack(t[0]) + _KEY_LEN.pack(KG) + b"\x00\x01" + t[1]
        ),
        _entries.map(
            lambda es: b"".join(
                entry(_KEY_LEN.pack(kg) + _KEY_LEN.pack(sid) + b"k" * max(n - 4, 0), None if len(v) == 3 else v)
                for n, kg, sid, v in es
            )
        ),
    )
)
def test_arbitrary_key_group_data_raises_only_the_typed_error(chain: Chain, data: bytes) -> None:
    assert chain.sid == 1, "the strategies draw state ids 1 (known) and 2 (unknown)"
    meta = ttl_meta(chain) if len(data) % 2 else chain.meta
    delta = craft(chain, DeltaHeader(3, 2, meta).to_json_bytes(), {KG: data}, key_groups=_SMALL)
    _bounded(lambda: list(reader(chain, delta).chunks(_SMALL)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.one_of(st.binary(max_size=256), st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**64) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["delta_format_version", "checkpoint_id", "based_on", "snapshot", "states", "x"]), inner, max_size=4),
    max_leaves=12).map(lambda doc: json.dumps(doc).encode())))  # fmt: skip
def test_arbitrary_header_bytes_raise_only_the_typed_error(chain: Chain, head: bytes) -> None:
    delta = craft(chain, head, key_groups=_SMALL)
    _bounded(lambda: reader(chain, delta).header())
