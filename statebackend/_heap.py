"""The heap engine: one dict per key group, copy-on-write per key group for snapshots.

Values are immutable ``bytes``, so a snapshot only needs the dicts as they are: taking one records a
reference to every key group's dict and marks them shared; the first write to a shared key group
afterwards copies that key group's dict (a shallow copy of bytes). The snapshot therefore sees
exactly the state at the moment it was taken while processing continues, at the cost of one
key-group copy per written key group per snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from keystate.statebackend._kv import CHUNK_ENTRIES, Chunk, KVSnapshot, KVStore
from keystate.storage.format.keygroups import KeyGroupRange

__all__ = ["HeapKV"]


def _kg(key: bytes) -> int:
    return (key[0] << 8) | key[1]


class _HeapSnapshot(KVSnapshot):
    def __init__(self, maps: dict[int, dict[bytes, bytes]]) -> None:
        self._maps: dict[int, dict[bytes, bytes]] | None = maps

    def iter_key_group(self, key_group: int) -> Iterator[tuple[bytes, bytes]]:
        maps = self._maps
        if maps is None:
            raise RuntimeError("snapshot already released")
        m = maps.get(key_group)
        if m:
            yield from sorted(m.items())

    def iter_chunks(
        self, key_groups: KeyGroupRange, size: int = CHUNK_ENTRIES
    ) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
        maps = self._maps
        if maps is None:
            raise RuntimeError("snapshot already released")
        for kg in key_groups:
            m = maps.get(kg)
            if m:
                keys = sorted(m)
                values = list(map(m.__getitem__, keys))
                for start in range(0, len(keys), size):
                    yield kg, keys[start : start + size], values[start : start + size]

    def lookup(self, keys: list[bytes]) -> list[bytes | None]:
        maps = self._maps
        if maps is None:
            raise RuntimeError("snapshot already released")
        empty: dict[bytes, bytes] = {}
        return [maps.get((k[0] << 8) | k[1], empty).get(k) for k in keys]

    def release(self) -> None:
        self._maps = None


class HeapKV(KVStore):
    """Entries in plain dicts (for small state and tests)."""

    def __init__(self) -> None:
        self._maps: dict[int, dict[bytes, bytes]] = {}
        self._shared: set[int] = set()

    def _writable(self, kg: int) -> dict[bytes, bytes]:
        m = self._maps.get(kg)
        if m is None:
            m = self._maps[kg] = {}
        elif kg in self._shared:
            m = self._maps[kg] = dict(m)
            self._shared.discard(kg)
        return m

    # get and put are the hot paths of every state access: _kg is inlined and put calls _writable only
    # when the key group is new or shared with a snapshot.

    def get(self, key: bytes) -> bytes | None:
        m = self._maps.get((key[0] << 8) | key[1])
        return None if m is None else m.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        kg = (key[0] << 8) | key[1]
        m = self._maps.get(kg)
        if m is None or kg in self._shared:
            m = self._writable(kg)
        m[key] = value
        changes = self.changes
        if changes is not None:
            changes.add(key)

    def delete(self, key: bytes) -> None:
        kg = _kg(key)
        m = self._maps.get(kg)
        if m is not None and key in m:
            del self._writable(kg)[key]
            if self.changes is not None:
                self.changes.add(key)

    def append(self, key: bytes, data: bytes) -> None:
        m = self._writable(_kg(key))
        m[key] = m.get(key, b"") + data
        if self.changes is not None:
            self.changes.add(key)

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        m = self._maps.get(_kg(prefix))
        if not m:
            return []
        return sorted((k, v) for k, v in m.items() if k.startswith(prefix))

    def delete_prefix(self, prefix: bytes) -> int:
        kg = _kg(prefix)
        m = self._maps.get(kg)
        if not m:
            return 0
        doomed = [k for k in m if k.startswith(prefix)]
        if doomed:
            m = self._writable(kg)
            for k in doomed:
                del m[k]
            if self.changes is not None:
                self.changes.update(doomed)
        return len(doomed)

    def snapshot(self) -> KVSnapshot:
        self._shared = set(self._maps)
        return _HeapSnapshot(dict(self._maps))

    def bulk_load_chunks(self, chunks: Iterable[tuple[int, Chunk]]) -> int:
        n = 0
        for kg, chunk in chunks:
            self._writable(kg).update(chunk)
            n += len(chunk)
        return n

    def close(self) -> None:
        self._maps = {}
        self._shared = set()
        self.changes = None
