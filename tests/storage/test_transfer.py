"""The JSON forms of state handles and subtask states shipped between processes (``storage.format.transfer``).

A form is the object ``_metadata`` holds at that place plus ``format_version`` (and ``handle`` for a
handle), parsed by the same per-field parsers: these tests pin that the layouts agree, that a form
survives ``json.dumps`` / ``json.loads`` and holds only JSON types, and that bad input fails with a
``MetadataError`` that names the field. Forms are written in version 2 (``written_by``, ``deltas``); forms of
version 1, from a worker running an older keystate, are still read.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

import keystate.storage
import keystate.storage.format
from keystate.storage import (
    CheckpointMetadata,
    KeyedStateHandle,
    MetadataError,
    OperatorStateHandle,
    StateHandle,
    StreamHandle,
    SubtaskState,
    UnsafePathError,
    UnsupportedFormatVersionError,
    UnsupportedMetadataVersionError,
    handle_from_json,
    handle_to_json,
    subtask_state_from_json,
    subtask_state_to_json,
)
from keystate.storage.format import SUPPORTED_TRANSFER_VERSIONS, dump_metadata
from keystate.storage.format._metadata_v1 import dump_handle_v1, dump_subtask_v1
from tests.storage.test_metadata import checkpoint_metadata, incremental_metadata, savepoint_v2_metadata

PUBLIC = ["StateHandle", "handle_from_json", "handle_to_json", "subtask_state_from_json", "subtask_state_to_json"]


def all_subtasks() -> list[SubtaskState]:
    return [st for m in (incremental_metadata(), savepoint_v2_metadata()) for op in m.operators for st in op.subtasks]


def all_handles() -> list[StateHandle]:
    handles: list[StateHandle] = []
    for st in all_subtasks():
        handles.extend(st.keyed)
        handles.extend(st.operator)
        handles.extend(st.handles())
    return handles


def kinds_of(handles: list[StateHandle]) -> set[str]:
    return {handle_to_json(h)["handle"] for h in handles}


def assert_json_safe(value: object, where: str = "form") -> None:
    """Only str, int, bool, None, list and dict (with str keys), all the way down."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            assert_json_safe(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_json_safe(item, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, bool), f"{where}: {type(value).__name__}"


def shipped(form: dict[str, Any]) -> Any:
    """What the receiving process decodes."""
    return json.loads(json.dumps(form, allow_nan=False))


def keyed_form() -> dict[str, Any]:
    handle = next(h for h in all_handles() if isinstance(h, KeyedStateHandle) and h.stream.path is not None)
    return handle_to_json(handle)


# --- the public face ----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [keystate.storage, keystate.storage.format])
def test_exported_with_all(module: Any) -> None:
    for name in PUBLIC:
        assert name in module.__all__
        assert getattr(module, name) is getattr(keystate.storage.format.transfer, name)


def test_the_samples_cover_every_kind_of_handle() -> None:
    handles = all_handles()
    assert kinds_of(handles) == {"stream", "keyed", "operator"}
    scopes = {h.scope for h in handles if isinstance(h, StreamHandle)}
    assert {s.value for s in scopes} == {"inline", "exclusive", "shared"}
    assert any(st.finished for st in all_subtasks())
    assert any(isinstance(h, KeyedStateHandle) and h.deltas for h in handles)


def test_version_2_forms_carry_written_by_and_deltas() -> None:
    incremental = next(h for h in all_handles() if isinstance(h, KeyedStateHandle) and h.deltas)
    form = handle_to_json(incremental)
    assert SUPPORTED_TRANSFER_VERSIONS == (1, 2)
    assert form["format_version"] == 2
    assert form["stream"]["written_by"] == incremental.stream.written_by
    assert [d["stream"]["written_by"] for d in form["deltas"]] == [d.stream.written_by for d in incremental.deltas]
    assert handle_from_json(shipped(form), KeyedStateHandle) == incremental
    with pytest.raises(MetadataError, match=r"^worker 2: delta 1 of keyed handle .* by checkpoint 41, not after 41"):
        handle_from_json(mutate(form, "deltas.1.stream.written_by", 41), where="worker 2")
    stream_form = handle_to_json(incremental.deltas[0].stream)
    del stream_form["written_by"]
    with pytest.raises(MetadataError, match=r"required field 'written_by' is missing"):
        handle_from_json(stream_form)


