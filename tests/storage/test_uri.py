"""Storage locations: paths, ``file://`` and ``s3://`` URIs, and what is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    InvalidURIError,
    LocalObjectStore,
    Location,
    S3ObjectStore,
    UnsafeLinkError,
    open_storage,
    parse_location,
)
from keystate.storage.uri import open_store
from tests.conftest import BUCKET

JOB = "abcdef0123456789abcdef0123456789"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/var/ckpt", Location("file", "", "var/ckpt")),
        ("/var/ckpt/", Location("file", "", "var/ckpt")),
        ("/var//ckpt/./x/../y", Location("file", "", "var/ckpt/y")),
        ("/", Location("file", "", "")),
        ("file:///var/ckpt", Location("file", "", "var/ckpt")),
        ("file:///var/ckpt/", Location("file", "", "var/ckpt")),
        ("FILE:///var/ckpt", Location("file", "", "var/ckpt")),
        ("file://localhost/var/ckpt", Location("file", "", "var/ckpt")),
        ("file:///", Location("file", "", "")),
        ("file:///with%20space/%C3%BC", Location("file", "", "with space/ü")),
        ("file:/var/ckpt", Location("file", "", "var/ckpt")),  # RFC 8089: no authority at all
        ("FILE:/var/ckpt/", Location("file", "", "var/ckpt")),
        ("file:/", Location("file", "", "")),
        ("/var/s3:/x", Location("file", "", "var/s3:/x")),  # a scheme only counts at the start
        ("s3://bucket", Location("s3", "bucket", "")),
        ("s3://bucket/", Location("s3", "bucket", "")),
        ("s3://bucket/pre/fix/", Location("s3", "bucket", "pre/fix")),
        ("s3://bucket//pre//fix", Location("s3", "bucket", "pre/fix")),
        ("S3://bucket/x", Location("s3", "bucket", "x")),
        ("s3://my.bucket-01/a%20b/c%2Bd", Location("s3", "my.bucket-01", "a b/c+d")),
        ("s3://" + "b" * 63 + "/x", Location("s3", "b" * 63, "x")),
        ("s3://abc/x", Location("s3", "abc", "x")),
    ],
)
def test_valid_locations(uri: str, expected: Location) -> None:
    assert parse_location(uri) == expected


def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_location("ckpt") == Location("file", "", str(tmp_path / "ckpt").strip("/"))
    assert parse_location("./a/b") == Location("file", "", str(tmp_path / "a" / "b").strip("/"))
    assert parse_location("a/../b") == Location("file", "", str(tmp_path / "b").strip("/"))


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_location("~/ckpt") == Location("file", "", str(tmp_path / "ckpt").strip("/"))


def test_location_str() -> None:
    assert str(parse_location("s3://bucket/pre/fix")) == "s3://bucket/pre/fix"
    assert str(parse_location("file:///var/ckpt")) == "/var/ckpt"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("/var/\x00ckpt", "NUL"),
        ("s3://bucket/\x00", "NUL"),
        ("/" + "x" * 5000, "too long"),
        ("s3://bucket/" + "x" * 5000, "too long"),
        ("file://otherhost/x", "host 'otherhost'"),
        ("file://user@localhost/x", "host"),
        ("file:///x?y=1", "query"),
        ("file:///x#frag", "query or fragment"),
        ("http://x", "unsupported storage scheme 'http'"),
        ("https://bucket.s3.amazonaws.com/x", "unsupported storage scheme 'https'"),
        ("gs://b/x", "unsupported storage scheme 'gs'"),
        ("hdfs://nn/x", "unsupported storage scheme"),
        # A scheme without its slashes was a relative path: open_storage("s3:/b/x") wrote to ./s3:/b/x.
        ("s3:/bucket/x", "did you mean s3://bucket/x?"),
        ("s3:bucket/x", "did you mean s3://bucket/x?"),
        ("S3:/bucket/x", "did you mean s3://bucket/x?"),
        ("s3:", "did you mean s3://bucket/prefix?"),
        ("gs:bucket/x", "unsupported storage scheme 'gs'"),
        ("gs:/bucket/x", "unsupported storage scheme 'gs'"),
        ("hdfs:/x", "unsupported storage scheme 'hdfs'"),
        ("ckpt:2024", "is written ./ckpt:2024"),
        ("x-1.a+b:y", "unsupported storage scheme 'x-1.a+b'"),
        ("file:x", "did you mean file:///x, or the plain path ./x?"),
        ("file:", "not a valid file URI"),
        ("s3://", "not a valid S3 bucket name"),
        ("s3:///x", "not a valid S3 bucket name"),
        ("s3://B", "not a valid S3 bucket name"),
        ("s3://Bucket/x", "not a valid S3 bucket name"),
        ("s3://ab", "not a valid S3 bucket name"),
        ("s3://" + "b" * 64, "not a valid S3 bucket name"),
        ("s3://-bucket", "not a valid S3 bucket name"),
        ("s3://bucket-", "not a valid S3 bucket name"),
        ("s3://my..bucket", "not a valid S3 bucket name"),
        ("s3://my_bucket", "not a valid S3 bucket name"),
        ("s3://bucket:9000/x", "not a valid S3 bucket name"),
        ("s3://user@bucket/x", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a/%2E%2E/b", "'..'"),
        ("s3://bucket/./a", "'.'"),
        ("s3://bucket/a\\b", "backslash"),
        ("s3://bucket/a%0Ab", "control"),
        ("s3://bucket/x?versionId=1", "query"),
        ("s3://bucket/x#y", "query or fragment"),
        ("s3://[", "not a valid URI (Invalid IPv6 URL)"),  # found by tests.fuzz.run: ValueError before
        ("file://[::1/x", "not a valid URI"),
        ("/var/a\\b", "backslash"),
        ("/var/a\x01b", "control"),
    ],
)
def test_invalid_locations(uri: str, message: str) -> None:
    with pytest.raises(InvalidURIError) as info:
        parse_location(uri)
    assert message in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("uri", ["s3:/bucket/x", "s3:bucket/x", "gs:x", "file:x", "ckpt:2024"])
def test_a_uri_looking_location_says_what_is_supported(uri: str) -> None:
    with pytest.raises(InvalidURIError) as info:
        parse_location(uri)
    message = str(info.value)
    assert repr(uri) in message
    assert "file:///absolute/path or s3://bucket/prefix" in message


def test_a_scheme_without_its_slashes_never_writes_to_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidURIError, match=r"did you mean s3://bucket/x\?"):
        open_storage("s3:/bucket/x").begin_checkpoint(JOB, 1).commit(
            CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 5, ())
        )
    assert list(tmp_path.iterdir()) == []


def test_single_letters_and_dot_slash_stay_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_location("c:ckpt") == Location("file", "", str(tmp_path / "c:ckpt").strip("/"))
    assert parse_location("./ckpt:2024") == Location("file", "", str(tmp_path / "ckpt:2024").strip("/"))
    assert parse_location("./s3:/x") == Location("file", "", str(tmp_path / "s3:" / "x").strip("/"))


def test_a_linked_storage_root_is_resolved_once_when_opened(tmp_path: Path) -> None:
    """The root may be a link (to a mounted volume, say): resolved, it is not a link below the store's root."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (tmp_path / "ckpt").symlink_to(volume, target_is_directory=True)
    metadata = CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 5, ())
    storage = open_storage(str(tmp_path / "ckpt"))
    assert storage.base == str(volume).strip("/")
    storage.begin_checkpoint(JOB, 1).commit(metadata)
    assert (volume / JOB / "chk-1" / "_metadata").is_file()
    for uri in (f"{tmp_path}/ckpt/{JOB}/chk-1", f"file://{tmp_path}/ckpt/{JOB}/chk-1/_metadata", f"{tmp_path}/ckpt"):
        assert open_storage(uri).resolve().metadata == metadata


