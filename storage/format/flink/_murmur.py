"""uid -> Flink operator ID: MurmurHash3 x64 128 (seed 0) of the uid's UTF-8 bytes, as Guava returns it.

Flink's ``StreamGraphHasherV2.generateUserSpecifiedHash`` hashes the uid with
``Hashing.murmur3_128(0).newHasher().putString(uid, UTF_8).hash().asBytes()``; ``OperatorID`` keeps those
16 bytes in that order, and both ``toHexString()`` and ``_metadata`` use it. Guava's 16 bytes are the two
64-bit halves ``h1`` and ``h2`` of MurmurHash3_x64_128, each little-endian. Layout of the result:
``<Q h1 | <Q h2``, printed as 32 lowercase hex digits in byte order.

Pure Python: uids are short, and this runs once per operator.
"""

from __future__ import annotations

import struct

__all__ = ["flink_operator_id", "murmur3_x64_128"]

_M64 = (1 << 64) - 1
_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F
_BLOCK = struct.Struct("<QQ")  # <Q k1 | <Q k2: one 16-byte block of input, and the 16-byte result h1 | h2


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _fmix(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


def _mix_k1(k1: int) -> int:
    return (_rotl((k1 * _C1) & _M64, 31) * _C2) & _M64


def _mix_k2(k2: int) -> int:
    return (_rotl((k2 * _C2) & _M64, 33) * _C1) & _M64


def murmur3_x64_128(data: bytes, seed: int = 0) -> bytes:
    """MurmurHash3_x64_128 of ``data``: the 16 bytes ``h1, h2`` (each little-endian), as Guava's ``asBytes()``."""
    h1 = h2 = seed & _M64
    length = len(data)
    full = length - length % 16
    for k1, k2 in _BLOCK.iter_unpack(data[:full]):
        h1 ^= _mix_k1(k1)
        h1 = ((_rotl(h1, 27) + h2) * 5 + 0x52DCE729) & _M64
        h2 ^= _mix_k2(k2)
        h2 = ((_rotl(h2, 31) + h1) * 5 + 0x38495AB5) & _M64
    tail = data[full:]
    if len(tail) > 8:
        h2 ^= _mix_k2(int.from_bytes(tail[8:], "little"))
    if tail:
        h1 ^= _mix_k1(int.from_bytes(tail[:8], "little"))
    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & _M64
    h2 = (h2 + h1) & _M64
    h1 = _fmix(h1)
    h2 = _fmix(h2)
    h1 = (h1 + h2) & _M64
    h2 = (h2 + h1) & _M64
    return _BLOCK.pack(h1, h2)


def flink_operator_id(uid: str) -> str:
    """The operator ID (32 lowercase hex digits) that Flink gives an operator with this ``.uid()``.

    A lone surrogate in ``uid`` is encoded as ``?``, as Java's ``String.getBytes(UTF_8)`` does.
    """
    return murmur3_x64_128(uid.encode("utf-8", "replace")).hex()
