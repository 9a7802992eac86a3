"""The limits of ``_metadata`` (docs/format.md section 4.2): 16 MiB and 1 048 576 objects and arrays, checked
before parsing; a writer commits nothing a reader would refuse, and inlines at most a budget of state.

The parse memory these limits bound is measured in ``test_memory_bounds.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keystate.storage import LocalObjectStore
from keystate.storage.checkpoints import METADATA_FILE, CheckpointStorage
from keystate.storage.errors import CommitFailedError, MetadataError
from keystate.storage.format import validation
from keystate.storage.format.metadata import (
    CheckpointKind,
    CheckpointMetadata,
    DistributionMode,
    HandleScope,
    OperatorState,
    OperatorStateEntry,
    OperatorStateHandle,
    StreamHandle,
    SubtaskState,
)
from keystate.storage.streams import StreamOptions

JOB = "0123456789abcdef0123456789abcdef"


def test_the_limits() -> None:
    assert validation.MAX_DOCUMENT_BYTES == 16 << 20
    assert validation.MAX_DOCUMENT_CONTAINERS == 1 << 20


def test_a_document_over_16_mib_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    data = b'{"format_version":1,"x":"' + b"a" * (16 << 20) + b'"}'
    with pytest.raises(MetadataError, match=r"over the 16777216-byte limit \(MAX_DOCUMENT_BYTES; a larger limit"):
        validation.loads_strict(data, "m")


def test_a_document_of_too_many_objects_and_arrays_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b'{"format_version":1,"x":[' + b",".join([b"[]"] * validation.MAX_DOCUMENT_CONTAINERS) + b"]}"
    with pytest.raises(MetadataError, match=r"has 1048578 '\{' and '\[' bytes, over the limit of 1048576"):
        validation.loads_strict(data, "m")
    fits = b'{"format_version":1,"x":[' + b",".join([b"[]"] * (validation.MAX_DOCUMENT_CONTAINERS - 2)) + b"]}"
    assert len(validation.loads_strict(fits, "m")["x"]) == validation.MAX_DOCUMENT_CONTAINERS - 2


@pytest.mark.parametrize("data", [b"", b" \t\r\n", b"\n"])
def test_an_empty_document_is_still_refused(data: bytes) -> None:
    with pytest.raises(MetadataError, match="document is empty"):
        validation.loads_strict(data, "m")


def test_duplicate_keys_are_still_refused() -> None:
    with pytest.raises(MetadataError, match="duplicate key 'b'"):
        validation.loads_strict(b'{"a":1,"b":{"c":2},"b":3}', "m")
    assert validation.loads_strict(b'{"a":{"b":[{"c":1}]}}', "m") == {"a": {"b": [{"c": 1}]}}


def _operator_metadata(handles: list[StreamHandle], checkpoint_id: int = 1) -> CheckpointMetadata:
    entry = OperatorStateEntry("s", DistributionMode.SPLIT, (0,), "bytes")
    subtasks = tuple(SubtaskState(i, operator=(OperatorStateHandle((entry,), h),)) for i, h in enumerate(handles))
    op = OperatorState("op", max(len(handles), 1), 128, subtasks=subtasks)
    return CheckpointMetadata(checkpoint_id, JOB, CheckpointKind.CHECKPOINT, 1, (op,))


def test_a_commit_of_metadata_no_reader_accepts_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), options=StreamOptions(inline_threshold=0))
    writer = storage.begin_checkpoint(JOB, 1)
    handles = []
    for i in range(3):
        with writer.open_stream(f"op/{i}/operator") as stream:
            stream.write(b"\x00\x00\x00\x01x")
            handles.append(stream.close())
    metadata = _operator_metadata(handles)
    monkeypatch.setattr(validation, "MAX_DOCUMENT_BYTES", 600)
    with pytest.raises(CommitFailedError, match=r"over the 600-byte limit .*nothing was written: inline less state"):
        writer.commit(metadata)
    assert not (tmp_path / JOB / "chk-1" / METADATA_FILE).exists()
    monkeypatch.setattr(validation, "MAX_DOCUMENT_BYTES", 16 << 20)
    completed = writer.commit(metadata)  # the writer is as it was: the same commit now lands
    assert storage.load(completed.directory).metadata == metadata


def test_inline_state_past_the_checkpoints_budget_is_written_as_files(tmp_path: Path) -> None:
    options = StreamOptions(inline_threshold=1000, inline_budget=100)
    storage = CheckpointStorage(LocalObjectStore(tmp_path, fsync=False), options=options)
    writer = storage.begin_checkpoint(JOB, 1)
    handles = []
    for i in range(4):
        with writer.open_stream(f"op/{i}/operator") as stream:
            stream.write(b"\x00\x00\x00\x05" + b"%05d" % i)
            handles.append(stream.close())
    assert [h.size for h in handles] == [49] * 4
    assert [h.scope for h in handles] == [HandleScope.INLINE] * 2 + [HandleScope.EXCLUSIVE] * 2
    completed = writer.commit(_operator_metadata(handles))
    for i, handle in enumerate(handles):
        assert completed.open_state(handle).read_all() == b"\x00\x00\x00\x05" + b"%05d" % i
    with pytest.raises(ValueError, match="inline_budget"):
        StreamOptions(inline_budget=-1)
    assert StreamOptions().inline_budget == 4 << 20
