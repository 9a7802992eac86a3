"""With ``--json``, every command prints one JSON object on stdout also when it fails:
``{"error": {"kind", "message"}}``, next to the usual one line on stderr and the usual exit code, so that a
CI step parsing the report never finds an empty stdout. The kinds are a documented contract."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from keystate.storage import CheckpointNotFoundError, MetadataError, UnsupportedMetadataVersionError
from keystate.tools import summary
from keystate.tools.cli import ERROR_KINDS, error_kind, main
from keystate.tools.errors import UsageError
from tests.tools.conftest import JOB_ID, Cli

DOCS = Path(__file__).resolve().parents[2] / "docs"


def assert_json_error(result: Any, kind: str, *fragments: str) -> dict[str, Any]:
    assert result.code == 2, result
    assert result.err.count("\n") == 1, result.err
    assert result.err.startswith("keystate: error: "), result.err
    doc: dict[str, Any] = json.loads(result.out)
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"kind", "message"}, doc
    assert doc["error"]["kind"] == kind, doc
    assert doc["error"]["message"] in result.err, "the same message as the stderr line"
    for fragment in fragments:
        assert fragment in doc["error"]["message"], (fragment, doc)
    return doc


@pytest.mark.parametrize(
    "command",
    [["inspect", "{x}", "--json"], ["inspect", "{x}", "--verify", "--json"], ["verify", "{x}", "--json"],
     ["list", "{x}", "--json"], ["check-restore", "{x}", "--topology", "{x}", "--json"]],
    ids=lambda c: " ".join(c),
)  # fmt: skip
def test_a_missing_location_prints_the_error_object(cli: Cli, tmp_path: Path, command: list[str]) -> None:
    missing = str(tmp_path / "nope")
    assert_json_error(cli(*[a.format(x=missing) for a in command]), "checkpoint_not_found", "nope")


def test_without_json_stdout_stays_empty_on_errors(cli: Cli, tmp_path: Path) -> None:
    result = cli("check-restore", str(tmp_path / "nope"), "--topology", "t.json")
    assert (result.code, result.out) == (2, "")


def test_check_restore_json_errors_name_their_kind(cli: Cli, golden_copy: Path, tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_bytes(b'{"format_version": 1, "operators": [], "extra": 1}')
    assert_json_error(cli("check-restore", str(golden_copy), "--topology", str(bad), "--json"), "topology", "extra")
    missing = str(tmp_path / "none.json")
    assert_json_error(cli("check-restore", str(golden_copy), "--topology", missing, "--json"), "usage", "cannot read")
    assert_json_error(cli("check-restore", str(golden_copy), "--job", "nocolon", "--json"), "usage")
    metadata = golden_copy / JOB_ID / "chk-7" / "_metadata"
    metadata.write_bytes(b'{"format_version": 1, "checkpoint_id": 7')
    assert_json_error(cli("check-restore", str(golden_copy / JOB_ID / "chk-7"), "--topology", str(bad), "--json"),
                      "metadata", "not valid JSON")  # fmt: skip
    metadata.write_bytes(b'{"format_version": 99}')
    assert_json_error(cli("inspect", str(metadata), "--json"), "unsupported_format_version", "99")


def test_an_internal_error_prints_the_error_object(
    cli: Cli, golden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(summary, "inspect_checkpoint", boom)
    result = cli("inspect", str(golden_root), "--json")
    assert result.code == 2
    assert "internal error" in result.err
    assert json.loads(result.out) == {"error": {"kind": "internal", "message": "RuntimeError: a bug"}}


@pytest.mark.parametrize(
    "argv",
    [["check-restore", "x", "--json"], ["inspect", "--json"], ["list", "--json"], ["dump", "x", "--json"],
     ["verify", "x", "--json", "--bogus"], ["nosuchcommand", "--json"], ["inspect", "x", "--graph", "png", "--js"]],
    ids=lambda a: " ".join(a),
)  # fmt: skip
def test_usage_errors_with_json_print_the_error_object(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2
    assert captured.err.count("\n") == 1, captured.err
    assert "error:" in captured.err, captured.err
    doc = json.loads(captured.out)
    assert doc["error"]["kind"] == "usage"
    assert doc["error"]["message"] in captured.err


def test_usage_errors_without_json_print_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["check-restore", "x"], ["inspect", "x", "--", "--json"], ["inspect", "x", "--operator"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert capsys.readouterr().out == "", argv


def test_error_kinds_follow_the_class_tree() -> None:
    assert error_kind(CheckpointNotFoundError("x")) == "checkpoint_not_found"
    assert error_kind(UnsupportedMetadataVersionError("_metadata", 9, (1,), "x")) == "unsupported_format_version"
    assert error_kind(UsageError("x")) == "usage"

    class NewMetadataError(MetadataError):
        """A subclass added later: reported as its nearest listed ancestor until it is listed itself."""

    assert error_kind(NewMetadataError("x")) == "metadata"
    assert error_kind(ValueError("x")) == "internal"
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", kind) for kind in ERROR_KINDS)


def test_every_error_kind_is_documented_and_every_documented_kind_exists() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    section = text.split("## Errors with `--json`", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == set(ERROR_KINDS)
