"""The keyed snapshot's entry encoding (``statebackend._snapshot``): the fast path for chunks whose keys and
values all have one length writes exactly the bytes of the general path, and restores entry for entry."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.statebackend import BytesSerializer, ValueStateDescriptor, _snapshot
from keystate.statebackend._snapshot import _UNIFORM_MIN, _encode, _encode_general
from keystate.storage import KeyGroupRange
from tests.statebackend.support import checkpoint_backends, make_backend, storage_at


def columns(n: int, key_len: int, value_len: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    keys = sorted(b"\x00\x00\x00\x01" + rng.randbytes(key_len - 4) for _ in range(n))
    return keys, [rng.randbytes(value_len) for _ in range(n)]


@settings(max_examples=80, deadline=None)
@given(
    n=st.sampled_from([0, 1, _UNIFORM_MIN - 1, _UNIFORM_MIN, _UNIFORM_MIN + 1, 1000, 4096]),
    key_len=st.sampled_from([8, 22, 255, 256, 300]),
    value_len=st.sampled_from([0, 1, 100, 255, 256, 70_000]),
    odd=st.sampled_from([None, "key", "value"]),
    seed=st.integers(0, 1000),
)
def test_the_uniform_path_writes_the_bytes_of_the_general_one(
    n: int, key_len: int, value_len: int, odd: str | None, seed: int
) -> None:
    keys, values = columns(n, key_len, value_len, seed)
    if odd is not None and n > 1:  # one entry of another length: the general path must take the chunk
        i = random.Random(seed).randrange(n)
        if odd == "key":
            keys[i] += b"!"
        else:
            values[i] += b"!"
    assert bytes(_encode(keys, values)) == _encode_general(keys, values)


def test_entries_that_are_not_bytes_take_the_general_path() -> None:
    keys, values = columns(_UNIFORM_MIN, 22, 10, 1)
    views = [memoryview(v) for v in values]
    assert bytes(_encode(keys, views)) == _encode_general(keys, values)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["lmdb", "heap"])
def test_uniform_chunks_restore_entry_for_entry(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    uniform = _snapshot._encode_uniform

    def spy(keys: list[bytes], values: list[bytes], kl: int, vl: int) -> bytearray:
        taken.append(len(keys))
        return uniform(keys, values, kl, vl)

    monkeypatch.setattr(_snapshot, "_encode_uniform", spy)
    rng = random.Random(5)
    state = {rng.randbytes(16): rng.randbytes(100) for _ in range(3 * _UNIFORM_MIN + 7)}
    descriptor = ValueStateDescriptor[bytes](name="v", serializer=BytesSerializer())
    source = make_backend(kind, max_parallelism=1, key_groups=KeyGroupRange(0, 0), key_serializer=BytesSerializer(),
                          map_size=16 << 20, buffer_entries=100)  # fmt: skip
    target = make_backend(kind, max_parallelism=1, key_groups=KeyGroupRange(0, 0), key_serializer=BytesSerializer(),
                          map_size=16 << 20)  # fmt: skip
    try:
        value = source.get_state(descriptor)
        for k, v in state.items():
            source.set_current_key(k)
            value.update(v)
        completed, handles = checkpoint_backends(storage_at(tmp_path), 1, [source])
        assert sum(taken) == len(state)
        handle = handles[0]
        assert handle is not None
        target.restore([(completed, handle)])
        restored = target.get_state(descriptor)
        for k, v in state.items():
            target.set_current_key(k)
            assert restored.value() == v
        assert sum(1 for _ in target.keys("v")) == len(state)
    finally:
        source.close()
        target.close()
