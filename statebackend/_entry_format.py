"""The bytes of a keyed-state entry as every engine stores it, and as keyed snapshots carry it unchanged.

Keys are the composite keys built by ``keystate.statebackend._states`` (``docs/format.md``, section 3.9), at
most :data:`MAX_STORED_KEY_BYTES` long. Values (``[>q last-update ms]`` only when the state has a TTL)::

    list state:   frames, each [>q last-update ms] | >I element length | element
    other states: [>q last-update ms] | serialized value    (a map state: one entry per user key)

A list is one value made of frames so that appending never reads the list (the engines merge appends).
The state objects (``_states``), the snapshot payload (``_snapshot``), the keyed backend's TTL purge
(``keyed``) and the offline reader (``inspection``) decode values with this module.
"""

from __future__ import annotations

import struct

from keystate.statebackend.errors import StateError
from keystate.statebackend.state import StateKind
from keystate.statebackend.ttl import TTL_HEADER, TtlConfig

__all__ = [
    "LIST_FRAME",
    "MAX_STORED_KEY_BYTES",
    "TTL_LIST_FRAME",
    "encode_frame",
    "split_frames",
    "split_plain",
    "ttl_filter",
]

LIST_FRAME = struct.Struct(">I")  # >I element length | element
TTL_LIST_FRAME = struct.Struct(">qI")  # >q last-update ms | >I element length | element
MAX_STORED_KEY_BYTES = 511
"""Composite keys (with namespace and map key) longer than this are rejected, in every engine: it is
LMDB's key limit, and a snapshot must restore into either engine."""


def split_frames(raw: bytes, with_ttl: bool) -> list[tuple[int, bytes]]:
    """Decode a stored list into ``(timestamp, element bytes)`` (timestamp 0 without TTL).

    Raises:
        StateError: the stored bytes are not a sequence of complete frames.
    """
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(raw)
    head = TTL_LIST_FRAME if with_ttl else LIST_FRAME
    while pos < end:
        if end - pos < head.size:
            raise StateError(f"list state value is truncated at byte {pos} of {end}")
        if with_ttl:
            ts, n = TTL_LIST_FRAME.unpack_from(raw, pos)
        else:
            ts, (n,) = 0, LIST_FRAME.unpack_from(raw, pos)
        pos += head.size
        if end - pos < n:
            raise StateError(f"list state element at byte {pos} claims {n} bytes, {end - pos} left")
        out.append((ts, raw[pos : pos + n]))
        pos += n
    return out


def split_plain(raw: bytes) -> list[bytes]:
    """The elements of a stored list without TTL (:func:`split_frames` without the timestamps).

    Raises:
        StateError: as :func:`split_frames`.
    """
    out: list[bytes] = []
    append = out.append
    unpack = LIST_FRAME.unpack_from
    pos, end = 0, len(raw)
    try:
        while pos < end:
            (n,) = unpack(raw, pos)
            pos += 4
            append(raw[pos : pos + n])
            pos += n
    except struct.error:
        raise StateError(f"list state value is truncated at byte {pos} of {end}") from None
    if pos > end:
        raise StateError(f"list state element at byte {pos - n} claims {n} bytes, {end - pos + n} left")
    return out


def encode_frame(payload: bytes, ts: int | None) -> bytes:
    """One list frame: with the last-update time ``ts`` (a state with TTL), or without (``None``)."""
    if ts is None:
        return LIST_FRAME.pack(len(payload)) + payload
    return TTL_LIST_FRAME.pack(ts, len(payload)) + payload


def ttl_filter(kind: StateKind, ttl: TtlConfig, now: int, value: bytes) -> bytes | None:
    """A stored value with its expired parts removed (``None`` if nothing is left alive).

    Used when snapshotting with ``cleanup_in_snapshot`` and by ``purge_expired``.
    """
    if kind is StateKind.LIST:
        frames = split_frames(value, True)
        live = [(ts, p) for ts, p in frames if now < ts + ttl.ttl_ms]
        if len(live) == len(frames):
            return value
        return b"".join(encode_frame(p, ts) for ts, p in live) or None
    (ts,) = TTL_HEADER.unpack_from(value)
    return value if now < ts + ttl.ttl_ms else None
