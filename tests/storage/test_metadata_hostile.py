"""Hostile ``_metadata`` documents: every field missing, mistyped or extra, bad paths, broken invariants.

Each case expects one typed error whose message names the offending field (or the invariant), so a
user can find the broken spot in the file. The documents are mutations of the version-2 golden sample (an
incremental checkpoint: every version-1 field plus ``written_by``, ``deltas`` and ``statistics``).
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keystate.storage import CheckpointMetadata, MetadataError, UnsafePathError
from keystate.storage.format import dump_metadata, parse_metadata
from tests.storage.test_metadata import WHERE, incremental_metadata, savepoint_v2_metadata

Doc = dict[str, Any]
JsonPath = tuple[str | int, ...]


def sample_doc() -> Doc:
    doc: Doc = json.loads(dump_metadata(incremental_metadata()))
    return doc


def parse(doc: object) -> CheckpointMetadata:
    return parse_metadata(json.dumps(doc, ensure_ascii=False).encode(), WHERE)


def show(path: JsonPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def walk(node: object, path: JsonPath = ()) -> Iterator[tuple[JsonPath, object]]:
    """Every field of every object in the document, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, key), value
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, i))


def parent(doc: Doc, path: JsonPath) -> Any:
    node: Any = doc
    for p in path[:-1]:
        node = node[p]
    return node


def mutated(path: JsonPath, change: Callable[[Any, str | int], None]) -> Doc:
    doc = sample_doc()
    change(parent(doc, path), path[-1])
    return doc


def names_field(message: str, field: str | int) -> bool:
    """The message names a field as ``'field'`` (a field check) or as ``.field:`` (a JSON path)."""
    if field == "format_version":
        return "format_version" in message  # UnsupportedFormatVersionError: "... format_version '1' is not ..."
    return f"'{field}'" in message or re.search(rf"[.\s]{re.escape(str(field))}(\[\d+\])?:", message) is not None


FIELDS = [path for path, _ in walk(sample_doc())]
FIELD_IDS = [show(p) for p in FIELDS]
OPTIONAL = {"end_to_end_duration_ms"}
"""Fields a reader accepts missing (docs/format.md section 4.11); every other one is required."""
REQUIRED = [path for path in FIELDS if path[-1] not in OPTIONAL]
REQUIRED_IDS = [show(p) for p in REQUIRED]
OBJECTS = [()] + [path for path, value in walk(sample_doc()) if isinstance(value, dict)]
OBJECT_IDS = [show(p) or "<top>" for p in OBJECTS]


def test_the_walk_reaches_every_level() -> None:
    shown = set(FIELD_IDS)
    for expected in (
        "format_version",
        "properties.drain",
        "operators[0].fully_finished",
        "operators[1].inputs[0].partitioning",
        "operators[1].subtasks[0].finished",
        "operators[1].subtasks[1].operator[0].states[1].serializer",
        "operators[2].subtasks[0].keyed[0].stream.path",
        "operators[2].subtasks[2].keyed[0].stream.data",
        "operators[2].subtasks[1].keyed[0].stream.written_by",
        "operators[2].subtasks[1].keyed[0].deltas[1].stream.written_by",
        "operators[2].subtasks[1].keyed[0].deltas[0].offsets",
        "operators[2].statistics.acknowledged_subtasks",
        "operators[4].statistics",
        "statistics.duration_ms",
    ):
        assert expected in shown
    assert len(FIELDS) > 100


@pytest.mark.parametrize("path", REQUIRED, ids=REQUIRED_IDS)
def test_each_required_field_missing(path: JsonPath) -> None:
    doc = mutated(path, lambda obj, key: obj.pop(key))
    field = path[-1]
    with pytest.raises(MetadataError) as info:
        parse(doc)
    message = str(info.value)
    assert message.startswith(WHERE)
    if field == "finished":
        # Without the marker the subtask reads as a running one, which must then list its state.
        assert "required field 'keyed' is missing" in message
    else:
        assert names_field(message, field), message


def test_the_optional_fields_may_be_missing() -> None:
    optional = [path for path in FIELDS if path[-1] in OPTIONAL]
    assert optional, "the sample records an end-to-end duration"
    for path in optional:
        doc = mutated(path, lambda obj, key: obj.pop(key))
        stats = parse(doc).operators[path[1]].statistics  # type: ignore[index]
        assert stats is not None, show(path)
        assert stats.end_to_end_duration_ms is None, show(path)


