"""The state-file format: a header, independently compressed and checksummed blocks, and a trailer.

This is the byte format of every state stream, whether it lands in a file, an S3 object or inline in
``_metadata``. ``docs/format.md`` is the normative description; the structs below are the code of it.

A writer can end the current block at any time (:meth:`StateFileWriter.start_block`) and get the file
offset where the next block starts. The keyed backends do that at each key group, so a rescaled
restore reads exactly the blocks of the key groups it needs (one range read, no full scan). Every
block carries the xxh3-64 of its stored bytes, so corruption is found and located (file and offset)
even in a partial read; the trailer records the block count and total raw length, so truncation is
found too; the whole-file xxh3-64 goes into the handle in ``_metadata``.
"""

from __future__ import annotations

import queue
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import xxhash
import zstandard

from keystate.storage._compression import BlockHelpers, zstd_compressor
from keystate.storage.base import ObjectReader, ObjectStore
from keystate.storage.errors import ChecksumMismatchError, StateFileError, UnsupportedStateFileVersionError

__all__ = [
    "BLOCK_HEADER",
    "FILE_HEADER",
    "MAGIC",
    "TRAILER",
    "BytesSource",
    "Compression",
    "StateFileReader",
    "StateFileSummary",
    "StateFileWriter",
    "StoreSource",
    "format_checksum",
]

MAGIC = b"KSSF"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# >4s magic "KSSF" | >H format version | >B compression code | >B flags (must be 0)
FILE_HEADER = struct.Struct(">4sHBB")
# >I stored length | >I raw (uncompressed) length | >Q xxh3-64 of the stored bytes
BLOCK_HEADER = struct.Struct(">IIQ")
# >I 0xFFFFFFFF end marker | >I number of blocks | >Q total raw length of all blocks
TRAILER = struct.Struct(">IIQ")
END_MARKER = 0xFFFFFFFF

DEFAULT_BLOCK_SIZE = 1 << 20
MAX_RAW_BLOCK = 64 << 20
"""A reader rejects a block that declares more raw bytes than this (bounds memory on hostile input)."""
MAX_STORED_BLOCK = MAX_RAW_BLOCK + (MAX_RAW_BLOCK >> 7) + 1024  # zstd's worst-case expansion bound


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


