"""The state-file format: a header, independently compressed and checksummed blocks, and a trailer.

This is the byte format of every state stream, whether it lands in a file, an S3 object or inline in
``_metadata``. ``docs/format.md`` is the normative description; the structs below are the code of it.
This module describes bytes and moves none: it frames blocks (:class:`StateFileEncoder`) and decodes
and verifies a file from any :class:`ByteSource` (:class:`StateFileReader`). The writer that buffers,
cuts and compresses blocks, on helper threads if asked, is ``keystate.storage.statefile_io``.

A writer can end the current block at any time and get the file offset where the next block starts.
The keyed backends do that at each key group, so a rescaled restore reads exactly the blocks of the
key groups it needs (one range read, no full scan). Every block carries the xxh3-64 of its stored
bytes, so corruption is found and located (file and offset) even in a partial read; the trailer
records the block count and total raw length, so truncation is found too; the whole-file xxh3-64
goes into the handle in ``_metadata``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import xxhash
import zstandard

from keystate.storage.errors import ChecksumMismatchError, StateFileError, UnsupportedStateFileVersionError

__all__ = [
    "BLOCK_HEADER",
    "DEFAULT_BLOCK_SIZE",
    "END_MARKER",
    "FILE_HEADER",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_FILE_RAW",
    "MAX_RAW_BLOCK",
    "MAX_STORED_BLOCK",
    "SUPPORTED_VERSIONS",
    "TRAILER",
    "ByteReader",
    "ByteSource",
    "BytesSource",
    "Compression",
    "ReadLimits",
    "StateFileEncoder",
    "StateFileReader",
    "StateFileSummary",
    "encode_block",
    "format_checksum",
    "max_stored_block",
    "zstd_compressor",
]

MAGIC = b"KSSF"
FORMAT_VERSION = 2
"""The version a writer puts in the header of a zstd file (a file without compression is written as
version 1, which it is byte for byte: version 2 only adds raw blocks to zstd files)."""
SUPPORTED_VERSIONS = (1, 2)

# >4s magic "KSSF" | >H format version | >B compression code | >B flags (must be 0)
FILE_HEADER = struct.Struct(">4sHBB")
# >I stored length | >I raw (uncompressed) length | >Q xxh3-64 of the stored bytes
BLOCK_HEADER = struct.Struct(">IIQ")
# >I 0xFFFFFFFF end marker | >I number of blocks | >Q total raw length of all blocks
TRAILER = struct.Struct(">IIQ")
END_MARKER = 0xFFFFFFFF

DEFAULT_BLOCK_SIZE = 1 << 20
MAX_RAW_BLOCK = 16 << 20
"""The largest block a writer cuts (its ``block_size``) and, by default, the most raw bytes a reader
accepts in one block (:attr:`ReadLimits.max_block_raw`): 16 times the default block size."""
MAX_FILE_RAW = 4 << 30
"""By default, the most raw bytes a reader accepts in one state file (:attr:`ReadLimits.max_file_raw`)."""


def max_stored_block(max_raw: int) -> int:
    """The most stored bytes of a block of at most ``max_raw`` raw bytes: zstd's worst-case expansion."""
    return max_raw + (max_raw >> 7) + 1024


MAX_STORED_BLOCK = max_stored_block(MAX_RAW_BLOCK)
_LIMITS_HINT = "raise it with CheckpointStorage(..., read_limits=ReadLimits(...)) or CheckpointConfig(read_limits=...)"


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """What a reader accepts from a state file before it decodes it: the bounds on hostile input.

    Each block is decoded on its own into at most ``max_block_raw`` bytes, so memory while reading is a
    small multiple of that, however large the file; ``max_file_raw`` bounds the work (and what a caller
    that keeps everything, like :meth:`StateFileReader.read_all`, holds) for one file.

    Attributes:
        max_block_raw: the most raw bytes one block may declare (16 MiB: every block keystate's writer
            cuts fits, as its ``block_size`` is at most that). Raise it only to read files written by an
            older keystate with a ``block_size`` over 16 MiB.
        max_file_raw: the most raw bytes one state file may declare in its handle or decode to (4 GiB).
            Raise it to restore a larger state file.
    """

    max_block_raw: int = MAX_RAW_BLOCK
    max_file_raw: int = MAX_FILE_RAW

    def __post_init__(self) -> None:
        if not 0 < self.max_block_raw < END_MARKER:
            raise ValueError(f"max_block_raw must be in 1..{END_MARKER - 1}, found {self.max_block_raw}")
        if self.max_file_raw < 0:
            raise ValueError(f"max_file_raw must be >= 0, found {self.max_file_raw}")


