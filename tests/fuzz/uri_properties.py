"""Properties of (e) storage locations: any text through ``parse_location`` gives a location whose path
cannot leave its container, or ``InvalidURIError``."""

from __future__ import annotations

import os

from hypothesis import strategies as st

from keystate.storage import InvalidURIError
from keystate.storage.base import validate_key
from keystate.storage.uri import Location, parse_location
from tests.fuzz.harness import FuzzContext
from tests.fuzz.strategies import hostile_strings

__all__ = ["check_location", "locations"]


def check_location(ctx: FuzzContext, text: str) -> None:
    """``parse_location`` returns a location whose path cannot leave its container, or ``InvalidURIError``."""
    try:
        location = parse_location(text)
    except InvalidURIError:
        return
    assert isinstance(location, Location)
    assert location.scheme in ("file", "s3")
    path = location.path
    if path:
        assert not path.startswith("/"), path
        assert not path.endswith("/"), path
        assert all(segment not in ("", ".", "..") for segment in path.split("/")), path
        validate_key(path)
    if location.scheme == "s3":
        assert location.bucket
        assert ".." not in location.bucket
        str(location).encode("utf-8")  # what boto3 sends
    else:
        assert location.bucket == ""
        os.fsencode(str(location))  # what the filesystem is asked for


def locations(ctx: FuzzContext) -> st.SearchStrategy[str]:
    scheme = st.sampled_from(["", "/", "file://", "file:///", "FILE:///", "file://localhost/", "file://host/",
                              "s3://", "S3://", "s3:/", "s3:///", "http://", "~/", "./", "../"])  # fmt: skip
    bucket = st.sampled_from(["", "bucket", "my.bucket-1", "a..b", "B", "ab", "x" * 64, "bucket:80", "u@bucket"])
    piece = st.one_of(
        st.sampled_from(
            [
                "..",
                ".",
                "",
                "a",
                "%2e%2e",
                "%2E%2e",
                "%2F",
                "%00",
                "%ff",
                "%",
                "~",
                "?",
                "#",
                "\\",
                " ",
                "\n",
                "\x00",
                "\ud800",
                "\udcff",
                "chk-1",
                "_metadata",
            ]
        ),
        st.text(max_size=6),
    )
    path = st.lists(piece, max_size=6).map("/".join)
    built = st.tuples(scheme, bucket, path).map(lambda t: f"{t[0]}{t[1]}/{t[2]}" if t[0].endswith("//") else
                                               f"{t[0]}{t[2]}")  # fmt: skip
    return st.one_of(built, st.text(max_size=60), hostile_strings())
