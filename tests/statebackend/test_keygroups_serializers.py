"""Key groups (Flink's formulas, a stable hash) and serializers (round trips, order, hostile bytes)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystate.statebackend import (
    KEY_GROUP_HASH,
    BytesSerializer,
    FloatSerializer,
    IntSerializer,
    JsonSerializer,
    KeySerializer,
    PickleSerializer,
    SerializationError,
    StrSerializer,
    assign_key_group,
    default_max_parallelism,
    key_group_range_for_subtask,
    operator_index_for_key_group,
    safe_serializer,
)
from keystate.storage import KeyGroupRange

KEYS = KeySerializer()
REPO = Path(__file__).resolve().parents[2]


def test_flink_key_group_ranges() -> None:
    assert [key_group_range_for_subtask(128, 4, i) for i in range(4)] == [
        KeyGroupRange(0, 31),
        KeyGroupRange(32, 63),
        KeyGroupRange(64, 95),
        KeyGroupRange(96, 127),
    ]
    assert [key_group_range_for_subtask(128, 3, i) for i in range(3)] == [
        KeyGroupRange(0, 42),
        KeyGroupRange(43, 85),
        KeyGroupRange(86, 127),
    ]


@pytest.mark.parametrize(("max_p", "p"), [(128, 1), (128, 5), (128, 128), (32768, 7), (32768, 1000), (1, 1)])
def test_ranges_partition_the_key_groups_and_match_the_owner(max_p: int, p: int) -> None:
    ranges = [key_group_range_for_subtask(max_p, p, i) for i in range(p)]
    assert ranges[0].start == 0
    assert ranges[-1].end == max_p - 1
    for i, (a, b) in enumerate(itertools.pairwise(ranges)):
        assert a.end + 1 == b.start, i
    for i, r in enumerate(ranges):
        assert r
        assert {operator_index_for_key_group(max_p, p, kg) for kg in (r.start, r.end)} == {i}


def test_invalid_range_arguments() -> None:
    with pytest.raises(ValueError, match="parallelism 129"):
        key_group_range_for_subtask(128, 129, 0)
    with pytest.raises(ValueError, match="subtask index 4"):
        key_group_range_for_subtask(128, 4, 4)


@pytest.mark.parametrize(
    ("p", "max_p"), [(1, 128), (85, 128), (86, 256), (170, 256), (171, 256), (172, 512), (1000, 2048), (30000, 32768)]
)
def test_default_max_parallelism(p: int, max_p: int) -> None:
    assert default_max_parallelism(p) == max_p


# Golden values: they change only with a new key-group hash, which must also change KEY_GROUP_HASH.
GOLDEN = {"0": 30, "1": 76, "'hello'": 116, "'a'": 12, "(1, 'x')": 86}
SAMPLE_KEYS: list[Any] = [0, 1, "hello", "a", (1, "x"), -7, 2**70, 1.5, b"raw", None, True, ("nested", (2, b"b"))]


def test_key_groups_are_pinned() -> None:
    assert KEY_GROUP_HASH == "xxh3-64-v1"
    for key in (0, 1, "hello", "a", (1, "x")):
        assert assign_key_group(KEYS.serialize(key), 128) == GOLDEN[repr(key)]


def test_key_groups_are_the_same_in_another_process() -> None:
    script = (
        "import json\n"
        "from keystate.statebackend import KeySerializer, assign_key_group\n"
        "from tests.statebackend.test_keygroups_serializers import SAMPLE_KEYS\n"
        "s = KeySerializer()\n"
        "print(json.dumps([[assign_key_group(s.serialize(k), m) for m in (128, 32768)] for k in SAMPLE_KEYS]))\n"
    )
    here = [[assign_key_group(KEYS.serialize(k), m) for m in (128, 32768)] for k in SAMPLE_KEYS]
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, check=True, timeout=60
        )
        assert json.loads(out.stdout) == here


# --- KeySerializer ---------------------------------------------------------------------------------

scalar_keys = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
keys = st.recursive(scalar_keys, lambda inner: st.tuples(inner) | st.tuples(inner, inner, inner), max_leaves=8)


@given(keys)
def test_key_serializer_round_trips_exactly(key: Any) -> None:
    data = KEYS.serialize(key)
    back = KEYS.deserialize(data)
    assert repr(back) == repr(key)  # repr tells 1, 1.0 and True (and 0.0 and -0.0) apart
    assert KEYS.serialize(back) == data


@given(keys, keys)
def test_key_serializer_is_injective(a: Any, b: Any) -> None:
    assert (KEYS.serialize(a) == KEYS.serialize(b)) == (repr(a) == repr(b))


def test_equal_looking_keys_are_distinct() -> None:
    looks_alike: list[Any] = [
        1,
        1.0,
        True,
        "1",
        b"1",
        (1,),
        0,
        0.0,
        -0.0,
        False,
        None,
        "",
        b"",
        (),
        2**64,
        float(2**64),
    ]
    encoded = {KEYS.serialize(k) for k in looks_alike}
    assert len(encoded) == len(looks_alike)


def _nested(depth: int) -> bytes:
    inner = KEYS.serialize(1)
    for _ in range(depth):
        inner = b"\x08" + len(inner).to_bytes(2, "big") + inner
    return inner


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x09",
        b"\xff",
        b"\x00\x00",  # trailing bytes
        b"\x03\x80\x00",  # truncated int
        b"\x04\x00",  # truncated big int length
        b"\x04\x00\x09\x01",  # big int shorter than declared
        b"\x04\x00\x01\x05",  # a big int that fits int64: serialize() never writes it
        b"\x04\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01",  # not minimal
        b"\x05\x3f\xf0",  # truncated float
        b"\x05\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
        b"\x06\xff\xfe",  # not UTF-8
        b"\x06\xed\xa0\x80",  # an encoded surrogate
        b"\x08\x00",  # truncated tuple element length
        b"\x08\x00\x05\x03",  # truncated tuple element
        b"\x08\x00\x02\x00\x00",  # element with trailing bytes
        _nested(20_000),  # nested deeper than the recursion limit
    ],
)
def test_hostile_key_bytes_are_serialization_errors(data: bytes) -> None:
    with pytest.raises(SerializationError):
        KEYS.deserialize(data)


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_any_decodable_key_bytes_are_canonical(data: bytes) -> None:
    try:
        value = KEYS.deserialize(data)
    except SerializationError:
        return
    assert KEYS.serialize(value) == data


@pytest.mark.parametrize("key", [float("nan"), [1], {"a": 1}, object(), (1, [2])])
def test_unsupported_keys_are_serialization_errors(key: Any) -> None:
    with pytest.raises(SerializationError):
        KEYS.serialize(key)


# --- value serializers -------------------------------------------------------------------------------

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(int64, int64)
def test_int_serializer_byte_order_is_numeric_order(a: int, b: int) -> None:
    s = IntSerializer()
    assert (s.serialize(a) < s.serialize(b)) == (a < b)
    assert s.deserialize(s.serialize(a)) == a


@pytest.mark.parametrize("value", [True, 2**63, -(2**63) - 1, 1.0, "1"])
def test_int_serializer_rejects(value: Any) -> None:
    with pytest.raises(SerializationError):
        IntSerializer().serialize(value)


def test_fixed_width_serializers_reject_wrong_lengths() -> None:
    for serializer in (IntSerializer(), FloatSerializer()):
        with pytest.raises(SerializationError, match="expected 8 bytes"):
            serializer.deserialize(b"\x00" * 7)


def test_float_serializer() -> None:
    s = FloatSerializer()
    for v in (0.0, -0.0, 1.5, -1e300, math.inf):
        assert repr(s.deserialize(s.serialize(v))) == repr(v)
    assert s.deserialize(s.serialize(3)) == 3.0
    with pytest.raises(SerializationError):
        s.serialize(True)


def test_json_serializer() -> None:
    s = JsonSerializer()
    assert s.serialize({"b": [1, 2.5, None], "a": "x"}) == b'{"a":"x","b":[1,2.5,null]}'
    assert s.deserialize(s.serialize({"k": [True, {"n": -1}]})) == {"k": [True, {"n": -1}]}
    for bad in (math.nan, math.inf, [-math.inf], {1j: 1}, object()):
        with pytest.raises(SerializationError):
            s.serialize(bad)
    for data in (b"NaN", b"[Infinity]", b"{", b"\xff", b"[" * 100_000):
        with pytest.raises(SerializationError):
            s.deserialize(data)


def test_str_and_bytes_serializers() -> None:
    assert StrSerializer().deserialize(StrSerializer().serialize("héllo")) == "héllo"
    with pytest.raises(SerializationError, match="UTF-8"):
        StrSerializer().deserialize(b"\xff")
    with pytest.raises(SerializationError):
        StrSerializer().serialize(b"bytes")  # type: ignore[arg-type]
    assert BytesSerializer().serialize(bytearray(b"ab")) == b"ab"
    assert BytesSerializer().serialize(memoryview(b"cd")) == b"cd"
    with pytest.raises(SerializationError):
        BytesSerializer().serialize("text")  # type: ignore[arg-type]


def test_pickle_serializer() -> None:
    s = PickleSerializer()
    assert s.deserialize(s.serialize({"a": (1, 2.0)})) == {"a": (1, 2.0)}
    with pytest.raises(SerializationError):
        s.serialize(lambda: None)
    with pytest.raises(SerializationError):
        s.deserialize(b"\x80\x05garbage")
    assert not s.safe


def test_safe_serializers_by_name() -> None:
    for name in ("bytes", "str", "int64", "float64", "json", "key-v1"):
        serializer = safe_serializer(name)
        assert serializer is not None
        assert serializer.name == name
        assert serializer.safe
    assert safe_serializer("pickle") is None
    assert safe_serializer("unknown") is None
    assert IntSerializer() == IntSerializer()
    assert IntSerializer() != StrSerializer()
    assert hash(JsonSerializer()) == hash(JsonSerializer())
