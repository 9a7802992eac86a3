"""``verify`` (and ``check-restore --verify``) refuse what a restore refuses: payloads whose checksums are
right but whose framing is not (entries cut short, unknown state ids, list frames running past their
value, operator-state elements past the end of their stream). Each damaged checkpoint here is written
with correct sizes and checksums, so only decoding the framing can tell."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from keystate.statebackend import HeapKeyedStateBackend, StateRestoreError, StrSerializer, key_group_range_for_subtask
from keystate.statebackend.operator_state import OperatorStateBackend
from keystate.storage import (
    CheckpointMetadata,
    CompletedCheckpoint,
    KeyedStateHandle,
    OperatorStateHandle,
    StreamOptions,
    open_storage,
)
from keystate.storage.checkpoints import CheckpointWriter
from keystate.storage.format.statefile import FILE_HEADER
from tests.tools.conftest import JOB_ID, Cli

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
HISTORY, TAGS = "history", "tags"  # the golden checkpoint's list and map states of 'totals'

KeyGroupEdit = Callable[[int, bytes, dict[str, int]], bytes]
"""(key group, its raw entries, state ids by name) -> the entries to write instead."""


def _entries(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, key, value) of every entry of one key group's data."""
    out, pos = [], 0
    while pos < len(data):
        (kl,) = _U16.unpack_from(data, pos)
        key = data[pos + 2 : pos + 2 + kl]
        (vl,) = _U32.unpack_from(data, pos + 2 + kl)
        out.append((pos, key, data[pos + 6 + kl : pos + 6 + kl + vl]))
        pos += 6 + kl + vl
    return out


def _first_of(data: bytes, sid: int) -> tuple[int, bytes, bytes]:
    return next(e for e in _entries(data) if _U16.unpack_from(e[1], 2)[0] == sid)


def rewrite(
    source: Path,
    target: Path,
    *,
    keyed: KeyGroupEdit | None = None,
    meta: Callable[[bytes], bytes] | None = None,
    operator: Callable[[bytes], bytes] | None = None,
) -> CompletedCheckpoint:
    """The golden checkpoint rewritten under ``target`` through the real state-file writer (so every size
    and checksum is right), with the raw payload of key group 0 of 'totals', its meta JSON, or the raw
    operator-state stream of 'sink' replaced."""
    original = open_storage(str(source)).resolve()
    storage = open_storage(str(target), options=StreamOptions(inline_threshold=1024))
    writer = storage.begin_checkpoint(JOB_ID, original.checkpoint_id)
    operators = []
    for op in original.metadata.operators:
        subtasks = []
        for st in op.subtasks:
            new_keyed = tuple(_rewrite_keyed(original, writer, h, keyed, meta) for h in st.keyed)
            new_operator = tuple(_rewrite_operator(original, writer, h, operator) for h in st.operator)
            subtasks.append(dataclasses.replace(st, keyed=new_keyed, operator=new_operator))
        operators.append(dataclasses.replace(op, subtasks=tuple(subtasks)))
    m = original.metadata
    return writer.commit(CheckpointMetadata(m.checkpoint_id, m.job_id, m.kind, m.timestamp, tuple(operators)))


def _rewrite_keyed(
    original: CompletedCheckpoint,
    writer: CheckpointWriter,
    handle: KeyedStateHandle,
    edit: KeyGroupEdit | None,
    edit_meta: Callable[[bytes], bytes] | None,
) -> KeyedStateHandle:
    reader = original.open_state(handle.stream)
    raw_meta = b"".join(reader.iter_range(FILE_HEADER.size, handle.offsets[0]))
    meta_json = raw_meta[4:]
    ids = {s["name"]: s["id"] for s in json.loads(meta_json)["states"]}
    if edit_meta is not None:
        meta_json = edit_meta(meta_json)
    groups = [b"".join(reader.iter_range(*handle.offset_range(kg))) for kg in handle.key_groups]
    if edit is not None:
        groups[0] = edit(handle.key_groups.start, groups[0], ids)
    with writer.open_stream("totals/0/keyed") as stream:
        stream.write(_U32.pack(len(meta_json)) + meta_json)
        marks = []
        for data in groups:
            marks.append(stream.mark_block())
            stream.write(data)
        stream_handle = stream.close()
        offsets = tuple([stream.block_offset(mark) for mark in marks])
    return KeyedStateHandle(handle.key_groups, offsets, stream_handle)


def _rewrite_operator(
    original: CompletedCheckpoint,
    writer: CheckpointWriter,
    handle: OperatorStateHandle,
    edit: Callable[[bytes], bytes] | None,
) -> OperatorStateHandle:
    data = original.open_state(handle.stream).read_all()
    if edit is not None:
        data = edit(data)
    with writer.open_stream("sink/0/operator") as stream:
        stream.write(data)
        stream_handle = stream.close()
    return OperatorStateHandle(handle.states, stream_handle)