def test_version_1_forms_are_still_read() -> None:
    """A worker running an older keystate ships version-1 forms: no written_by, no deltas."""
    for st in (st for op in checkpoint_metadata().operators for st in op.subtasks):
        form = {"format_version": 1, **dump_subtask_v1(st)}
        assert subtask_state_from_json(shipped(form)) == st
        for k in st.keyed:
            assert handle_from_json(shipped({"format_version": 1, **dump_handle_v1(k)})) == k
    v2_form = handle_to_json(next(h for h in all_handles() if isinstance(h, KeyedStateHandle) and h.deltas))
    with pytest.raises(MetadataError, match=r"unknown field 'deltas'"):
        handle_from_json(dict(v2_form, format_version=1))


# --- round trips --------------------------------------------------------------------------------------


def test_handles_round_trip_through_json_text() -> None:
    for handle in all_handles():
        form = handle_to_json(handle)
        assert form["format_version"] == SUPPORTED_TRANSFER_VERSIONS[-1]
        assert_json_safe(form)
        assert handle_from_json(shipped(form)) == handle
        assert handle_from_json(shipped(form), type(handle)) == handle


def test_subtask_states_round_trip_through_json_text() -> None:
    for state in all_subtasks():
        form = subtask_state_to_json(state)
        assert_json_safe(form)
        assert subtask_state_from_json(shipped(form)) == state


def test_forms_have_the_layout_of_metadata() -> None:
    """A subtask form is its ``_metadata`` entry plus ``format_version``; a keyed or operator handle form is
    its entry plus ``format_version`` and ``handle``; one layout, one parser."""
    metadata = incremental_metadata()
    doc = json.loads(dump_metadata(metadata))
    for op, op_doc in zip(metadata.operators, doc["operators"], strict=True):
        for st, st_doc in zip(op.subtasks, op_doc["subtasks"], strict=True):
            assert subtask_state_to_json(st) == {"format_version": 2, **st_doc}
            for k, k_doc in zip(st.keyed, st_doc.get("keyed", []), strict=True):
                assert handle_to_json(k) == {"format_version": 2, "handle": "keyed", **k_doc}
                assert handle_to_json(k.stream) == {"format_version": 2, "handle": "stream", **k_doc["stream"]}
            for o, o_doc in zip(st.operator, st_doc.get("operator", []), strict=True):
                assert handle_to_json(o) == {"format_version": 2, "handle": "operator", **o_doc}


def test_coordinator_builds_metadata_that_commits_the_same_bytes() -> None:
    """Subtask states shipped as JSON rebuild metadata byte-identical to the original."""
    metadata = incremental_metadata()
    rebuilt = CheckpointMetadata(
        metadata.checkpoint_id,
        metadata.job_id,
        metadata.kind,
        metadata.timestamp,
        tuple(
            type(op)(
                op.uid,
                op.parallelism,
                op.max_parallelism,
                op.inputs,
                op.fully_finished,
                tuple(subtask_state_from_json(shipped(subtask_state_to_json(st))) for st in op.subtasks),
                op.statistics,
            )
            for op in metadata.operators
        ),
        metadata.properties,
        metadata.statistics,
    )
    assert dump_metadata(rebuilt) == dump_metadata(metadata)


def test_parsing_leaves_the_input_alone() -> None:
    form = keyed_form()
    before = copy.deepcopy(form)
    handle_from_json(form)
    state_form = subtask_state_to_json(all_subtasks()[0])
    state_before = copy.deepcopy(state_form)
    subtask_state_from_json(state_form)
    assert form == before
    assert state_form == state_before


# --- bad input ----------------------------------------------------------------------------------------


def test_not_an_object() -> None:
    with pytest.raises(MetadataError, match=r"^state handle: a state handle in JSON form must be .*, found list$"):
        handle_from_json([1, 2])
    with pytest.raises(MetadataError, match=r"^subtask state: .* must be an object, found str"):
        subtask_state_from_json('{"format_version": 1}')


def test_format_version_is_required() -> None:
    form = keyed_form()
    del form["format_version"]
    with pytest.raises(MetadataError, match=r"required field 'format_version' is missing"):
        handle_from_json(form)


@pytest.mark.parametrize("version", [0, 3, 99, "1", "2", True, None, 1.0, 2.0])
def test_unknown_or_newer_versions_are_rejected(version: object) -> None:
    for form, parse in (
        (keyed_form(), handle_from_json),
        (subtask_state_to_json(all_subtasks()[0]), subtask_state_from_json),
    ):
        form["format_version"] = version
        with pytest.raises(UnsupportedMetadataVersionError) as info:
            parse(form)
        assert isinstance(info.value, UnsupportedFormatVersionError)
        assert isinstance(info.value, MetadataError)
        assert info.value.found == version
        assert info.value.supported == SUPPORTED_TRANSFER_VERSIONS


