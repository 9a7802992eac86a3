"""Restores read state files block by block: a key group of many blocks, an entry longer than a block,
and operator state, all with bounded memory, and damage found where it is.

Key-group data is parsed as its blocks arrive, about a block at a time (``_snapshot_reader._KeyGroupData``),
holding back only an entry that continues in the next block; operator-state elements are cut out of the
blocks as they arrive (``operator_state.stream_elements``). What the restores return is checked entry by
entry, and what reading holds is measured with ``tracemalloc`` while the entries are dropped.
"""

from __future__ import annotations

import json
import random
import struct
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from keystate.statebackend._snapshot_reader import KeyedSnapshotReader
from keystate.statebackend.errors import StateRestoreError
from keystate.statebackend.inspection import read_operator_elements
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.storage import CheckpointStorage, KeyedStateHandle, KeyGroupRange
from keystate.storage.checkpoints import CompletedCheckpoint
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    DistributionMode,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    SubtaskState,
)
from tests.statebackend.support import BackendFactory, keyed_metadata, kv_contents, storage_at

JOB_ID = "c0ffee" + "0" * 26
MIB = 1 << 20
META = json.dumps(
    {
        "format_version": 1,
        "key_serializer": "key-v1",
        "key_group_hash": "xxh3-64-v1",
        "states": [
            {"id": 1, "name": "blob", "kind": "value", "serializer": "bytes", "user_key_serializer": None, "ttl": None}
        ],
    }
).encode()


def key(kg: int, n: int) -> bytes:
    """A composite key of state 1 in key group ``kg``: ``>H kg | >H sid | >H len | key | >H 0``."""
    raw = n.to_bytes(6, "big")
    return struct.pack(">HHH", kg, 1, len(raw)) + raw + b"\x00\x00"


def encode(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join(struct.pack(">H", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in entries)


FOUR = KeyGroupRange(0, 3)


def write_keyed(
    storage: CheckpointStorage, groups: dict[int, bytes], key_groups: KeyGroupRange = FOUR
) -> tuple[CompletedCheckpoint, KeyedStateHandle]:
    """A keyed state file with the raw data of each key group as given (blocks of the default 1 MiB)."""
    writer = storage.begin_checkpoint(JOB_ID, 1)
    with writer.open_stream("op/0/keyed") as stream:
        stream.write(struct.pack(">I", len(META)) + META)
        offsets = []
        for kg in key_groups:
            offsets.append(stream.start_block())
            data = groups.get(kg, b"")
            for start in range(0, len(data), 300_000):  # several writes, blocks cut across entries
                stream.write(data[start : start + 300_000])
        handle = KeyedStateHandle(key_groups, tuple(offsets), stream.close())
    return writer.commit(keyed_metadata(1, "op", 128, [handle])), handle


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    return storage_at(tmp_path)


def sample_groups() -> dict[int, list[tuple[bytes, bytes]]]:
    rng = random.Random(11)
    return {
        0: [(key(0, n), rng.randbytes(rng.randrange(0, 3000))) for n in range(3000)],  # ~4.5 MiB, variable
        1: [(key(1, n), rng.randbytes(40)) for n in range(150_000)],  # ~8 MiB, uniform
        2: [(key(2, 0), b"a"), (key(2, 1), rng.randbytes(5 * MIB)), (key(2, 2), b"b")],  # one entry of 5 blocks
        3: [],
    }


def test_key_groups_of_many_blocks_restore_entry_for_entry(
    new_backend: BackendFactory, storage: CheckpointStorage
) -> None:
    groups = sample_groups()
    completed, handle = write_keyed(storage, {kg: encode(e) for kg, e in groups.items()})
    reader = KeyedSnapshotReader(completed, handle, "op")
    assert list(reader.entries(KeyGroupRange(0, 3))) == [e for kg in range(4) for e in groups[kg]]
    chunks = list(reader.chunks(KeyGroupRange(1, 1), size=1000))
    assert all(kg == 1 and 0 < len(chunk) <= 1000 for kg, chunk in chunks)
    assert [e for _, c in chunks for e in c] == groups[1]
    backend = new_backend(map_size=64 * MIB)
    backend.restore([(completed, handle)])
    assert kv_contents(backend) == {k: v for entries in groups.values() for k, v in entries}


def test_reading_a_large_key_group_holds_a_few_blocks(storage: CheckpointStorage) -> None:
    """32 MiB of entries in one key group: the entries are dropped as they come, reading holds ~2 blocks.
    (Before, the whole key group was joined and parsed at once: over 32 MiB.)"""
    entries = [(key(0, n), bytes(200)) for n in range(32 * MIB // 220)]
    completed, handle = write_keyed(storage, {0: encode(entries)}, KeyGroupRange(0, 0))
    count = 0
    tracemalloc.start()
    try:
        for _ in KeyedSnapshotReader(completed, handle, "op").entries(KeyGroupRange(0, 0)):
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(entries)
    assert peak < 6 * MIB


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-3], "runs past the key group's data"),
        (lambda data: data + b"\x00", "entry header truncated"),
        (lambda data: data + struct.pack(">H", 3), "entry key of 3 bytes"),
        (lambda data: data + struct.pack(">H", 12) + key(1, 5)[:4], "does not fit"),
    ],
)
def test_damage_at_the_end_of_a_long_key_group_is_found_where_it_is(
    storage: CheckpointStorage, damage: Callable[[bytes], bytes], message: str
) -> None:
    data = encode([(key(0, n), bytes(100)) for n in range(40_000)])  # ~4.6 MiB
    completed, handle = write_keyed(storage, {0: damage(data)}, KeyGroupRange(0, 0))
    with pytest.raises(StateRestoreError, match=message) as info:
        list(KeyedSnapshotReader(completed, handle, "op").entries(KeyGroupRange(0, 0)))
    position = int(str(info.value).split("byte ")[1].split(" ")[0])
    assert len(data) - 130 < position <= len(damage(data)) + 6, "the position counts from the key group's start"


