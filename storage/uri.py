"""Storage locations: a local path, a ``file:`` URI or an ``s3://bucket/prefix`` URI.

:func:`open_storage` turns a location into a :class:`~keystate.storage.checkpoints.CheckpointStorage`. The
object store is rooted at the container (the filesystem root, the bucket) and the location's path
becomes the storage *base*, so a checkpoint directory can always reach its job's ``shared/``
directory, whatever level of the layout the location names.

Anything that starts like a URI, ``<scheme>:`` with a scheme of two or more characters (RFC 3986:
a letter, then letters, digits, ``+``, ``-``, ``.``), is parsed as one and must be ``s3://`` or a
``file:`` URI; ``s3:/bucket`` is refused rather than taken for a local directory named ``s3:``. A
local path that really starts that way is written ``./name:...``.

A local location's links are resolved here, once, above the checkpoint layout: the storage root may
be a link (to a mounted volume, say). The layout segments a location may end with (a job directory,
``chk-<id>``, a savepoint directory, ``_metadata``) are kept as written, and the local store follows
no link below its root, so naming a checkpoint directly cannot route around that refusal either.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from keystate.storage._local import LocalObjectStore
from keystate.storage.base import ObjectStore, validate_key
from keystate.storage.checkpoints import CHECKPOINT_DIR, METADATA_FILE, SAVEPOINT_DIR, CheckpointStorage
from keystate.storage.errors import InvalidURIError
from keystate.storage.format.metadata import JOB_ID_PATTERN
from keystate.storage.format.statefile import ReadLimits
from keystate.storage.streams import StreamOptions

__all__ = ["Location", "open_storage", "open_store", "parse_location"]

MAX_URI = 4096
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# RFC 3986 section 3.1, two characters at least: a single letter is a drive letter, not a scheme.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
_SUPPORTED = "a local path, file:///absolute/path or s3://bucket/prefix"


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed storage location."""

    scheme: str
    """``file`` or ``s3``."""
    bucket: str
    """The S3 bucket; empty for ``file``."""
    path: str
    """The key prefix inside the container, without leading or trailing ``/``."""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.scheme == "s3" else f"/{self.path}"


def parse_location(uri: str) -> Location:
    """Parse a location string.

    Raises:
        InvalidURIError: unsupported scheme, bad bucket name, a host in a ``file://`` URI, ``..`` or
            control characters in the path.
    """
    if not isinstance(uri, str) or not uri:
        raise InvalidURIError("the storage location is empty; give a path, file:///path or s3://bucket/prefix")
    if len(uri) > MAX_URI or "\x00" in uri:
        raise InvalidURIError(f"the storage location {uri[:60]!r}... is too long or has a NUL byte")
    scheme_match = _SCHEME.match(uri)
    if scheme_match is None:
        _encodable(uri, uri)  # before expanduser, which looks '~name' up in the password database
        return _local(os.path.abspath(os.path.expanduser(uri)), uri)
    _check_scheme(uri, scheme_match.group(1))
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # e.g. "s3://[": an unbalanced IPv6 bracket in the authority
        raise InvalidURIError(f"storage location {uri!r} is not a valid URI ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidURIError(
                f"Checkpoint/savepoint path '{uri}' is not a valid file URI: host {parts.netloc!r} given; "
                "use file:///absolute/path"
            )
        if parts.query or parts.fragment:
            raise InvalidURIError(f"file URI '{uri}' has a query or fragment; give only a path")
        return _local(unquote(parts.path) or "/", uri)
    if scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise InvalidURIError(
                f"'{uri}': {bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase letters, "
                "digits, '.', '-')"
            )
        if parts.query or parts.fragment:
            raise InvalidURIError(f"S3 URI '{uri}' has a query or fragment; give s3://bucket/prefix")
        prefix = unquote(parts.path).strip("/")
        try:
            prefix.encode("utf-8")  # S3 keys are UTF-8
        except UnicodeEncodeError as exc:
            raise InvalidURIError(f"S3 URI {uri!r} is not valid UTF-8 text (lone surrogate)") from exc
        return Location("s3", bucket, _checked(prefix, uri))
    raise InvalidURIError(f"unsupported storage scheme {parts.scheme!r} in {uri!r}; use {_SUPPORTED}")