class StateFileWriter:
    """Writes one state file through ``sink``, block by block.

    Args:
        sink: receives the file's bytes in order (it must copy a memoryview it keeps); always called
            from the thread that calls the writer's methods.
        compression: block compression.
        level: zstd level (1 is the default: checkpoint speed matters more than the last few percent).
        block_size: raw bytes per block before a block is cut automatically.
        threads: helper threads that compress and hash zstd blocks while the caller goes on writing
            (0: compress in the caller's thread). They start once a block's worth of raw bytes has been
            written, so small files never start a thread, and stop at :meth:`finish` or
            :meth:`abort`. The file's bytes do not depend on this setting.
    """

    def __init__(
        self,
        sink: Callable[[bytes | memoryview], object],
        *,
        compression: Compression = Compression.ZSTD,
        level: int = 1,
        block_size: int = DEFAULT_BLOCK_SIZE,
        threads: int = 0,
    ) -> None:
        if not 0 < block_size <= MAX_RAW_BLOCK:
            raise ValueError(f"block_size must be in 1..{MAX_RAW_BLOCK}, found {block_size}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, found {threads}")
        self._sink = sink
        self._compression = compression
        self._level = level
        self._compressor = zstd_compressor(level) if compression is Compression.ZSTD else None
        self._threads = threads if compression is Compression.ZSTD else 0
        self._helpers: BlockHelpers | None = None
        self._block_size = block_size
        self._buf = bytearray()
        self._hasher = xxhash.xxh3_64()
        self._pos = 0
        self._raw_pos = 0
        self._blocks = 0  # blocks emitted
        self._cut_blocks = 0  # blocks cut (emitted or with a helper)
        self._starts: list[int] = []  # file offset of every emitted block, then of the trailer
        self._raw_cut = 0  # raw bytes in the blocks cut
        self._finished = False
        self._aborted = False
        self._failed: BaseException | None = None
        self._emit(FILE_HEADER.pack(MAGIC, FORMAT_VERSION, compression.code, 0))

    def _emit(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._sink(data)
        self._pos += len(data)

    def _write_block(self, stored: bytes | memoryview, raw_len: int, digest: int) -> None:
        # No copies beyond compression: the header and the payload go to the sink separately.
        self._starts.append(self._pos)
        self._emit(BLOCK_HEADER.pack(len(stored), raw_len, digest))
        self._emit(stored)
        self._blocks += 1

    def _emit_block(self, raw: memoryview) -> None:
        number = self._cut_blocks
        self._cut_blocks += 1
        helpers = self._helpers
        if helpers is None and self._threads and self._raw_cut >= self._block_size:
            helpers = self._helpers = BlockHelpers(self._level, self._threads)
        self._raw_cut += len(raw)
        if helpers is None:
            stored = self._compressor.compress(raw) if self._compressor is not None else raw
            self._write_block(stored, len(raw), xxhash.xxh3_64_intdigest(stored))
            return
        # Bound the memory in flight: wait for the oldest blocks before handing over more.
        self._drain(number - 2 * len(helpers.threads) - 1)
        helpers.todo.put((number, raw))

    def _drain(self, until: int) -> None:
        """Emit finished blocks in order: wait until ``until`` blocks are out, then take what is ready."""
        helpers = self._helpers
        if helpers is None:
            return
        try:
            self._take_done(helpers, until)
        except BaseException as exc:  # a helper's error, or the sink's: the file is lost either way
            self._fail(exc)
            raise

    def _take_done(self, helpers: BlockHelpers, until: int) -> None:
        while True:
            if self._blocks < until:
                done = helpers.next_done()
            else:
                try:
                    done = helpers.done.get_nowait()
                except queue.Empty:
                    return
            if done[4] is not None:
                raise done[4]
            helpers.ready[done[0]] = done
            while (block := helpers.ready.pop(self._blocks, None)) is not None:
                self._write_block(block[1], block[2], block[3])

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._stop_helpers(discard=True)

    def _stop_helpers(self, *, discard: bool) -> None:
        helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.shutdown(discard=discard)

    def _check(self, what: str) -> None:
        if self._failed is not None:
            raise StateFileError(f"{what} a state file whose writing failed ({self._failed!r})")
        if self._aborted or self._finished:
            raise StateFileError(f"{what} a state file that is already {'aborted' if self._aborted else 'finished'}")

    def _cut(self, *, full_only: bool) -> None:
        """Emit the buffered bytes as blocks of ``block_size`` (with ``full_only``, keep the remainder)."""
        buf = self._buf
        size = self._block_size
        end = len(buf) - len(buf) % size if full_only else len(buf)
        if not end:
            return
        self._buf = buf[end:]  # a new bytearray; ``buf`` is never resized while views of it exist
        view = memoryview(buf)
        for start in range(0, end, size):
            self._emit_block(view[start : min(start + size, end)])

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append raw bytes; a block is cut whenever ``block_size`` raw bytes are buffered."""
        self._check("write to")
        self._buf += data
        self._raw_pos += len(data)
        if len(self._buf) >= self._block_size:
            self._cut(full_only=True)

    @property
    def compression(self) -> Compression:
        return self._compression

    def set_threads(self, threads: int) -> None:
        """Change the number of helper threads for the blocks cut from now on (0: the caller's thread)."""
        if threads < 0:
            raise ValueError(f"threads must be >= 0, found {threads}")
        helpers = self._helpers
        if helpers is not None and threads != len(helpers.threads):
            self._drain(self._cut_blocks)
            self._stop_helpers(discard=False)
        self._threads = threads if self._compressor is not None else 0

    def tell(self) -> int:
        """The logical position: raw bytes written so far (operator-state offsets use this)."""
        return self._raw_pos

    def start_block(self) -> int:
        """End the current block and return the file offset at which the next block will start.

        Keyed backends call this at every key group; the returned offsets go into the handle. With
        helper threads it waits until every block cut so far is written (see :meth:`mark_block`).
        """
        self._check("start a block in")
        if self._buf:
            self._cut(full_only=False)
        self._drain(self._cut_blocks)
        return self._pos

    def mark_block(self) -> int:
        """End the current block like :meth:`start_block`, without waiting for helper threads.

        Returns:
            The number of the block that starts here; :meth:`block_offset` turns it into the file
            offset once that block (or, at the end, the trailer) is written.
        """
        self._check("start a block in")
        if self._buf:
            self._cut(full_only=False)
        self._drain(0)
        return self._cut_blocks

    def block_offset(self, number: int) -> int:
        """The file offset of block ``number`` from :meth:`mark_block` (after :meth:`finish`, always known).

        Raises:
            StateFileError: that block is not written yet.
        """
        if 0 <= number < len(self._starts):
            return self._starts[number]
        raise StateFileError(f"the offset of block {number} is not known yet ({self._blocks} blocks written)")

    def finish(self) -> StateFileSummary:
        """Write the last block and the trailer; the writer cannot be used afterwards."""
        if self._finished:
            raise StateFileError("state file finished twice")
        self._check("finish")
        if self._buf:
            self._cut(full_only=False)
        self._drain(self._cut_blocks)
        self._stop_helpers(discard=False)
        self._starts.append(self._pos)
        self._emit(TRAILER.pack(END_MARKER, self._blocks, self._raw_pos))
        self._finished = True
        self._sink = _closed_sink  # the sink is usually a bound method of our owner: no reference cycle
        return StateFileSummary(self._pos, self._raw_pos, format_checksum(self._hasher.intdigest()), self._blocks)

    def abort(self) -> None:
        """Stop the helper threads and drop whatever is not written yet. Idempotent."""
        self._aborted = True
        self._buf = bytearray()
        self._stop_helpers(discard=True)
        self._sink = _closed_sink


def _closed_sink(data: bytes | memoryview) -> None:
    raise StateFileError("state file written after it was finished or aborted")


# --- reading -----------------------------------------------------------------------------------------


class ByteSourceLike(Protocol):
    def describe(self) -> str: ...

    def read_range(self, start: int, length: int) -> bytes: ...

    def open(self, start: int) -> ObjectReader: ...


class BytesSource:
    """State-file bytes held in memory (inline handles)."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._name = name

    def describe(self) -> str:
        return self._name

    def read_range(self, start: int, length: int) -> bytes:
        return self._data[start : start + length]

    def open(self, start: int) -> ObjectReader:
        import io

        return io.BytesIO(self._data[start:])


class StoreSource:
    """State-file bytes in an object store."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._store = store
        self._key = key

    def describe(self) -> str:
        return self._store.describe(self._key)

    def read_range(self, start: int, length: int) -> bytes:
        return self._store.get_range(self._key, start, length)

    def open(self, start: int) -> ObjectReader:
        return self._store.open_reader(self._key, start)


_READ_CHUNK = 4 << 20


def _read_exact(reader: ObjectReader, n: int) -> bytes:
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
        raw_size: the uncompressed size recorded in the handle (checked against the trailer).
        compression: the compression recorded in the handle (checked against the file header).
    """

    def __init__(
        self,
        source: ByteSourceLike,
        *,
        size: int | None = None,
        checksum: str | None = None,
        raw_size: int | None = None,
        compression: Compression | None = None,
    ) -> None:
        self._source = source
        self._size = size
        self._checksum = checksum
        self._raw_size = raw_size
        self._expected_compression = compression
        self._compression: Compression | None = None
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
            raise StateFileError(f"{self.name}: not a keystate state file (magic {magic!r}, expected {MAGIC!r})")
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
        return compression

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

    def _blocks(self, reader: ObjectReader, offset: int, end: int | None, hasher: xxhash.xxh3_64 | None,
                trailer: list[tuple[int, int, int]] | None) -> Iterator[tuple[int, bytes]]:  # fmt: skip
        """Yield (file offset, raw block) from ``offset`` until ``end`` (exclusive) or the trailer."""
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
            if stored_len > MAX_STORED_BLOCK or raw_len > MAX_RAW_BLOCK:
                raise self._error(offset, f"block declares {stored_len} stored / {raw_len} raw bytes, over the limit")
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
        """All raw bytes of the file, fully verified."""
        return b"".join(self.iter_blocks())

    def verify(self) -> int:
        """Read and check the whole file without keeping it; returns the raw byte count."""
        total = 0
        for raw in self.iter_blocks():
            total += len(raw)
        return total
