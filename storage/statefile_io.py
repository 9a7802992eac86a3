"""State files through object stores: the writer that cuts and compresses blocks, and the store source.

The bytes are the state-file format of ``keystate.storage.format.statefile``; this module moves them.
:class:`StateFileWriter` buffers raw bytes, cuts them into blocks, compresses and hashes each block
(on helper threads from ``keystate.storage._compression`` if asked) and hands the blocks, in order, to
the format's :class:`~keystate.storage.format.statefile.StateFileEncoder`. :class:`StoreSource` lets the
format's :class:`~keystate.storage.format.statefile.StateFileReader` read a state file from an object store.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from keystate.storage._compression import BlockHelpers
from keystate.storage.base import ObjectReader, ObjectStore
from keystate.storage.errors import StateFileError
from keystate.storage.format.statefile import (
    DEFAULT_BLOCK_SIZE,
    MAX_RAW_BLOCK,
    Compression,
    StateFileEncoder,
    StateFileSummary,
    encode_block,
    zstd_compressor,
)

__all__ = ["StateFileWriter", "StoreSource"]


class StateFileWriter:
    """Writes one state file through ``sink``, block by block.

    Args:
        sink: receives the file's bytes in order (it must copy a memoryview it keeps); always called
            from the thread that calls the writer's methods.
        compression: block compression.
        level: zstd level (1 is the default: checkpoint speed matters more than the last few percent).
        block_size: raw bytes per block before a block is cut automatically; at most
            ``MAX_RAW_BLOCK`` (16 MiB), the most a reader accepts by default.
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
        self._compression = compression
        self._level = level
        self._compressor = zstd_compressor(level) if compression is Compression.ZSTD else None
        self._threads = threads if compression is Compression.ZSTD else 0
        self._helpers: BlockHelpers | None = None
        self._block_size = block_size
        self._buf = bytearray()
        self._raw_pos = 0
        self._cut_blocks = 0  # blocks cut (emitted or with a helper)
        self._raw_cut = 0  # raw bytes in the blocks cut
        self._finished = False
        self._aborted = False
        self._failed: BaseException | None = None
        # The format's framing: header (written here, at once), block headers, trailer, whole-file checksum.
        self._encoder = StateFileEncoder(sink, compression)

    def _emit_block(self, raw: memoryview) -> None:
        number = self._cut_blocks
        self._cut_blocks += 1
        helpers = self._helpers
        if helpers is None and self._threads and self._raw_cut >= self._block_size:
            helpers = self._helpers = BlockHelpers(self._level, self._threads)
        self._raw_cut += len(raw)
        if helpers is None:
            stored, digest = encode_block(raw, self._compressor)
            self._encoder.write_block(stored, len(raw), digest)
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
        encoder = self._encoder
        while True:
            if encoder.blocks < until:
                done = helpers.next_done()
            else:
                try:
                    done = helpers.done.get_nowait()
                except queue.Empty:
                    return
            if done[4] is not None:
                raise done[4]
            helpers.ready[done[0]] = done
            while (block := helpers.ready.pop(encoder.blocks, None)) is not None:
                encoder.write_block(block[1], block[2], block[3])

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
        return self._encoder.pos

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
        starts = self._encoder.starts
        if 0 <= number < len(starts):
            return starts[number]
        raise StateFileError(f"the offset of block {number} is not known yet ({self._encoder.blocks} blocks written)")

    def finish(self) -> StateFileSummary:
        """Write the last block and the trailer; the writer cannot be used afterwards."""
        if self._finished:
            raise StateFileError("state file finished twice")
        self._check("finish")
        if self._buf:
            self._cut(full_only=False)
        self._drain(self._cut_blocks)
        self._stop_helpers(discard=False)
        summary = self._encoder.finish(self._raw_pos)  # detaches the sink: no reference cycle with our owner
        self._finished = True
        return summary

    def abort(self) -> None:
        """Stop the helper threads and drop whatever is not written yet. Idempotent."""
        self._aborted = True
        self._buf = bytearray()
        self._stop_helpers(discard=True)
        self._encoder.close()


class StoreSource:
    """State-file bytes in an object store (a ``ByteSource`` of the format's reader)."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._store = store
        self._key = key

    def describe(self) -> str:
        return self._store.describe(self._key)

    def read_range(self, start: int, length: int) -> bytes:
        return self._store.get_range(self._key, start, length)

    def open(self, start: int) -> ObjectReader:
        return self._store.open_reader(self._key, start)