class Compression(StrEnum):
    """How block payloads are stored. The code is the header byte."""

    NONE = "none"
    ZSTD = "zstd"

    @property
    def code(self) -> int:
        return _COMPRESSION_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Compression | None:
        for c, v in _COMPRESSION_CODES.items():
            if v == code:
                return c
        return None


_COMPRESSION_CODES = {Compression.NONE: 0, Compression.ZSTD: 1}


def format_checksum(digest: int) -> str:
    """The checksum string stored in handles: ``xxh3-64:`` and 16 lowercase hex digits."""
    return f"xxh3-64:{digest:016x}"


@dataclass(frozen=True, slots=True)
class StateFileSummary:
    """What a finished writer reports: the stored size, raw size, whole-file checksum, block count."""

    size: int
    raw_size: int
    checksum: str
    blocks: int


def zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """The compressor of zstd blocks: one frame per block that records its content size (the reader
    checks it against the block header) and no zstd checksum (the block header carries the xxh3-64)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)


def encode_block(raw: memoryview, compressor: zstandard.ZstdCompressor | None) -> tuple[bytes | memoryview, int]:
    """A block's stored bytes and their xxh3-64: the zstd frame if it is smaller than ``raw``, else ``raw``
    itself (a version-2 block whose stored length equals its raw length is stored raw)."""
    stored: bytes | memoryview = raw
    if compressor is not None:
        frame = compressor.compress(raw)
        if len(frame) < len(raw):
            stored = frame
    return stored, xxhash.xxh3_64_intdigest(stored)


class StateFileEncoder:
    """Frames one state file into ``sink``: the file header at once, then each block, then the trailer.

    It knows nothing of buffering or threads: the caller cuts and compresses blocks (see
    :func:`encode_block`) and hands them over in file order. It tracks the file position, where every
    block starts and the whole-file xxh3-64.

    Args:
        sink: receives the file's bytes in order (it must copy a memoryview it keeps).
        compression: the compression recorded in the file header.
    """

    def __init__(self, sink: Callable[[bytes | memoryview], object], compression: Compression) -> None:
        self._sink = sink
        self._hasher = xxhash.xxh3_64()
        self.pos = 0
        """Bytes emitted so far: the file offset of the next block (or of the trailer)."""
        self.blocks = 0
        """Blocks emitted so far."""
        self.starts: list[int] = []
        """The file offset of every emitted block, then (after :meth:`finish`) of the trailer."""
        # Version 1 where it says the same: only zstd files may hold raw blocks (version 2).
        version = FORMAT_VERSION if compression is Compression.ZSTD else 1
        self._emit(FILE_HEADER.pack(MAGIC, version, compression.code, 0))

    def _emit(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._sink(data)
        self.pos += len(data)

    def write_block(self, stored: bytes | memoryview, raw_len: int, digest: int) -> None:
        """Emit one block: its header and its stored bytes, separately (no copy of the payload)."""
        self.starts.append(self.pos)
        self._emit(BLOCK_HEADER.pack(len(stored), raw_len, digest))
        self._emit(stored)
        self.blocks += 1

    def finish(self, raw_size: int) -> StateFileSummary:
        """Emit the trailer (``raw_size``: the raw bytes of all blocks) and detach from the sink."""
        self.starts.append(self.pos)
        self._emit(TRAILER.pack(END_MARKER, self.blocks, raw_size))
        self.close()
        return StateFileSummary(self.pos, raw_size, format_checksum(self._hasher.intdigest()), self.blocks)

    def close(self) -> None:
        """Detach from the sink (usually a bound method of the encoder's owner: no reference cycle)."""
        self._sink = _closed_sink


def _closed_sink(data: bytes | memoryview) -> None:
    raise StateFileError("state file written after it was finished or aborted")


# --- reading -----------------------------------------------------------------------------------------


class ByteReader(Protocol):
    """A forward-only reader of bytes (``keystate.storage.ObjectReader`` is one)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ByteSource(Protocol):
    """Where a state file's bytes are: what :class:`StateFileReader` decodes from.

    :class:`BytesSource` holds them in memory; ``keystate.storage.statefile_io.StoreSource`` reads them
    from an object store.
    """

    def describe(self) -> str:
        """The name used in error messages (a path or URI)."""
        ...

    def read_range(self, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (fewer at the end of the file)."""
        ...

    def open(self, start: int) -> ByteReader:
        """A reader from offset ``start`` to the end of the file."""
        ...


class BytesSource:
    """State-file bytes held in memory (inline handles)."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._name = name

    def describe(self) -> str:
        return self._name

    def read_range(self, start: int, length: int) -> bytes:
        return self._data[start : start + length]

    def open(self, start: int) -> ByteReader:
        return io.BytesIO(self._data[start:])


_READ_CHUNK = 4 << 20


def _read_exact(reader: ByteReader, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining > 0:
        # At most 4 MiB per read: a declared length is untrusted, so never allocate it up front.
        chunk = reader.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


class StateFileReader:
    """Reads and verifies one state file.

    Args:
        source: where the bytes are.
        size: the stored size recorded in the handle (``None`` if unknown).
        checksum: the whole-file checksum recorded in the handle (``None`` to skip that check).
        raw_size: the uncompressed size recorded in the handle (checked against the trailer, and no
            read decodes more than this).
        compression: the compression recorded in the handle (checked against the file header).
        limits: what the file may declare (block and file raw sizes); checked before decoding.

    Every block is checked against the limits and its checksum before it is decompressed, and
    decompresses into at most its declared raw length; the iterators hold one block at a time.
    """

    def __init__(
        self,
        source: ByteSource,
        *,
        size: int | None = None,
        checksum: str | None = None,
        raw_size: int | None = None,
        compression: Compression | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        self._source = source
        self._size = size
        self._checksum = checksum
        self._raw_size = raw_size
        self._expected_compression = compression
        self._limits = limits or ReadLimits()
        self._max_stored = max_stored_block(self._limits.max_block_raw)
        self._compression: Compression | None = None
        self._version = FORMAT_VERSION
        self._decompressor = zstandard.ZstdDecompressor()

    @property
    def name(self) -> str:
        return self._source.describe()

    def _error(self, offset: int, what: str) -> StateFileError:
        return StateFileError(f"{self.name}: {what} at offset {offset}; the state file is corrupted or truncated")

    def _parse_header(self, data: bytes) -> Compression:
        if len(data) < FILE_HEADER.size:
            raise self._error(0, f"file header truncated ({len(data)} of {FILE_HEADER.size} bytes)")
        magic, version, code, flags = FILE_HEADER.unpack(data[: FILE_HEADER.size])
        if magic != MAGIC:
            # Never the bytes found: the file may be anything (a secret, if a path was tampered with).
            raise StateFileError(
                f"{self.name}: not a keystate state file (its first {len(MAGIC)} bytes are not the magic {MAGIC!r})"
            )
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedStateFileVersionError("state file", version, SUPPORTED_VERSIONS, self.name)
        compression = Compression.from_code(code)
        if compression is None:
            raise StateFileError(f"{self.name}: unknown compression code {code} in the file header")
        if self._expected_compression is not None and compression is not self._expected_compression:
            raise StateFileError(
                f"{self.name}: the file header says compression {compression.value!r} but its handle records "
                f"{self._expected_compression.value!r}; the file was replaced or the metadata is corrupted"
            )
        if flags != 0:
            raise StateFileError(f"{self.name}: unknown header flags {flags:#x}")
        self._version = version
        return compression

    def _raw_budget(self) -> int:
        """The most raw bytes one read may decode: the handle's ``raw_size``, within the file limit.

        Raises:
            StateFileError: the handle declares more than ``max_file_raw`` (before anything is read).
        """
        limit = self._limits.max_file_raw
        if self._raw_size is None:
            return limit
        if self._raw_size > limit:
            raise StateFileError(
                f"{self.name}: its handle records {self._raw_size} raw bytes, over the {limit}-byte limit of one "
                f"state file (ReadLimits.max_file_raw); to read a state file this large, {_LIMITS_HINT}"
            )
        return self._raw_size

    def header(self) -> Compression:
        """Read and check the file header; returns the file's compression."""
        if self._compression is None:
            self._compression = self._parse_header(self._source.read_range(0, FILE_HEADER.size))
        return self._compression

    def _decode(self, offset: int, raw_len: int, digest: int, stored: bytes) -> bytes:
        actual = xxhash.xxh3_64_intdigest(stored)
        if actual != digest:
            raise ChecksumMismatchError(
                f"{self.name}: block at offset {offset}: checksum mismatch (recorded {digest:016x}, "
                f"computed {actual:016x}); the state file is corrupted"
            )
        if self.header() is Compression.NONE:
            raw = stored
        elif self._version >= 2 and len(stored) >= raw_len:
            # Version 2 stores a block raw when zstd does not make it smaller, and a frame never as large.
            if len(stored) != raw_len:
                raise self._error(offset, f"block stores {len(stored)} bytes for {raw_len} raw bytes (more than raw)")
            raw = stored
        else:
            try:
                declared = zstandard.frame_content_size(stored) if len(stored) >= 6 else -2
            except zstandard.ZstdError as exc:
                raise self._error(offset, f"block is not a zstd frame ({exc})") from exc
            if declared != raw_len:
                raise self._error(offset, f"block declares {raw_len} raw bytes but its frame holds {declared}")
            try:
                # Exactly one frame per block: bytes after it are corruption, not data to ignore.
                raw = self._decompressor.decompress(stored, max_output_size=raw_len, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise self._error(offset, f"undecodable zstd block ({exc})") from exc
        if len(raw) != raw_len:
            raise self._error(offset, f"block decodes to {len(raw)} bytes, header says {raw_len}")
        return raw

    def _blocks(self, reader: ByteReader, offset: int, end: int | None, hasher: xxhash.xxh3_64 | None,
                trailer: list[tuple[int, int, int]] | None) -> Iterator[tuple[int, bytes]]:  # fmt: skip
        """Yield (file offset, raw block) from ``offset`` until ``end`` (exclusive) or the trailer."""
        budget = self._raw_budget()
        max_raw, max_stored = self._limits.max_block_raw, self._max_stored
        while end is None or offset < end:
            head = _read_exact(reader, BLOCK_HEADER.size)
            if len(head) < BLOCK_HEADER.size:
                raise self._error(offset, f"block header truncated ({len(head)} of {BLOCK_HEADER.size} bytes)")
            if hasher is not None:
                hasher.update(head)
            stored_len, raw_len, digest = BLOCK_HEADER.unpack(head)
            if stored_len == END_MARKER:
                if end is not None:
                    raise self._error(offset, f"trailer found before the expected end offset {end}")
                if trailer is not None:
                    # (block count, total raw length, file size)
                    trailer.append((raw_len, digest, offset + TRAILER.size))
                return
            if stored_len > max_stored or raw_len > max_raw:
                raise StateFileError(
                    f"{self.name}: block at offset {offset} declares {stored_len} stored / {raw_len} raw bytes, over "
                    f"the limit of {max_stored} / {max_raw} (ReadLimits.max_block_raw); the state file is corrupted, "
                    f"or was written with a larger block size: to read it, {_LIMITS_HINT}"
                )
            if raw_len > budget:
                if self._raw_size is not None:
                    raise self._error(
                        offset, f"blocks decode to more than the {self._raw_size} raw bytes its handle records"
                    )
                raise StateFileError(
                    f"{self.name}: block at offset {offset} takes the file past {self._limits.max_file_raw} raw bytes, "
                    f"the limit of one state file (ReadLimits.max_file_raw); to read a state file this large, "
                    f"{_LIMITS_HINT}"
                )
            budget -= raw_len
            if self._size is not None and offset + BLOCK_HEADER.size + stored_len > self._size:
                raise self._error(offset, f"block of {stored_len} bytes runs past the file size {self._size}")
            stored = _read_exact(reader, stored_len)
            if len(stored) < stored_len:
                raise self._error(offset, f"block payload truncated ({len(stored)} of {stored_len} bytes)")
            if hasher is not None:
                hasher.update(stored)
            yield offset, self._decode(offset, raw_len, digest, stored)
            offset += BLOCK_HEADER.size + stored_len
        if end is not None and offset != end:
            raise self._error(offset, f"key-group range ends inside a block (expected a block boundary at {end})")

    def iter_range_with_offsets(self, start: int, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield ``(file offset, raw block)`` for the blocks between two block boundaries.

        ``end=None`` reads up to the trailer.

        Only that range is read (one ranged GET on S3). Block checksums are verified; the whole-file
        checksum is not, because only part of the file is read.

        Raises:
            StateFileError: the range does not start or end at a block boundary, or a block is damaged.
        """
        self._raw_budget()
        self.header()
        if start < FILE_HEADER.size or (self._size is not None and start > self._size):
            raise self._error(start, f"offset outside the file's blocks (file size {self._size})")
        reader = self._source.open(start)
        try:
            yield from self._blocks(reader, start, end, None, None)
        finally:
            reader.close()

    def iter_range(self, start: int, end: int | None = None) -> Iterator[bytes]:
        """Like :meth:`iter_range_with_offsets`, yielding only the raw blocks."""
        for _, raw in self.iter_range_with_offsets(start, end):
            yield raw

    def iter_blocks(self) -> Iterator[bytes]:
        """Yield every raw block in order, then check the trailer, size and whole-file checksum.

        Raises:
            StateFileError: the file is truncated or malformed.
            ChecksumMismatchError: a block or the whole file does not match its checksum.
        """
        self._raw_budget()
        reader = self._source.open(0)
        try:
            hasher = xxhash.xxh3_64()
            head = _read_exact(reader, FILE_HEADER.size)
            self._compression = self._parse_header(head)
            hasher.update(head)
            trailer: list[tuple[int, int, int]] = []
            blocks = 0
            raw_total = 0
            for _, raw in self._blocks(reader, FILE_HEADER.size, None, hasher, trailer):
                blocks += 1
                raw_total += len(raw)
                yield raw
            count, raw_len, end = trailer[0]
            if (count, raw_len) != (blocks, raw_total):
                raise StateFileError(
                    f"{self.name}: trailer records {count} blocks / {raw_len} raw bytes but the file holds "
                    f"{blocks} / {raw_total}; the state file is corrupted"
                )
            if self._raw_size is not None and raw_total != self._raw_size:
                raise StateFileError(
                    f"{self.name}: the file holds {raw_total} raw bytes but its handle records {self._raw_size}; "
                    "the file was replaced or the metadata is corrupted"
                )
            if reader.read(1):
                raise StateFileError(f"{self.name}: unexpected bytes after the trailer at offset {end}")
            if self._size is not None and end != self._size:
                raise StateFileError(
                    f"{self.name}: file holds {end} bytes but its handle records {self._size}; "
                    "the state file is truncated or was replaced"
                )
            if self._checksum is not None:
                actual = format_checksum(hasher.intdigest())
                if actual != self._checksum:
                    raise ChecksumMismatchError(
                        f"{self.name}: whole-file checksum mismatch (recorded {self._checksum}, computed "
                        f"{actual}); the state file is corrupted"
                    )
        finally:
            reader.close()

    def read_all(self) -> bytes:
        """All raw bytes of the file, fully verified.

        This holds the whole raw stream (at most ``ReadLimits.max_file_raw``); keystate's own readers
        iterate the blocks instead.
        """
        return b"".join(self.iter_blocks())

    def verify(self) -> int:
        """Read and check the whole file without keeping it; returns the raw byte count."""
        total = 0
        for raw in self.iter_blocks():
            total += len(raw)
        return total
