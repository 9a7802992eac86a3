"""The one-pass merge of a chain (``merge_chain``) against a dict model, and the fast delta parser's
refusals (what it refuses is parsed entry by entry, which raises the typed error)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.statebackend._delta import Change, _parse_uniform, merge_chain
from keystate.statebackend._kv import Chunk

_KEYS = st.integers(0, 60).map(lambda i: b"\x00\x01\x00\x01" + i.to_bytes(4, "big"))
_KGS = st.integers(0, 3)


def _key(kg: int, raw: bytes) -> bytes:
    return kg.to_bytes(2, "big") + raw[2:]


@settings(max_examples=200, deadline=None)
@given(
    base=st.dictionaries(st.tuples(_KGS, _KEYS), st.binary(max_size=3), max_size=80),
    deltas=st.lists(
        st.dictionaries(st.tuples(_KGS, _KEYS), st.none() | st.binary(max_size=3), max_size=40), max_size=5
    ),
    chunk=st.integers(1, 9),
)
def test_the_merge_is_the_base_with_each_delta_applied_in_order(
    base: dict[tuple[int, bytes], bytes],
    deltas: list[dict[tuple[int, bytes], bytes | None]],
    chunk: int,
) -> None:
    model = {_key(kg, raw): v for (kg, raw), v in base.items()}
    for delta in deltas:
        for (kg, raw), v in delta.items():
            if v is None:
                model.pop(_key(kg, raw), None)
            else:
                model[_key(kg, raw)] = v

    def base_chunks() -> list[tuple[int, Chunk]]:
        entries = sorted((_key(kg, raw), v) for (kg, raw), v in base.items())
        out: list[tuple[int, Chunk]] = []
        for kg in range(4):
            mine = [e for e in entries if e[0][:2] == kg.to_bytes(2, "big")]
            out += [(kg, mine[i : i + chunk]) for i in range(0, len(mine), chunk)]
        return out

    def delta_chunks(delta: dict[tuple[int, bytes], bytes | None]) -> list[tuple[int, list[Change]]]:
        changes = sorted(((_key(kg, raw), v) for (kg, raw), v in delta.items()), key=lambda c: c[0])
        groups = sorted({c[0][:2] for c in changes})
        return [(int.from_bytes(g, "big"), [c for c in changes if c[0][:2] == g]) for g in groups]

    merged = list(merge_chain(iter(base_chunks()), [iter(delta_chunks(d)) for d in deltas], size=chunk))
    flat = [entry for _, part in merged for entry in part]
    assert flat == sorted(model.items())
    assert all(part for _, part in merged)  # no empty chunks
    assert [kg for kg, _ in merged] == sorted(kg for kg, _ in merged)
    assert all(entry[0][:2] == kg.to_bytes(2, "big") for kg, part in merged for entry in part)


def _entries(*pairs: tuple[bytes, bytes | None]) -> bytes:
    out = b""
    for key, value in pairs:
        out += struct.pack(">H", len(key)) + key
        out += struct.pack(">I", 0xFFFFFFFF) if value is None else struct.pack(">I", len(value)) + value
    return out


STATES = {b"\x00\x01": object()}
K1, K2 = b"\x00\x05\x00\x01" + b"aaaa", b"\x00\x05\x00\x01" + b"aaab"


def test_the_fast_parser_decodes_a_fixed_size_delta() -> None:
    assert _parse_uniform(_entries((K1, b"xy"), (K2, b"zw")), b"\x00\x05", STATES) == [(K1, b"xy"), (K2, b"zw")]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        _entries((K2, b"xy"), (K1, b"zw")),  # out of order
        _entries((K1, b"xy"), (K1, b"zw")),  # the same key twice
        _entries((K1, b"xy"), (K2, None)),  # a tombstone
        _entries((K1, b"xy"), (K2, b"zwv")),  # another value size
        _entries((b"\x00\x05\x00\x02aaaa", b"xy")),  # an unknown state
        _entries((b"\x00\x06\x00\x01aaaa", b"xy")),  # another key group
        _entries((K1, b"xy"))[:-1],  # truncated
    ],
)
def test_the_fast_parser_refuses_what_it_cannot_vouch_for(data: bytes) -> None:
    assert _parse_uniform(data, b"\x00\x05", STATES) is None  # type: ignore[arg-type]