def test_a_handle_of_another_kind_than_expected() -> None:
    form = keyed_form()
    with pytest.raises(MetadataError, match=r"^state handle: field 'handle' must be one of 'operator', found 'keyed'"):
        handle_from_json(form, OperatorStateHandle)
    form["handle"] = "blob"
    with pytest.raises(MetadataError, match=r"field 'handle' must be one of 'stream', 'keyed', 'operator'"):
        handle_from_json(form)
    del form["handle"]
    with pytest.raises(MetadataError, match=r"required field 'handle' is missing"):
        handle_from_json(form)


def test_expected_must_be_a_handle_class() -> None:
    with pytest.raises(TypeError, match="expected must be"):
        handle_from_json(keyed_form(), SubtaskState)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="expected a StreamHandle"):
        handle_to_json(all_subtasks()[0])  # type: ignore[arg-type]


def mutate(form: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A copy of ``form`` with the field at a dotted path (``stream.size``, ``offsets.0``) replaced."""
    out = copy.deepcopy(form)
    *parents, last = path.split(".")
    target: Any = out
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    elif value is DELETE:
        del target[last]
    else:
        target[last] = value
    return out


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("stream.size", "12", r"^worker 1\.stream: field 'size' must be an integer, found '12'$"),
        ("stream.size", True, r"^worker 1\.stream: field 'size' must be an integer, found True$"),
        ("stream.raw_size", -1, r"^worker 1\.stream: field 'raw_size' must be an integer in 0\.\.\d+, found -1$"),
        ("stream.checksum", "md5:00", r"^worker 1\.stream: field 'checksum' must be a string matching"),
        ("stream.compression", "lz4", r"^worker 1\.stream: field 'compression' must be one of 'none', 'zstd'"),
        ("stream.scope", "global", r"^worker 1\.stream: field 'scope' must be one of"),
        ("stream.path", DELETE, r"^worker 1\.stream: required field 'path' is missing$"),
        ("stream.extra", 1, r"^worker 1\.stream: unknown field 'extra'"),
        ("offsets.0", -8, r"^worker 1: field 'offsets\[0\]' must be a non-negative integer, found -8$"),
        ("offsets", "8", r"^worker 1: field 'offsets' must be an array of integers$"),
        ("key_groups", [3, 1], r"^worker 1: field 'key_groups' must be \[start, end\]"),
        ("key_groups", [0, 99], r"^worker 1: keyed handle for key groups 0\.\.99 has 2 offsets, expected 100"),
        ("extra", None, r"^worker 1: unknown field 'extra'"),
    ],
)
def test_bad_fields_are_named(path: str, value: object, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        handle_from_json(mutate(keyed_form(), path, value), where="worker 1")


def test_unsafe_paths_are_rejected() -> None:
    for path in ("../../etc/passwd", "/abs/file.ksf", "a/./b.ksf"):
        with pytest.raises(UnsafePathError, match=r"^state handle\.stream: field 'path'"):
            handle_from_json(mutate(keyed_form(), "stream.path", path))


def test_subtask_state_invariants_and_fields() -> None:
    keyed = next(st for st in all_subtasks() if st.keyed)
    form = subtask_state_to_json(keyed)
    with pytest.raises(MetadataError, match=r"^subtask state: field 'index' must be an integer"):
        subtask_state_from_json(mutate(form, "index", "0"))
    with pytest.raises(MetadataError, match=r"^subtask state\.keyed\[0\]\.stream: field 'size' must be an integer"):
        subtask_state_from_json(mutate(form, "keyed.0.stream.size", 1.5))
    finished_with_state = dict(form, finished=True)
    with pytest.raises(MetadataError, match=r"^subtask state: unknown field 'keyed'"):
        subtask_state_from_json(finished_with_state)
    with pytest.raises(MetadataError, match=r"field 'finished' may only be true"):
        subtask_state_from_json({"format_version": 1, "index": 0, "finished": False})


def test_python_only_values_are_rejected() -> None:
    """A form that did not come through JSON (a queue, a pickle) is held to the same types."""
    form = keyed_form()
    with pytest.raises(MetadataError, match=r"field 'key_groups' must be \[start, end\]"):
        handle_from_json(dict(form, key_groups=tuple(form["key_groups"])))
    bad: dict[Any, Any] = dict(form)
    bad[7] = "x"
    bad["zzz"] = 1
    with pytest.raises(MetadataError, match=r"unknown field 7"):
        handle_from_json(bad)