def _check_scheme(uri: str, scheme: str) -> None:
    """Refuse a URI-looking location that is not an ``s3://`` or ``file:`` URI, saying what was likely meant."""
    rest = uri[len(scheme) + 1 :]
    name = scheme.lower()
    if name == "s3" and not rest.startswith("//"):
        target = rest.lstrip("/") or "bucket/prefix"
        raise InvalidURIError(
            f"storage location {uri!r} is not a valid S3 URI: the scheme must be followed by '//' and the "
            f"bucket; did you mean s3://{target}? (supported: {_SUPPORTED})"
        )
    if name == "file" and not rest.startswith("/"):
        # RFC 8089: file:/path, file:///path and file://localhost/path; the path is always absolute.
        meant = f"file:///{rest}, or the plain path ./{rest}" if rest else "file:///absolute/path"
        raise InvalidURIError(
            f"storage location {uri!r} is not a valid file URI: its path must be absolute; did you mean "
            f"{meant}? (supported: {_SUPPORTED})"
        )
    if name not in ("s3", "file"):
        local = "" if rest.startswith("//") else f" (a local path that starts with '{scheme}:' is written ./{uri})"
        raise InvalidURIError(f"unsupported storage scheme {scheme!r} in {uri!r}; use {_SUPPORTED}{local}")


def _checked(path: str, uri: str) -> str:
    if not path:
        return ""
    try:
        return validate_key(re.sub(r"/{2,}", "/", path))
    except InvalidURIError as exc:
        raise InvalidURIError(f"'{uri}': {exc}") from exc


def _encodable(path: str, uri: str) -> None:
    """Raise unless the file system can be asked for ``path`` (a lone surrogate cannot be encoded)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise InvalidURIError(f"file location {uri!r} cannot be encoded as a file name ({exc.reason})") from exc


def _local(path: str, uri: str) -> Location:
    if not os.path.isabs(path):
        raise InvalidURIError(f"'{uri}': a file location must be an absolute path")
    _encodable(path, uri)
    written = _checked(os.path.normpath(path).strip("/"), uri)  # before the file system is asked anything
    return Location("file", "", _checked(_resolved(written).strip("/"), uri))


def _layout_depth(segments: list[str]) -> int:
    """How many trailing segments name the checkpoint layout: ``[<job>/]chk-<id>``, ``savepoint-...``
    or ``<job>``, each optionally followed by ``_metadata``."""
    end = len(segments)
    if end and segments[end - 1] == METADATA_FILE:
        end -= 1
    if end and CHECKPOINT_DIR.fullmatch(segments[end - 1]):
        end -= 1
        if end and JOB_ID_PATTERN.fullmatch(segments[end - 1]):
            end -= 1
    elif end and (SAVEPOINT_DIR.fullmatch(segments[end - 1]) or JOB_ID_PATTERN.fullmatch(segments[end - 1])):
        end -= 1
    return len(segments) - end


def _resolved(path: str) -> str:
    """``path`` (a valid key: relative to ``/``) with the links above its checkpoint layout resolved."""
    segments = path.split("/") if path else []
    head = len(segments) - _layout_depth(segments)
    return os.path.join(os.path.realpath("/" + "/".join(segments[:head])), *segments[head:])


def open_store(location: Location, *, endpoint_url: str | None = None, fsync: bool = True) -> ObjectStore:
    """The object store for a location's container (filesystem root or bucket)."""
    if location.scheme == "s3":
        # boto3 and botocore load here, when an s3:// location is opened, never for a local one.
        from keystate.storage._s3 import S3ObjectStore

        return S3ObjectStore(location.bucket, "", endpoint_url=endpoint_url)
    return LocalObjectStore("/", fsync=fsync)


def open_storage(
    uri: str,
    *,
    endpoint_url: str | None = None,
    options: StreamOptions | None = None,
    savepoint_dir: str = "savepoints",
    read_limits: ReadLimits | None = None,
) -> CheckpointStorage:
    """Checkpoint storage rooted at a location: ``"/path"``, ``"file:///path"`` or ``"s3://bucket/prefix"``.

    Args:
        uri: the location.
        endpoint_url: S3 endpoint override (else boto3's configuration and ``AWS_ENDPOINT_URL``).
        options: how state streams are written (inline threshold, compression).
        savepoint_dir: the savepoints directory under the location.
        read_limits: what a state file read from there may declare (16 MiB per block, 4 GiB per file
            by default; docs/format.md section 3.8).

    Raises:
        InvalidURIError: the location cannot be parsed.
    """
    location = parse_location(uri)
    store = open_store(location, endpoint_url=endpoint_url)
    return CheckpointStorage(
        store, location.path, options=options, savepoint_dir=savepoint_dir, read_limits=read_limits
    )
