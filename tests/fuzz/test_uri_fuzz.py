"""(e) Storage locations: arbitrary text through ``parse_location``."""

from __future__ import annotations

import pytest

from keystate.storage import InvalidURIError
from keystate.storage.uri import parse_location
from tests.fuzz.harness import FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES
from tests.fuzz.uri_properties import check_location


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.target == "uri"], ids=lambda p: p.name)
def test_property(prop: Property, fuzz_context: FuzzContext) -> None:
    assert run_property(prop, fuzz_context) >= prop.ci_examples // 2


@pytest.mark.parametrize(
    "text",
    [
        "/tmp/\ud800",
        "\ud800",
        "~\ud800",
        "~\ud800/x",
        "file:///a/\udfff/b",
        "s3://bucket/a\ud800",
        "s3://bucket/\udcff",
    ],
)
def test_a_location_no_file_name_or_key_can_hold_is_invalid(text: str) -> None:
    """Regression: a lone surrogate was accepted (or, after ``~``, made ``expanduser`` raise), and the
    first file-system call (or boto3) then raised ``UnicodeEncodeError``: an internal error in the CLI."""
    with pytest.raises(InvalidURIError, match=r"surrogate|cannot be encoded"):
        parse_location(text)


def test_undecodable_bytes_from_argv_still_name_a_file(fuzz_context: FuzzContext) -> None:
    """Python hands undecodable file-name bytes over as lone surrogates U+DC80..U+DCFF: still a path."""
    text = "/tmp/caf\udce9"
    check_location(fuzz_context, text)
    assert parse_location(text).path == "tmp/caf\udce9"
    with pytest.raises(InvalidURIError):
        parse_location("s3://bucket/caf\udce9")  # an S3 key must be UTF-8
