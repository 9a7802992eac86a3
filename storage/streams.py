"""State output streams: a state file written into a checkpoint, or inlined in ``_metadata`` if small.

A :class:`StateOutputStream` buffers the state file's bytes in memory until they exceed the inline
threshold; a stream closed below it becomes an ``inline`` handle (no object is written, as Flink's
``data-inline-threshold``). Past the threshold it opens an object writer (multipart on S3) and
streams from then on.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from keystate.storage.base import ObjectStore, ObjectWriter, PutMode, join_key
from keystate.storage.errors import StorageError
from keystate.storage.format.metadata import HandleScope, StreamHandle
from keystate.storage.format.statefile import DEFAULT_BLOCK_SIZE, Compression
from keystate.storage.statefile_io import StateFileWriter

__all__ = ["StateOutputStream", "StreamOptions", "state_file_name"]

STATE_FILE_SUFFIX = ".ksf"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+~-]")


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """How state streams are written.

    Attributes:
        inline_threshold: streams of at most this many stored bytes are inlined in ``_metadata``
            (Flink's ``execution.checkpointing.data-inline-threshold``, 20 KiB by default).
        compression: block compression of state files.
        compression_level: zstd level.
        block_size: raw bytes per block before a block is cut automatically.
        compression_threads: helper threads that compress and hash the zstd blocks of a stream that
            asks for them (:meth:`StateOutputStream.compress_in_background`; keyed snapshots do) while
            its writer goes on encoding: zstd and xxh3 release the GIL. 1 by default: one helper per such
            stream, started once the stream has written a block's worth of bytes, stopped when it closes
            or aborts. 0 compresses in the writing thread. The bytes written are the same either way.
        inline_budget: stored bytes that the inline streams of one checkpoint writer may hold together
            (4 MiB by default); a stream under the threshold that no longer fits is written as a file.
            This keeps ``_metadata`` under the size a reader accepts (16 MiB, docs/format.md section 4.2)
            however many subtasks inline their state.
    """

    inline_threshold: int = 20 * 1024
    compression: Compression = Compression.ZSTD
    compression_level: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    compression_threads: int = 1
    inline_budget: int = 4 << 20

    def __post_init__(self) -> None:
        if self.inline_threshold < 0:
            raise ValueError(f"inline_threshold must be >= 0, found {self.inline_threshold}")
        if self.inline_budget < 0:
            raise ValueError(f"inline_budget must be >= 0, found {self.inline_budget}")
        if self.compression_threads < 0:
            raise ValueError(f"compression_threads must be >= 0, found {self.compression_threads}")


def state_file_name(hint: str) -> str:
    """A unique, path-safe relative name for a state file from a hint like ``"orders/3/keyed"``.

    Each hint segment is reduced to safe characters (and a leading ``.``, ``-``, ``+``, ``=`` or ``~``
    to ``_``), then a random
    suffix keeps names unique even when several writers use the same hint.
    """
    segments = [_UNSAFE.sub("_", s)[:64] for s in hint.split("/") if s] or ["state"]
    # A segment must start with a letter, digit or '_' (keystate.storage.format.validation.safe_relative_path).
    segments = [s if s[0].isalnum() or s[0] == "_" else "_" + s[1:] for s in segments]
    segments[-1] = f"{segments[-1]}-{uuid.uuid4().hex[:16]}{STATE_FILE_SUFFIX}"
    return "/".join(segments)


class StateOutputStream:
    """One state stream being written; :meth:`close` returns the handle to put into metadata.

    Not thread-safe: one stream is written by one thread. Use as a context manager to abort on error.
    """

    def __init__(
        self,
        store: ObjectStore,
        directory: str,
        relative_path: str,
        scope: HandleScope,
        options: StreamOptions,
        on_open: Callable[[str], None] | None = None,
        on_close: Callable[[StreamHandle], None] | None = None,
        reserve_inline: Callable[[int], bool] | None = None,
    ) -> None:
        self._store = store
        self._key = join_key(directory, relative_path)
        self._path = relative_path
        self._scope = scope
        self._threshold = options.inline_threshold
        self._on_open = on_open
        self._on_close = on_close  # told each file made durable (not inline handles, never after a failure)
        self._reserve_inline = reserve_inline  # asked before inlining: False means write a file after all
        self._pending = bytearray()
        self._writer: ObjectWriter | None = None
        self._handle: StreamHandle | None = None
        self._aborted = False
        self._lock = threading.RLock()
        self._file = StateFileWriter(
            self._sink,
            compression=options.compression,
            level=options.compression_level,
            block_size=options.block_size,
        )
        self._threads = options.compression_threads

    @property
    def key(self) -> str:
        """The object key the stream writes to if it is not inlined."""
        return self._key

    def _sink(self, data: bytes | memoryview) -> None:
        # Under the lock: abort() may come from another thread (a coordinator aborting the checkpoint)
        # while this one writes; it then waits for the write in flight and no later write happens.
        with self._lock:
            if self._aborted:
                raise StorageError(f"state stream {self._store.describe(self._key)} was aborted while being written")
            if self._writer is not None:
                self._writer.write(data)
                return
            self._pending += data
            if len(self._pending) > self._threshold:
                self._open_file()

    def _spill(self) -> None:
        """Write the held bytes as a file after all: the checkpoint's inline budget is used up."""
        with self._lock:
            if self._aborted:
                raise StorageError(f"state stream {self._store.describe(self._key)} was aborted")
            self._open_file()

    def _open_file(self) -> None:
        """Start the object with the bytes held so far: the stream is not inlined. Under the lock."""
        if self._on_open is not None:
            self._on_open(self._key)
        self._writer = self._store.open_writer(self._key, PutMode.CREATE)
        self._writer.write(bytes(self._pending))
        self._pending = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append raw (uncompressed) bytes."""
        if self._handle is not None or self._aborted:
            raise StorageError(f"write to state stream {self._store.describe(self._key)} after close or abort")
        try:
            self._file.write(data)
        except BaseException as exc:
            self._fail(exc)
            raise

    def tell(self) -> int:
        """Raw bytes written so far (operator-state element offsets)."""
        return self._file.tell()

    def start_block(self) -> int:
        """Cut the current block; returns the file offset of the next block (key-group offsets)."""
        try:
            return self._file.start_block()
        except BaseException as exc:
            self._fail(exc)
            raise

    def compress_in_background(self) -> None:
        """Compress on ``StreamOptions.compression_threads`` helper threads from now on.

        :meth:`write` may then return before its blocks reach the store; :meth:`close` writes them all
        and :meth:`abort` drops them. Use :meth:`mark_block` rather than :meth:`start_block`, which
        waits for the helpers.
        """
        self._file.set_threads(self._threads)

    def mark_block(self) -> int:
        """Cut the current block without waiting for compression; :meth:`block_offset` resolves the number."""
        try:
            return self._file.mark_block()
        except BaseException as exc:
            self._fail(exc)
            raise

    def block_offset(self, number: int) -> int:
        """The file offset of block ``number`` from :meth:`mark_block` (known after :meth:`close`)."""
        return self._file.block_offset(number)

    def close(self) -> StreamHandle:
        """Finish the state file and make it durable; returns its handle. Idempotent."""
        if self._handle is not None:
            return self._handle
        if self._aborted:
            raise StorageError(f"state stream {self._store.describe(self._key)} was aborted")
        try:
            summary = self._file.finish()
            compression = self._file.compression
            reserve, self._reserve_inline = self._reserve_inline, None
            if self._writer is None and reserve is not None and not reserve(len(self._pending)):
                self._spill()
            if self._writer is None:
                self._handle = StreamHandle(
                    HandleScope.INLINE, summary.size, summary.raw_size, summary.checksum, compression,
                    data=bytes(self._pending),
                )  # fmt: skip
            else:
                self._writer.close()
                self._handle = StreamHandle(
                    self._scope,
                    summary.size,
                    summary.raw_size,
                    summary.checksum,
                    compression,
                    path=self._path,
                )
        except BaseException as exc:
            self._fail(exc)
            raise
        on_close, self._on_close = self._on_close, None
        self._on_open = None  # usually bound methods of the checkpoint writer: no reference cycle
        if on_close is not None and self._handle.path is not None:
            on_close(self._handle)
        return self._handle

    def _fail(self, exc: BaseException) -> None:
        """Abort after ``exc``. Whatever a write hits because :meth:`abort` ran in another thread meanwhile
        (the file writer is closed under it) is raised as that abort, a ``StorageError``."""
        aborted = self._aborted
        self.abort()
        if aborted and isinstance(exc, Exception) and not isinstance(exc, StorageError):
            where = self._store.describe(self._key)
            raise StorageError(f"state stream {where} was aborted while being written") from exc

    def abort(self) -> None:
        """Discard the stream; nothing it wrote stays visible. Safe to call from another thread than the
        one writing: that one's next write raises ``StorageError``."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self._pending = bytearray()
            self._on_open = None
            self._on_close = None
            self._reserve_inline = None
            writer = self._writer
        self._file.abort()  # stops its helper threads before the object writer goes away
        if writer is not None:
            writer.abort()

    def __enter__(self) -> StateOutputStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