def wrong_type(value: object) -> list[object]:
    if isinstance(value, bool):
        return [1, "true", None]
    if isinstance(value, int):
        return [str(value), float(value) + 0.5, True, None]
    if isinstance(value, str):
        return [7, [value], None]
    if isinstance(value, list):
        return [{"a": 1}, "[]", None]
    return [[1], "{}", 3]


@pytest.mark.parametrize("path", FIELDS, ids=FIELD_IDS)
def test_each_field_with_a_wrong_type(path: JsonPath) -> None:
    original = parent(sample_doc(), path)[path[-1]]
    for bad in wrong_type(original):

        def replace(obj: Any, key: str | int, bad: object = bad) -> None:
            obj[key] = bad

        with pytest.raises(MetadataError) as info:
            parse(mutated(path, replace))
        assert names_field(str(info.value), path[-1]), f"{bad!r}: {info.value}"


@pytest.mark.parametrize("path", OBJECTS, ids=OBJECT_IDS)
def test_unknown_extra_field_in_each_object(path: JsonPath) -> None:
    doc = sample_doc()
    target = doc if not path else parent(doc, path)[path[-1]]
    target["written_by_keystate_2"] = True
    with pytest.raises(MetadataError, match="unknown field 'written_by_keystate_2'"):
        parse(doc)


@pytest.mark.parametrize(
    "path",
    [p for p, v in walk(sample_doc()) if isinstance(v, list) and v and isinstance(v[0], dict)],
    ids=lambda p: show(p),
)
def test_list_entry_that_is_not_an_object(path: JsonPath) -> None:
    def replace(obj: Any, key: str | int) -> None:
        obj[key][0] = "oops"

    with pytest.raises(MetadataError) as info:
        parse(mutated(path, replace))
    assert f"{path[-1]}[0]" in str(info.value)


NUMERIC = [
    p for p, v in walk(sample_doc()) if isinstance(v, int) and not isinstance(v, bool) and p[-1] != "format_version"
]


@pytest.mark.parametrize("path", NUMERIC, ids=[show(p) for p in NUMERIC])
def test_negative_numbers(path: JsonPath) -> None:
    def negate(obj: Any, key: str | int) -> None:
        obj[key] = -1

    with pytest.raises(MetadataError) as info:
        parse(mutated(path, negate))
    assert names_field(str(info.value), path[-1]) or "offsets" in str(info.value), str(info.value)


# Shorthands for places in the sample document.
ORDERS = ("operators", 1)
TOTALS = ("operators", 2)
KEYED0 = (*TOTALS, "subtasks", 0, "keyed", 0)
EXCLUSIVE = (*KEYED0, "stream")
INLINE_KEYED = (*TOTALS, "subtasks", 2, "keyed", 0)
INLINE = (*INLINE_KEYED, "stream")


def at(doc: Doc, path: JsonPath) -> Any:
    node: Any = doc
    for p in path:
        node = node[p]
    return node


@pytest.mark.parametrize(
    "checksum",
    ["", "xxh3-64:", "xxh3-64:0123", "xxh3-64:0123456789ABCDEF", "crc32:0123456789abcdef", "xxh3-64:0123456789abcdefa"],
)
def test_malformed_checksum(checksum: str) -> None:
    doc = sample_doc()
    at(doc, EXCLUSIVE)["checksum"] = checksum
    with pytest.raises(MetadataError, match="field 'checksum'"):
        parse(doc)


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "a/../../b",
        "a/..",
        "./a",
        "/etc/passwd",
        "C:/x",
        "c:x",
        "a\\b",
        "..\\..\\x",
        "",
        ".hidden",
        "a/.hidden",
        "a//b",
        "a/",
        "a\x00b",
        "a\nb",
        "a/b c",
        "x" * 2000,
        "/".join(["x"] * 600),
    ],
)
@pytest.mark.parametrize("scope", ["exclusive", "shared"])
def test_unsafe_handle_paths(path: str, scope: str) -> None:
    doc = sample_doc()
    stream = at(doc, EXCLUSIVE)
    stream["scope"] = scope
    stream["path"] = path
    if scope == "shared":
        stream["written_by"] = 41  # required for a shared file in version 2
    with pytest.raises(UnsafePathError, match="field 'path'"):
        parse(doc)


def test_inline_data_that_is_not_base64() -> None:
    for bad in ("!!!!", "S1NTRg=", "S1NT RgAB", "ü" * 4):
        doc = sample_doc()
        at(doc, INLINE)["data"] = bad
        with pytest.raises(MetadataError, match="field 'data'"):
            parse(doc)