# --- the damage: each a payload a writer never produces, with sizes and checksums intact ---------------


def cut_last_entry(kg: int, data: bytes, ids: dict[str, int]) -> bytes:
    """The key group's last entry one byte short: its value length runs past the key group's data."""
    return data[:-1]


def unknown_state_id(kg: int, data: bytes, ids: dict[str, int]) -> bytes:
    """An entry whose key names state id 999, which the snapshot's meta does not register."""
    pos, _, _ = _entries(data)[0]
    return data[: pos + 4] + _U16.pack(999) + data[pos + 6 :]


def wrong_key_group(kg: int, data: bytes, ids: dict[str, int]) -> bytes:
    """An entry whose composite key says key group kg + 1 inside key group kg's data."""
    pos, _, _ = _entries(data)[0]
    return data[: pos + 2] + _U16.pack(kg + 1) + data[pos + 4 :]


def list_frame_past_value(kg: int, data: bytes, ids: dict[str, int]) -> bytes:
    """A list-state value whose first element claims 999 bytes (the value holds far fewer)."""
    pos, key, _ = _first_of(data, ids[HISTORY])
    at = pos + 6 + len(key)
    return data[:at] + _U32.pack(999) + data[at + 4 :]


def map_key_cut_short(kg: int, data: bytes, ids: dict[str, int]) -> bytes:
    """A map entry whose composite key claims a key of 200 bytes: key, namespace and user key cut short."""
    pos, _, _ = _first_of(data, ids[TAGS])
    at = pos + 2 + 4  # >H key length | >H key group | >H state id | >H key length ...
    return data[:at] + _U16.pack(200) + data[at + 2 :]


KEYED_DAMAGE = {
    "entry-cut-short": (cut_last_entry, "runs past the key group's data"),
    "unknown-state-id": (unknown_state_id, "unknown state id 999"),
    "wrong-key-group": (wrong_key_group, "belongs to key group 1"),
    "list-frame-past-value": (list_frame_past_value, "claims 999 bytes"),
    "map-key-cut-short": (map_key_cut_short, "composite key of"),
}


@pytest.fixture
def damaged(golden_root: Path, tmp_path: Path) -> Callable[..., Path]:
    def make(**edits: object) -> Path:
        target = tmp_path / "damaged"
        rewrite(golden_root, target, **edits)  # type: ignore[arg-type]
        return target

    return make


def restore_totals(root: Path) -> None:
    checkpoint = open_storage(str(root)).resolve()
    op = checkpoint.metadata.operator("totals")
    assert op is not None
    backend = HeapKeyedStateBackend(operator_uid="totals", subtask_index=0, max_parallelism=128,
                                    key_groups=key_group_range_for_subtask(128, 2, 0),
                                    key_serializer=StrSerializer())  # fmt: skip
    try:
        backend.restore([(checkpoint, h) for st in op.subtasks for h in st.keyed])
    finally:
        backend.close()


def test_the_rewrite_itself_keeps_a_checkpoint_that_verifies_and_restores(
    cli: Cli, damaged: Callable[..., Path]
) -> None:
    root = damaged()
    result = cli("verify", str(root))
    assert result.code == 0, result
    assert "state framing" in result.out
    restore_totals(root)


@pytest.mark.parametrize("name", list(KEYED_DAMAGE))
def test_verify_fails_on_damaged_keyed_framing(cli: Cli, damaged: Callable[..., Path], name: str) -> None:
    edit, fragment = KEYED_DAMAGE[name]
    root = damaged(keyed=edit)
    result = cli("verify", str(root))
    assert result.code == 1, result
    assert "verification FAILED: 1 of 2 handles is damaged" in result.out, result.out
    [line] = [x for x in result.out.splitlines() if x.startswith("  totals[0] ")]
    assert fragment in line, line
    assert "keyed-" in line, "names the state file"
    assert re.search(r"key group 0\b.*starts at file offset \d+", line), "says where"
    doc = json.loads(cli("verify", str(root), "--json").out)
    [failure] = doc["verification"]["failures"]
    assert (failure["operator"], failure["subtask"], failure["ok"]) == ("totals", 0, False)
    assert fragment in failure["error"]


@pytest.mark.parametrize("name", ["entry-cut-short", "unknown-state-id", "wrong-key-group"])
def test_what_verify_refuses_restore_refuses(damaged: Callable[..., Path], name: str) -> None:
    """The same damage fails a restore (the decoder verify shares with it), so verify's verdict matters."""
    root = damaged(keyed=KEYED_DAMAGE[name][0])
    with pytest.raises(StateRestoreError, match=KEYED_DAMAGE[name][1]):
        restore_totals(root)


