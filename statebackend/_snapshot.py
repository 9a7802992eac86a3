"""The keyed snapshot payload: backend-neutral, so LMDB state restores into the heap and vice versa.

Inside a state file (``storage.statefile``), the raw payload of a keyed snapshot is::

    >I meta length | meta (UTF-8 JSON)             -- the blocks before offsets[0]
    per key group g of the handle's range, starting at offsets[g - start] (a block boundary):
        entries, each: >H key length | key | >I value length | value

``key`` is the full composite key (it starts with ``>H g``, so every entry proves its key group) and
``value`` the stored value, exactly as the engines hold them (``statebackend._states``). The meta
JSON names the key serializer, the key-group hash, and every state: id, name, kind, serializers, TTL.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from statebackend._kv import KVSnapshot
from statebackend._states import ttl_filter
from statebackend.errors import StateRestoreError
from statebackend.state import StateKind
from statebackend.ttl import StateVisibility, TtlConfig, TtlUpdate
from storage.checkpoints import CheckpointWriter, CompletedCheckpoint
from storage.errors import StateFileError
from storage.keygroups import KeyGroupRange
from storage.metadata import KeyedStateHandle
from storage.statefile import FILE_HEADER
from storage.validation import check_keys, loads_strict, opt_int, req_bool, req_int, req_list, req_str

__all__ = ["KeyedSnapshotReader", "SnapshotMeta", "StateMeta", "write_keyed_snapshot"]

SNAPSHOT_FORMAT_VERSION = 1
_META_LEN = struct.Struct(">I")  # >I length of the meta JSON that follows
_KEY_LEN = struct.Struct(">H")  # >H composite key length | key
_VALUE_LEN = struct.Struct(">I")  # >I value length | value
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class StateMeta:
    """One registered state as recorded in a snapshot."""

    sid: int
    name: str
    kind: StateKind
    serializer: str
    user_key_serializer: str | None = None
    ttl: TtlConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.sid,
            "name": self.name,
            "kind": self.kind.value,
            "serializer": self.serializer,
            "user_key_serializer": self.user_key_serializer,
            "ttl": None if self.ttl is None else self.ttl.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: object, where: str) -> StateMeta:
        if not isinstance(raw, dict):
            raise StateRestoreError(f"{where}: a state entry must be an object")
        check_keys(
            raw, where, ("id", "name", "kind", "serializer", "user_key_serializer", "ttl"), error=StateRestoreError
        )
        sid = req_int(raw, "id", where, StateRestoreError, min_value=1, max_value=0xFFFF)
        name = req_str(raw, "name", where, StateRestoreError, max_len=1024)
        kind = StateKind(req_str(raw, "kind", where, StateRestoreError, choices=[k.value for k in StateKind]))
        serializer = req_str(raw, "serializer", where, StateRestoreError, max_len=256)
        uks = raw["user_key_serializer"]
        if uks is not None and not isinstance(uks, str):
            raise StateRestoreError(f"{where}: field 'user_key_serializer' must be a string or null")
        if (kind is StateKind.MAP) != (uks is not None):
            raise StateRestoreError(f"{where}: 'user_key_serializer' is set exactly for map states")
        ttl = None
        if raw["ttl"] is not None:
            t = raw["ttl"]
            w = f"{where}.ttl"
            if not isinstance(t, dict):
                raise StateRestoreError(f"{w}: must be an object or null")
            check_keys(t, w, ("ttl_ms", "update", "visibility", "cleanup_in_snapshot"), error=StateRestoreError)
            ttl = TtlConfig(
                req_int(t, "ttl_ms", w, StateRestoreError, min_value=1),
                TtlUpdate(req_str(t, "update", w, StateRestoreError, choices=[u.value for u in TtlUpdate])),
                StateVisibility(
                    req_str(t, "visibility", w, StateRestoreError, choices=[v.value for v in StateVisibility])
                ),
                req_bool(t, "cleanup_in_snapshot", w, StateRestoreError),
            )
        return cls(sid, name, kind, serializer, uks, ttl)


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """The meta section of a keyed snapshot."""

    key_serializer: str
    key_group_hash: str
    states: tuple[StateMeta, ...]

    def to_json_bytes(self) -> bytes:
        doc = {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "key_serializer": self.key_serializer,
            "key_group_hash": self.key_group_hash,
            "states": [s.to_dict() for s in self.states],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> SnapshotMeta:
        doc = loads_strict(data, where, StateRestoreError)
        if not isinstance(doc, dict):
            raise StateRestoreError(f"{where}: snapshot meta must be a JSON object")
        version = opt_int(doc, "format_version", where, StateRestoreError)
        if version != SNAPSHOT_FORMAT_VERSION:
            raise StateRestoreError(
                f"{where}: keyed snapshot format_version {version} is not supported (this keystate reads "
                f"{SNAPSHOT_FORMAT_VERSION}); upgrade keystate"
            )
        check_keys(
            doc, where, ("format_version", "key_serializer", "key_group_hash", "states"), error=StateRestoreError
        )
        states = tuple(
            StateMeta.from_dict(s, f"{where}: states[{i}]")
            for i, s in enumerate(req_list(doc, "states", where, StateRestoreError))
        )
        if len({s.sid for s in states}) != len(states) or len({s.name for s in states}) != len(states):
            raise StateRestoreError(f"{where}: state ids and names must be unique")
        return cls(
            req_str(doc, "key_serializer", where, StateRestoreError, max_len=256),
            req_str(doc, "key_group_hash", where, StateRestoreError, max_len=64),
            states,
        )


def write_keyed_snapshot(
    writer: CheckpointWriter,
    hint: str,
    view: KVSnapshot,
    key_groups: KeyGroupRange,
    meta: SnapshotMeta,
    now: int,
) -> KeyedStateHandle | None:
    """Stream one keyed snapshot into a state file; ``None`` (and nothing written) if it has no entries."""
    filters = {
        _KEY_LEN.pack(s.sid): s for s in meta.states if s.ttl is not None and s.ttl.cleanup_in_snapshot
    }  # keyed by the 2-byte state id as it appears in composite keys
    key_len, value_len = _KEY_LEN.pack, _VALUE_LEN.pack
    entries = 0
    with writer.open_stream(hint) as stream:
        meta_bytes = meta.to_json_bytes()
        stream.write(_META_LEN.pack(len(meta_bytes)) + meta_bytes)
        offsets: list[int] = []
        for kg in key_groups:
            offsets.append(stream.start_block())
            parts: list[bytes] = []
            size = 0
            for key, value in view.iter_key_group(kg):
                if filters:
                    state = filters.get(key[2:4])
                    if state is not None:
                        assert state.ttl is not None
                        kept = ttl_filter(state.kind, state.ttl, now, value)
                        if kept is None:
                            continue
                        value = kept
                parts.append(key_len(len(key)))
                parts.append(key)
                parts.append(value_len(len(value)))
                parts.append(value)
                size += len(key) + len(value) + 6
                entries += 1
                if size >= _CHUNK:
                    stream.write(b"".join(parts))
                    parts, size = [], 0
            if parts:
                stream.write(b"".join(parts))
        if entries == 0:
            stream.abort()
            return None
        handle = stream.close()
    return KeyedStateHandle(key_groups, tuple(offsets), handle)


class KeyedSnapshotReader:
    """Reads one keyed handle: its meta, and the entries of the key groups a backend owns."""

    def __init__(self, checkpoint: CompletedCheckpoint, handle: KeyedStateHandle, operator_uid: str) -> None:
        self._handle = handle
        self._reader = checkpoint.open_state(handle.stream)
        self._where = f"operator {operator_uid!r}: state file {self._reader.name}"
        self._meta: SnapshotMeta | None = None

    def meta(self) -> SnapshotMeta:
        if self._meta is None:
            try:
                raw = b"".join(self._reader.iter_range(FILE_HEADER.size, self._handle.offsets[0]))
            except StateFileError as exc:
                raise StateRestoreError(f"{self._where}: cannot read the snapshot meta: {exc}") from exc
            if len(raw) < _META_LEN.size:
                raise StateRestoreError(f"{self._where}: snapshot meta is truncated ({len(raw)} bytes)")
            (n,) = _META_LEN.unpack_from(raw)
            if n != len(raw) - _META_LEN.size:
                raise StateRestoreError(
                    f"{self._where}: snapshot meta declares {n} bytes but {len(raw) - _META_LEN.size} precede "
                    "the first key group; the handle's offsets do not match the file"
                )
            self._meta = SnapshotMeta.from_json_bytes(raw[_META_LEN.size :], f"{self._where} (meta)")
        return self._meta

    def entries(self, wanted: KeyGroupRange) -> Iterator[tuple[bytes, bytes]]:
        """``(composite key, value)`` of every key group in ``wanted`` ∩ the handle's range, in order.

        Raises:
            StateRestoreError: a block is damaged, or an entry is malformed or in the wrong key group.
        """
        handle = self._handle
        part = handle.key_groups.intersection(wanted)
        if not part:
            return
        sids = {_KEY_LEN.pack(s.sid) for s in self.meta().states}
        first = part.start - handle.key_groups.start
        starts = list(handle.offsets[first : first + len(part)])
        end = handle.offset_range(part.end)[1]
        kg, index = part.start, 0
        pending: list[bytes] = []
        try:
            for offset, raw in self._reader.iter_range_with_offsets(starts[0], end):
                while index + 1 < len(starts) and offset >= starts[index + 1]:
                    yield from self._parse(b"".join(pending), kg, sids)
                    pending = []
                    index += 1
                    kg += 1
                pending.append(raw)
        except StateFileError as exc:
            raise StateRestoreError(f"{self._where}: key groups {part}: {exc}") from exc
        yield from self._parse(b"".join(pending), kg, sids)

    def _parse(self, data: bytes, kg: int, sids: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
        prefix = _KEY_LEN.pack(kg)
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < _KEY_LEN.size:
                raise self._bad(kg, pos, "entry header truncated")
            (kl,) = _KEY_LEN.unpack_from(data, pos)
            pos += _KEY_LEN.size
            if kl < 4 or end - pos < kl + _VALUE_LEN.size:
                raise self._bad(kg, pos, f"entry key of {kl} bytes does not fit")
            key = data[pos : pos + kl]
            pos += kl
            if key[:2] != prefix:
                found = _KEY_LEN.unpack_from(key)[0]
                raise self._bad(kg, pos, f"entry belongs to key group {found}; the handle's offsets do not match")
            if key[2:4] not in sids:
                raise self._bad(kg, pos, f"entry of unknown state id {_KEY_LEN.unpack_from(key, 2)[0]}")
            (vl,) = _VALUE_LEN.unpack_from(data, pos)
            pos += _VALUE_LEN.size
            if end - pos < vl:
                raise self._bad(kg, pos, f"entry value of {vl} bytes runs past the key group's data")
            yield key, data[pos : pos + vl]
            pos += vl

    def _bad(self, kg: int, pos: int, what: str) -> StateRestoreError:
        return StateRestoreError(f"{self._where}: key group {kg}, byte {pos} of its data: {what}")