@pytest.mark.parametrize("linked", ["job", "checkpoint"])
def test_a_location_naming_a_linked_checkpoint_or_job_directory_is_refused(tmp_path: Path, linked: str) -> None:
    """The layout at the end of a location (``<job>/chk-<id>/_metadata``) is not resolved: a linked job or
    checkpoint directory is refused as it is below the storage root, not followed (here to a decoy)."""
    metadata = CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 5, ())
    open_storage(str(tmp_path / "decoy")).begin_checkpoint(JOB, 1).commit(metadata)
    (tmp_path / "root").mkdir()
    if linked == "job":
        (tmp_path / "root" / JOB).symlink_to(tmp_path / "decoy" / JOB, target_is_directory=True)
    else:
        (tmp_path / "root" / JOB).mkdir()
        (tmp_path / "root" / JOB / "chk-1").symlink_to(tmp_path / "decoy" / JOB / "chk-1", target_is_directory=True)
    for uri in (
        f"{tmp_path}/root/{JOB}/chk-1",
        f"{tmp_path}/root/{JOB}/chk-1/_metadata",
        f"file://{tmp_path}/root/{JOB}/chk-1",
    ):
        with pytest.raises(UnsafeLinkError, match="does not follow links in checkpoint storage"):
            open_storage(uri).resolve()
    if linked == "job":
        with pytest.raises(UnsafeLinkError):
            open_storage(f"{tmp_path}/root/{JOB}").resolve()