def test_verify_fails_on_damaged_snapshot_meta(cli: Cli, damaged: Callable[..., Path]) -> None:
    root = damaged(meta=lambda meta: meta[:-1])
    result = cli("verify", str(root))
    assert result.code == 1, result
    assert "(meta): not valid JSON" in result.out
    with pytest.raises(StateRestoreError):
        restore_totals(root)


def test_verify_fails_on_an_unknown_key_group_hash(cli: Cli, damaged: Callable[..., Path]) -> None:
    root = damaged(meta=lambda meta: meta.replace(b'"key_group_hash":"', b'"key_group_hash":"x-'))
    result = cli("verify", str(root), "--json")
    assert result.code == 1, result
    [failure] = json.loads(result.out)["verification"]["failures"]
    assert "key-group hash 'x-" in failure["error"]


def test_verify_fails_on_an_operator_state_element_past_the_end(cli: Cli, damaged: Callable[..., Path]) -> None:
    # The second element's length field says 999 bytes: past the end of the stream.
    root = damaged(operator=lambda data: data[: _second(data)] + _U32.pack(999) + data[_second(data) + 4 :])
    result = cli("verify", str(root))
    assert result.code == 1, result
    [line] = [x for x in result.out.splitlines() if x.startswith("  sink[0] ")]
    assert "operator state 'pending': element at offset" in line, line
    assert "claims 999 bytes" in line
    checkpoint = open_storage(str(root)).resolve()
    sink = checkpoint.metadata.operator("sink")
    assert sink is not None
    with pytest.raises(StateRestoreError, match="claims 999 bytes"):
        OperatorStateBackend("sink", 0).restore([(checkpoint, h) for st in sink.subtasks for h in st.operator])


def _second(data: bytes) -> int:
    """The offset of the second element (``>I length | element`` each) of an operator-state stream."""
    length: int = _U32.unpack_from(data)[0]
    return 4 + length


# --- check-restore --verify: the CI gate -------------------------------------------------------------


def _topology(root: Path, tmp_path: Path) -> Path:
    path = tmp_path / "topology.json"
    path.write_bytes(open_storage(str(root)).resolve().metadata.topology().to_json_bytes())
    return path


def test_check_restore_verify_passes_an_intact_checkpoint(cli: Cli, golden_root: Path, tmp_path: Path) -> None:
    topology = _topology(golden_root, tmp_path)
    result = cli("check-restore", str(golden_root), "--topology", str(topology), "--verify")
    assert result.code == 0, result
    assert result.out.startswith("compatible: checkpoint 7 at ")
    assert "verified: 2 handles" in result.out
    doc = json.loads(cli("check-restore", str(golden_root), "--topology", str(topology), "--verify", "--json").out)
    assert doc["compatible"] is True
    assert doc["verification"] == {"ok": True, "handles": 2, "bytes": doc["verification"]["bytes"], "failures": []}
    plain = json.loads(cli("check-restore", str(golden_root), "--topology", str(topology), "--json").out)
    assert "verification" not in plain, "without --verify the report is what it was"


@pytest.mark.parametrize("damage", ["corrupt-file", "missing-file", "bad-framing"])
def test_check_restore_verify_fails_the_gate_on_a_damaged_checkpoint(
    cli: Cli, golden_copy: Path, damaged: Callable[..., Path], tmp_path: Path, damage: str
) -> None:
    root = golden_copy
    chk = golden_copy / JOB_ID / "chk-7"
    if damage == "bad-framing":
        root = damaged(keyed=cut_last_entry)
    else:
        victim = next(chk.rglob("*.ksf"))
        if damage == "missing-file":
            victim.unlink()
        else:
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
    topology = _topology(root, tmp_path)
    # Without --verify the gate reads only _metadata: the rules pass (what the red team found).
    assert cli("check-restore", str(root), "--topology", str(topology)).code == 0
    result = cli("check-restore", str(root), "--topology", str(topology), "--verify")
    assert result.code == 1, result
    assert result.out.startswith("compatible: checkpoint 7 at "), "the rules alone pass"
    assert "verification FAILED: 1 of 2 handles is damaged" in result.out
    as_json = cli("check-restore", str(root), "--topology", str(topology), "--verify", "--json")
    assert as_json.code == 1
    doc = json.loads(as_json.out)
    assert doc["compatible"] is True
    inspected = json.loads(cli("inspect", str(root), "--verify", "--json").out)["verification"]
    assert doc["verification"] == inspected, "the same shape as inspect --verify --json's"
    assert doc["verification"]["ok"] is False
    assert len(doc["verification"]["failures"]) == 1
