"""uid -> operator ID: MurmurHash3_x64_128 (seed 0), Guava's byte order, as Flink's StreamGraphHasherV2."""

from __future__ import annotations

import pytest

from keystate.storage.format.flink import flink_operator_id, murmur3_x64_128

# Written by Flink 2.3.0: the fixtures' operators (tests/flink/fixtures/README.md) and two PyFlink maps.
FLINK_WRITTEN = [
    ("bounded-source", "e7e5d6fa1a72d1ff475985d1c410c0ef"),
    ("bounded-keyed-sum", "3dabe40e8766107282aabc02e5d43e7d"),
    ("unbounded-source", "473d8374f8f019cd4369606559819113"),
    ("unbounded-keyed-count", "21f201b45f924f2fc85ce4cebecf6144"),
    ("sink", "2e588ce1c86a9d46e2e85186773ce4fd"),
    ("bounded-map", "e8e11fe0230d367d01a589e65a0bfb5a"),
    ("unbounded-slow", "13500fd86d8faf53c8ef5d1080365939"),
]

# Computed with the reference MurmurHash3 (the mmh3 package agrees): every tail length class, one and more
# full 16-byte blocks, and multi-byte UTF-8 (2-, 3- and 4-byte characters).
COMPUTED = [
    ("", "00000000000000000000000000000000"),
    ("a", "897859f6655555855a890e51483ab5e6"),
    ("0123456789abcdef", "a7d14acf946de04bda08a7635c5bc387"),
    ("0123456789abcdefg", "def945aa2d61328eee72c306c2f40008"),
    ("Sink Committer: sink", "5abb6f104479fbc38acf37f2d04fd907"),
    ("käse-zähler", "5f0886f0ef46dfd764d862bcd87d20ae"),
    ("流-uid", "0bd69278a6f03ff66163d31932be77cb"),
    ("emoji-😀", "b5c75cf367635d62f517e7826e32c21b"),
]


@pytest.mark.parametrize(("uid", "operator_id"), FLINK_WRITTEN)
def test_operator_ids_that_flink_wrote(uid: str, operator_id: str) -> None:
    assert flink_operator_id(uid) == operator_id


@pytest.mark.parametrize(("uid", "operator_id"), COMPUTED)
def test_reference_vectors(uid: str, operator_id: str) -> None:
    assert flink_operator_id(uid) == operator_id


def test_the_hash_is_16_bytes_and_hex_is_lowercase() -> None:
    raw = murmur3_x64_128(b"bounded-source")
    assert len(raw) == 16
    assert raw.hex() == flink_operator_id("bounded-source")
    assert all(len(murmur3_x64_128(bytes(range(n)))) == 16 for n in range(40))


def test_a_lone_surrogate_hashes_as_java_encodes_it() -> None:
    """Java's ``String.getBytes(UTF_8)`` writes a lone surrogate as ``?``."""
    assert flink_operator_id("uid-\ud800") == flink_operator_id("uid-?")


def test_the_seed_changes_the_hash() -> None:
    assert murmur3_x64_128(b"sink", 1) != murmur3_x64_128(b"sink", 0)