def test_a_location_that_is_not_a_string_is_refused() -> None:
    value: Any = None
    with pytest.raises(InvalidURIError, match="empty"):
        parse_location(value)


def test_open_storage_on_a_local_path_round_trips_a_checkpoint(tmp_path: Path) -> None:
    for uri in (str(tmp_path / "ckpt"), f"file://{tmp_path}/ckpt", f"file://localhost{tmp_path}/ckpt/"):
        storage = open_storage(uri)
        assert isinstance(storage.store, LocalObjectStore)
        assert storage.base == str(tmp_path / "ckpt").strip("/")
        assert storage.location == str(tmp_path / "ckpt")
    storage = open_storage(str(tmp_path / "ckpt"))
    metadata = CheckpointMetadata(1, JOB, CheckpointKind.CHECKPOINT, 5, ())
    storage.begin_checkpoint(JOB, 1).commit(metadata)
    assert (tmp_path / "ckpt" / JOB / "chk-1" / "_metadata").is_file()
    # The same checkpoint through a URI naming the checkpoint directory itself, or its _metadata.
    for uri in (f"file://{tmp_path}/ckpt/{JOB}/chk-1", f"{tmp_path}/ckpt/{JOB}/chk-1/_metadata", f"{tmp_path}/ckpt"):
        assert open_storage(uri).resolve().metadata == metadata


def test_open_storage_on_s3(s3_client: Any) -> None:
    storage = open_storage(f"s3://{BUCKET}/team/ckpt/")
    assert isinstance(storage.store, S3ObjectStore)
    assert storage.store.bucket == BUCKET
    assert storage.base == "team/ckpt"
    assert storage.location == f"s3://{BUCKET}/team/ckpt"
    metadata = CheckpointMetadata(3, JOB, CheckpointKind.CHECKPOINT, 5, ())
    storage.begin_checkpoint(JOB, 3).commit(metadata)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == [f"team/ckpt/{JOB}/chk-3/_metadata"]
    for uri in (f"s3://{BUCKET}/team/ckpt", f"s3://{BUCKET}/team/ckpt/{JOB}", f"s3://{BUCKET}/team/ckpt/{JOB}/chk-3"):
        assert open_storage(uri).resolve().metadata == metadata


def test_open_store_roots() -> None:
    local = open_store(parse_location("/var/x"), fsync=False)
    assert isinstance(local, LocalObjectStore)
    assert local.root == Path("/")


def test_open_storage_refuses_bad_locations() -> None:
    with pytest.raises(InvalidURIError):
        open_storage("gs://bucket/x")