def test_inline_data_length_differs_from_size() -> None:
    doc = sample_doc()
    stream = at(doc, INLINE)
    stream["data"] = base64.b64encode(base64.b64decode(stream["data"]) + b"x").decode()
    with pytest.raises(MetadataError, match=r"holds \d+ bytes but records size \d+"):
        parse(doc)


def test_inline_handle_with_a_path_or_file_handle_with_data() -> None:
    doc = sample_doc()
    at(doc, INLINE)["path"] = "x.ksf"
    with pytest.raises(MetadataError, match="unknown field 'path'"):
        parse(doc)
    doc = sample_doc()
    at(doc, EXCLUSIVE)["data"] = ""
    with pytest.raises(MetadataError, match="unknown field 'data'"):
        parse(doc)


def invalid(change: Callable[[Doc], None], message: str, error: type[MetadataError] = MetadataError) -> None:
    doc = sample_doc()
    change(doc)
    with pytest.raises(error) as info:
        parse(doc)
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith(WHERE)


def test_keyed_offsets_must_match_the_key_group_range() -> None:
    invalid(lambda d: at(d, KEYED0)["offsets"].pop(), "has 1 offsets, expected 2")
    invalid(lambda d: at(d, KEYED0)["offsets"].append(500), "has 3 offsets, expected 2")
    invalid(lambda d: at(d, KEYED0).update(key_groups=[0, 2]), "has 2 offsets, expected 3")
    invalid(lambda d: at(d, KEYED0).update(key_groups=[1, 0]), "field 'key_groups'")
    invalid(lambda d: at(d, KEYED0).update(key_groups=[0]), "field 'key_groups'")
    invalid(lambda d: at(d, KEYED0).update(key_groups=[0, 1, 2]), "field 'key_groups'")
    invalid(lambda d: at(d, KEYED0).update(key_groups=[0, 40_000]), "field 'key_groups'")
    invalid(lambda d: at(d, KEYED0).update(key_groups=[True, 1]), "field 'key_groups'")


def test_keyed_offsets_must_increase_and_stay_inside_the_file() -> None:
    invalid(lambda d: at(d, KEYED0).update(offsets=[400, 8]), "offsets must be non-decreasing")
    invalid(lambda d: at(d, KEYED0).update(offsets=[0, 8]), "offset for key group 0 is 0")
    # The sample file is 1000 bytes: its blocks end where the 16-byte trailer starts, at 984.
    invalid(lambda d: at(d, KEYED0).update(offsets=[8, 985]), "offset for key group 1 is 985")
    invalid(lambda d: at(d, KEYED0).update(offsets=[8, 10**18]), "offset for key group 1")
    invalid(lambda d: at(d, KEYED0).update(offsets=[8, 2**63]), "field 'offsets[1]'")
    invalid(lambda d: at(d, KEYED0).update(offsets=[8, "9"]), "field 'offsets[1]'")


def test_key_group_range_beyond_max_parallelism() -> None:
    def change(d: Doc) -> None:
        at(d, KEYED0).update(key_groups=[7, 8])

    invalid(change, "key groups 7..8 exceed max_parallelism 8")


def test_operator_state_offsets_beyond_the_stream() -> None:
    entry = (*ORDERS, "subtasks", 1, "operator", 0, "states", 0)
    invalid(lambda d: at(d, entry).update(offsets=[0, 12, 49]), "offset 49 is beyond the stream's 48 raw bytes")
    invalid(lambda d: at(d, entry).update(offsets=[12, 0]), "offsets must be non-negative and non-decreasing")
    invalid(lambda d: at(d, entry).update(name=""), "non-empty name")
    invalid(lambda d: at(d, entry).update(mode="round-robin"), "field 'mode'")
    invalid(lambda d: at(d, (*entry[:-1], 1)).update(name="offsets"), "names a state twice")


def test_finished_subtasks_carry_no_state() -> None:
    finished = (*ORDERS, "subtasks", 0)
    invalid(lambda d: at(d, finished).update(keyed=[]), "unknown field 'keyed'")
    invalid(lambda d: at(d, finished).update(operator=[]), "unknown field 'operator'")
    invalid(lambda d: at(d, finished).update(finished=False), "field 'finished' may only be true")


def test_fully_finished_operator_lists_no_subtasks() -> None:
    invalid(lambda d: d["operators"][0].update(subtasks=[{"index": 0, "finished": True}]), "fully_finished")
    invalid(lambda d: d["operators"][1].update(fully_finished=True), "fully_finished but lists 2 subtasks")


