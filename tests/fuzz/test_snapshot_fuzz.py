"""(c) Keyed snapshot payloads: a real LMDB snapshot, re-encoded with damage, restored into a fresh backend
and read through ``keystate.statebackend.inspection.read_keyed_entries``."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from keystate.statebackend import KeySerializer
from keystate.tools.dump import decode_value
from tests.fuzz.cli_harness import run_cli
from tests.fuzz.harness import FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES
from tests.fuzz.snapshot_properties import check_snapshot, inject_entry, replace_meta, snapshot_checkpoint


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.target == "snapshot"], ids=lambda p: p.name)
def test_property(prop: Property, fuzz_context: FuzzContext) -> None:
    assert run_property(prop, fuzz_context) >= prop.ci_examples // 2


@pytest.mark.parametrize(
    "value", [b"1e999", b"-1e999", b"[1e400]", b'"\\ud800"', b'{"k": ["\\udfff"]}', b"[" * 990 + b"]" * 990]
)
def test_dump_shows_a_value_json_text_cannot_hold_raw(fuzz_context: FuzzContext, value: bytes) -> None:
    """Regression: ``keystate dump`` printed ``Infinity`` (not JSON), or failed with an internal error
    (``UnicodeEncodeError`` writing a lone surrogate, ``RecursionError``) on a json-serialized value
    whose bytes decode to something JSON text cannot hold."""
    check_snapshot(fuzz_context, inject_entry(fuzz_context.snapshot(), "tags", value))
    shown = decode_value(value, "json")
    assert shown["serializer"] == "json"
    assert base64.b64decode(shown["base64"]) == value
    # (nesting may already stop the JSON parser, depending on the stack depth: undecodable then)
    assert "not representable as JSON" in shown["error"] or "not valid JSON" in shown["error"]


def test_dump_shows_a_key_of_more_digits_than_python_prints_raw() -> None:
    digits = 10**5000  # key-v1 encodes any int; json.dumps refuses more than 4300 digits
    raw = KeySerializer().serialize(digits)
    assert struct.unpack_from(">H", raw, 1)[0] > 2000
    shown = decode_value(raw, "key-v1")
    assert "not representable as JSON" in shown["error"]
    assert decode_value(KeySerializer().serialize(("a", 1, 2.5)), "key-v1") == ["a", 1, 2.5]


@pytest.mark.parametrize("name", ["\ud800", "caf\udce9", ""])
def test_dump_of_a_state_whose_name_no_writer_produces(fuzz_context: FuzzContext, name: str) -> None:
    """Regression: a snapshot meta naming a state with a lone surrogate made ``keystate dump`` fail with an
    internal error (``UnicodeEncodeError`` on stdout). Such a name (or an empty one) is now rejected where the
    snapshot meta is parsed, with one line naming the field."""
    sample = fuzz_context.snapshot()
    meta = json.loads(sample.meta)
    meta["states"][0]["name"] = name  # "count"
    location = snapshot_checkpoint(fuzz_context, replace_meta(sample, json.dumps(meta).encode()))
    assert location is not None
    result = run_cli(["dump", location, "--operator", "totals"])
    assert result.code == 2, result
    assert result.out == ""
    assert "field 'name' must be" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_dump_escapes_a_state_name_with_control_characters(fuzz_context: FuzzContext) -> None:
    name = "\x1b[2J"
    sample = fuzz_context.snapshot()
    meta = json.loads(sample.meta)
    meta["states"][0]["name"] = name  # "count"
    location = snapshot_checkpoint(fuzz_context, replace_meta(sample, json.dumps(meta).encode()))
    assert location is not None
    result = run_cli(["dump", location, "--operator", "totals", "--state", name])
    assert result.code == 0, result
    assert "\x1b" not in result.out  # JSON lines escape it
    records = [json.loads(line) for line in result.out.splitlines()]
    assert records
    assert {r["state"] for r in records} == {name}
