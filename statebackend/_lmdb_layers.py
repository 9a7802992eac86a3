"""The write-back buffer layers of the LMDB engine and how reads merge them over LMDB.

A layer maps a key to its newest change: ``bytes``/``bytearray`` (the whole value), ``None`` (deleted) or
:class:`_Append` (list-state appends on top of whatever the lower layers hold). The active layer takes the
task's writes; a frozen one (:class:`Layer`) is never changed again and is readable from any thread while
the flusher writes it into LMDB.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from keystate.statebackend._kv import Columns

__all__ = [
    "MISSING",
    "Append",
    "Buffer",
    "Layer",
    "merged",
    "merged_chunks",
    "prefix_end",
    "resolve",
    "split_key_groups",
]

_KG = struct.Struct(">H")
MISSING: Any = object()
_MISSING = MISSING


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (``None``: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class Append:
    """Pending list-state appends on top of whatever the lower layers hold."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)


# A buffer maps a key to: bytes/bytearray (the full value), None (deleted), or Append.
Buffer = dict[bytes, Any]


def resolve(layers: Iterable[Buffer], key: bytes, base: Any) -> Any:
    """Apply the layers (oldest first) for ``key`` on top of ``base`` (bytes, None or _MISSING)."""
    value = base
    for layer in layers:
        v = layer.get(key, _MISSING)
        if v is _MISSING:
            continue
        if v.__class__ is Append:
            value = (b"" if value is _MISSING or value is None else bytes(value)) + bytes(v.data)
        else:
            value = v
    return value


def merged(
    cursor: Any, layers: tuple[Buffer, ...], lo: bytes, hi: bytes | None, keys: list[bytes] | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """Entries in ``[lo, hi)`` of LMDB (through ``cursor``) with ``layers`` (oldest first) applied.

    ``keys``, if given, is the sorted union of the layers' keys (a snapshot computes it once instead
    of once per key group).
    """
    if keys is None:
        overlay = sorted({k for layer in layers for k in layer if k >= lo and (hi is None or k < hi)})
    else:
        overlay = keys[bisect.bisect_left(keys, lo) : len(keys) if hi is None else bisect.bisect_left(keys, hi)]
    stored: Iterator[tuple[bytes, bytes]] = iter(())
    if cursor.set_range(lo):
        stored = cursor.iternext()
    pending = next(stored, None)
    for key in overlay:
        while pending is not None and pending[0] < key:
            if hi is not None and pending[0] >= hi:
                pending = None
                break
            yield pending
            pending = next(stored, None)
        base: Any = _MISSING
        if pending is not None and pending[0] == key:
            base = pending[1]
            pending = next(stored, None)
        value = resolve(layers, key, base)
        if value is not _MISSING and value is not None:
            yield key, bytes(value)
    while pending is not None and (hi is None or pending[0] < hi):
        yield pending
        pending = next(stored, None)


def overlay(ks: list[bytes], vs: list[bytes], layers: tuple[Buffer, ...], keys: list[bytes]) -> Columns:
    """LMDB's entries ``ks``/``vs`` with ``layers`` applied for ``keys`` (sorted: every key of the layers in
    the chunk's key range). Few keys: in place, by bisection; many: through a dict and one sort."""
    if len(keys) * 8 > len(ks):
        merged = dict(zip(ks, vs, strict=True))
        for key in keys:
            value = resolve(layers, key, merged.get(key, _MISSING))
            if value is _MISSING or value is None:
                merged.pop(key, None)
            else:
                merged[key] = bytes(value)
        ks = sorted(merged)
        return ks, list(map(merged.__getitem__, ks))
    for key in reversed(keys):  # from the end, so an insertion or deletion moves no position still to visit
        i = bisect.bisect_left(ks, key)
        found = i < len(ks) and ks[i] == key
        value = resolve(layers, key, vs[i] if found else _MISSING)
        if value is _MISSING or value is None:
            if found:
                del ks[i], vs[i]
        elif found:
            vs[i] = bytes(value)
        else:
            ks.insert(i, key)
            vs.insert(i, bytes(value))
    return ks, vs


def merged_chunks(
    cursors: tuple[Iterator[bytes], Iterator[bytes]],
    layers: tuple[Buffer, ...],
    keys: list[bytes],
    hi: bytes | None,
    size: int,
) -> Iterator[Columns]:
    """Sorted chunks of LMDB's entries below ``hi`` with ``layers`` applied. ``cursors`` iterate LMDB's
    keys and values in step (two plain iterators cost less than one of tuples); ``keys`` is the sorted
    union of the layers' keys in the same range."""
    key_iter, value_iter = cursors
    done_keys = 0
    while True:
        ks = list(islice(key_iter, size))
        vs = list(islice(value_iter, size))
        last = len(ks) < size
        if hi is not None and ks and ks[-1] >= hi:
            cut = bisect.bisect_left(ks, hi)
            del ks[cut:], vs[cut:]
            last = True
        upto = len(keys) if last else bisect.bisect_right(keys, ks[-1], done_keys)
        if upto > done_keys:
            ks, vs = overlay(ks, vs, layers, keys[done_keys:upto])
            done_keys = upto
        if len(ks) <= size:
            if ks:
                yield ks, vs
        else:  # the layers added entries: keep chunks at most `size` long
            for start in range(0, len(ks), size):
                yield ks[start : start + size], vs[start : start + size]
        if last:
            return


def split_key_groups(ks: list[bytes], vs: list[bytes]) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """``(key group, keys, values)`` runs of a sorted chunk that may span key groups."""
    start, n = 0, len(ks)
    while start < n:
        first = ks[start]
        kg = (first[0] << 8) | first[1]
        end = n if kg == 0xFFFF else bisect.bisect_left(ks, _KG.pack(kg + 1), start)
        if start == 0 and end == n:
            yield kg, ks, vs
        else:
            yield kg, ks[start:end], vs[start:end]
        start = end


class Layer:
    """A frozen layer, and what the flusher knows of it (set from the flusher's thread).

    ``txn_id`` is the id of the LMDB write transaction that writes it, set before that transaction commits
    (and cleared if it fails): a read transaction with an id at least ``txn_id`` sees the layer in LMDB, so
    the layer must not be applied on top of it again (appends would double). ``runs`` is the layer's keys as
    sorted runs (each sorted, together every key once) once the flusher has sorted them: scans bisect them.
    Runs, not one sorted list: merging them holds the GIL for one long C call (10 ms for 100,000 keys), which
    would stall the event loop as long.
    """

    __slots__ = ("data", "runs", "txn_id")

    def __init__(self, data: Buffer) -> None:
        self.data = data
        self.runs: list[list[bytes]] | None = None
        self.txn_id: int | None = None

    def visible_in(self, txn_id: int) -> bool:
        """Whether a read transaction with id ``txn_id`` sees this layer's changes in LMDB."""
        written = self.txn_id
        return written is not None and written <= txn_id

    def keys_in(self, lo: bytes, hi: bytes | None) -> list[bytes]:
        """The layer's keys in ``[lo, hi)``, in order."""
        runs = self.runs
        if runs is None:
            return sorted(k for k in self.data if k >= lo and (hi is None or k < hi))
        found: list[bytes] = []
        for run in runs:
            found += run[bisect.bisect_left(run, lo) : len(run) if hi is None else bisect.bisect_left(run, hi)]
        return found if len(runs) == 1 else sorted(found)