def test_subtask_indices() -> None:
    subtasks = (*TOTALS, "subtasks")
    invalid(lambda d: at(d, subtasks)[2].update(index=4), "subtask index 4 is out of order or outside 0..3")
    invalid(lambda d: at(d, subtasks)[2].update(index=1), "subtask index 1")  # duplicated
    invalid(lambda d: at(d, subtasks).reverse(), "subtask index 1")  # unordered
    invalid(lambda d: at(d, subtasks)[0].update(index=40_000), "field 'index'")


def test_parallelism_bounds() -> None:
    invalid(
        lambda d: d["operators"][2].update(parallelism=9), "parallelism 9 is not smaller or equal to max parallelism 8"
    )
    invalid(lambda d: d["operators"][2].update(parallelism=0), "field 'parallelism'")
    invalid(lambda d: d["operators"][2].update(max_parallelism=0), "field 'max_parallelism'")
    invalid(lambda d: d["operators"][2].update(max_parallelism=40_000), "field 'max_parallelism'")
    invalid(lambda d: d["operators"][4].update(max_parallelism=32_769), "field 'max_parallelism'")


def test_topology_errors() -> None:
    invalid(lambda d: d["operators"][3].update(uid="totals"), "operator uid 'totals' appears twice")
    invalid(lambda d: d["operators"][3]["inputs"][0].update({"from": "nowhere"}), "unknown operator 'nowhere'")
    invalid(lambda d: d["operators"][0]["inputs"].append({"from": "sink", "partitioning": "hash"}), "cycle")
    invalid(lambda d: d["operators"][3]["inputs"].append({"from": "audit", "partitioning": "hash"}), "cycle")
    invalid(lambda d: d["operators"][3]["inputs"][0].update(partitioning="forward"), "forward input from 'totals'")
    invalid(lambda d: d["operators"][3]["inputs"][0].update(partitioning="shuffle"), "field 'partitioning'")
    invalid(lambda d: d["operators"][3].update(uid=""), "field 'uid'")
    invalid(lambda d: d["operators"][3].update(uid="a\x00b"), "field 'uid'")


def test_properties() -> None:
    invalid(lambda d: d["properties"].update(synchronous=True), "only a savepoint can be synchronous")
    invalid(lambda d: d["properties"].update(drain=True), "'drain' is only valid")
    invalid(lambda d: d.update(kind="snapshot"), "field 'kind'")


def test_a_savepoint_may_be_synchronous_with_or_without_drain() -> None:
    doc = json.loads(dump_metadata(savepoint_v2_metadata()))
    doc["properties"]["drain"] = False
    assert parse(doc).properties.synchronous
    doc["properties"]["synchronous"] = False
    assert not parse(doc).properties.synchronous


@pytest.mark.parametrize(
    "job_id",
    [
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef",
        "0123456789abcdef0123456789abcdef0",
        "g" * 32,
        "",
        " " * 32,
    ],
)
def test_job_id_must_be_32_lowercase_hex(job_id: str) -> None:
    invalid(lambda d: d.update(job_id=job_id), "field 'job_id'")


def test_huge_values_are_refused_without_echoing_them_whole() -> None:
    doc = sample_doc()
    doc["job_id"] = "x" * 1_000_000
    with pytest.raises(MetadataError, match="field 'job_id'") as info:
        parse(doc)
    assert len(str(info.value)) < 1000


def test_valid_mutations_are_accepted() -> None:
    """The mutation helpers themselves are sound: an untouched document and a legal change both parse."""
    assert parse(sample_doc()) == incremental_metadata()
    doc = sample_doc()
    at(doc, EXCLUSIVE)["path"] = "a/b_c.d=e+f~g-h/KEYED.ksf"
    assert parse(doc).operator("totals") is not None
    doc = copy.deepcopy(sample_doc())
    doc["operators"][3]["inputs"] = []
    assert parse(doc).operator("audit") is not None


STRING_FIELDS = [path for path, value in walk(sample_doc()) if isinstance(value, str)]


@pytest.mark.parametrize("path", STRING_FIELDS, ids=show)
def test_a_lone_surrogate_in_any_string_field_is_rejected(path: JsonPath) -> None:
    """JSON may escape a lone surrogate ("\\ud800"); no writer produces one and it cannot be printed or
    written as UTF-8, so the parser names the field instead of handing the string on."""

    def change(node: Any, key: str | int) -> None:
        node[key] = "x\ud800"

    doc = json.dumps(mutated(path, change)).encode()  # ensure_ascii: the surrogate as an escape
    with pytest.raises(MetadataError) as info:
        parse_metadata(doc, WHERE)
    assert WHERE in str(info.value)