def test_a_bad_entry_in_the_middle_is_found_before_the_rest_is_read(storage: CheckpointStorage) -> None:
    good = encode([(key(0, n), bytes(100)) for n in range(20_000)])
    bad = struct.pack(">H", 9) + key(0, 1)[:7] + b"\x00"  # a key of 9 bytes: heads fine, shape not a key
    other = encode([(key(1, n), bytes(100)) for n in range(10)])
    completed, handle = write_keyed(storage, {0: good + bad + good, 1: other}, KeyGroupRange(0, 1))
    with pytest.raises(StateRestoreError, match="key group 0"):
        list(KeyedSnapshotReader(completed, handle, "op").entries(KeyGroupRange(0, 1)))


def test_a_carried_entry_with_a_bad_key_length_fails_at_once(storage: CheckpointStorage) -> None:
    """An entry header cut by a block boundary is checked when it is held back, not at the end."""
    data = encode([(key(0, n), bytes(100)) for n in range(10_000)])  # about 1.1 MiB: ends in block 2
    cut = MIB - (MIB % 120) + 1  # inside the entry that block 1 cuts (entries are 120 bytes)
    damaged = data[:cut] + b"\xff" + data[cut + 1 :]
    completed, handle = write_keyed(storage, {0: damaged}, KeyGroupRange(0, 0))
    with pytest.raises(StateRestoreError, match="entry key of"):
        list(KeyedSnapshotReader(completed, handle, "op").entries(KeyGroupRange(0, 0)))


def write_operator(
    storage: CheckpointStorage,
    states: dict[str, list[bytes]],
    offsets: dict[str, Sequence[int]] | None = None,
    checkpoint_id: int = 2,
) -> tuple[CompletedCheckpoint, OperatorStateHandle]:
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    entries = []
    with writer.open_stream("op/0/operator") as stream:
        for name, elements in states.items():
            positions = []
            for element in elements:
                positions.append(stream.tell())
                stream.write(struct.pack(">I", len(element)) + element)
            chosen = tuple(positions) if offsets is None else tuple(offsets[name])
            entries.append(OperatorStateEntry(name, DistributionMode.SPLIT, chosen, "bytes"))
        handle = OperatorStateHandle(tuple(entries), stream.close())
    op = OperatorState("op", 1, 128, subtasks=(SubtaskState(0, operator=(handle,)),))
    return writer.commit(CheckpointMetadata(checkpoint_id, JOB_ID, CheckpointKind.CHECKPOINT, 1, (op,))), handle


def test_operator_state_of_many_blocks_restores_element_for_element(storage: CheckpointStorage) -> None:
    rng = random.Random(3)
    states = {
        "a": [rng.randbytes(rng.randrange(0, 5000)) for _ in range(2000)],
        "b": [rng.randbytes(3 * MIB), b"", b"x"],
        "c": [],
    }
    completed, handle = write_operator(storage, states)
    backend = OperatorStateBackend("op", 0)
    backend.restore([(completed, handle)])
    assert {name: state.elements for name, state in backend._states.items()} == states
    by_state: dict[str, list[bytes]] = {}
    for element in read_operator_elements(completed, handle):
        assert element.index == len(by_state.setdefault(element.name, []))
        by_state[element.name].append(element.value)
    assert by_state == {k: v for k, v in states.items() if v}


def test_reading_operator_state_holds_the_elements_and_a_few_blocks(storage: CheckpointStorage) -> None:
    """A handle that refers to 1 element of a 32 MiB stream: reading it holds about one block."""
    completed, handle = write_operator(storage, {"s": [b"first", *[bytes(1000)] * (32 * 1024)]})
    tracemalloc.start()
    try:
        values = [e.value for e in read_operator_elements(completed, handle)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(values) == 32 * 1024 + 1
    assert peak < 32 * MIB + 32 * 1024 * 120 + 4 * MIB  # the elements themselves, and a few blocks
    completed, handle = write_operator(storage, {"s": [b"first", *[bytes(1000)] * (32 * 1024)]}, {"s": [0]}, 3)
    tracemalloc.start()
    try:
        values = [e.value for e in read_operator_elements(completed, handle)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert values == [b"first"]
    assert peak < 4 * MIB


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([0, 2], "element offset 2 lies inside the element at 0"),
        ([0, 9, 9], None),  # equal offsets name one element
        ([0, 18], "element offset 18 is beyond the 18-byte stream"),
    ],
)
def test_operator_elements_may_not_overlap(storage: CheckpointStorage, offsets: list[int], message: str | None) -> None:
    completed, handle = write_operator(storage, {"s": [b"abcde", b"fghij"]}, {"s": offsets})
    backend = OperatorStateBackend("op", 0)
    if message is None:
        backend.restore([(completed, handle)])
        assert backend._states["s"].elements == [b"abcde", b"fghij", b"fghij"]
        return
    with pytest.raises(StateRestoreError, match=message):
        backend.restore([(completed, handle)])
