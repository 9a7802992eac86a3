"""State output streams: a state file written into a checkpoint, or inlined in ``_metadata`` if small.

A :class:`StateOutputStream` buffers the state file's bytes in memory until they exceed the inline
threshold; a stream closed below it becomes an ``inline`` handle (no object is written, as Flink's
``data-inline-threshold``). Past the threshold it opens an object writer (multipart on S3) and
streams from then on.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from storage.base import ObjectStore, ObjectWriter, PutMode, join_key
from storage.errors import StorageError
from storage.metadata import HandleScope, StreamHandle
from storage.statefile import DEFAULT_BLOCK_SIZE, Compression, StateFileWriter

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
    """

    inline_threshold: int = 20 * 1024
    compression: Compression = Compression.ZSTD
    compression_level: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.inline_threshold < 0:
            raise ValueError(f"inline_threshold must be >= 0, found {self.inline_threshold}")


def state_file_name(hint: str) -> str:
    """A unique, path-safe relative name for a state file from a hint like ``"orders/3/keyed"``.

    Each hint segment is reduced to safe characters (and a leading ``.``, ``-``, ``+``, ``=`` or ``~``
    to ``_``), then a random
    suffix keeps names unique even when several writers use the same hint.
    """
    segments = [_UNSAFE.sub("_", s)[:64] for s in hint.split("/") if s] or ["state"]
    # A segment must start with a letter, digit or '_' (storage.validation.safe_relative_path).
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
    ) -> None:
        self._store = store
        self._key = join_key(directory, relative_path)
        self._path = relative_path
        self._scope = scope
        self._threshold = options.inline_threshold
        self._on_open = on_open
        self._pending = bytearray()
        self._writer: ObjectWriter | None = None
        self._handle: StreamHandle | None = None
        self._aborted = False
        self._file = StateFileWriter(
            self._sink,
            compression=options.compression,
            level=options.compression_level,
            block_size=options.block_size,
        )

    @property
    def key(self) -> str:
        """The object key the stream writes to if it is not inlined."""
        return self._key

    def _sink(self, data: bytes | memoryview) -> None:
        if self._writer is not None:
            self._writer.write(data)
            return
        self._pending += data
        if len(self._pending) > self._threshold:
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
        except BaseException:
            self.abort()
            raise

    def tell(self) -> int:
        """Raw bytes written so far (operator-state element offsets)."""
        return self._file.tell()

    def start_block(self) -> int:
        """Cut the current block; returns the file offset of the next block (key-group offsets)."""
        try:
            return self._file.start_block()
        except BaseException:
            self.abort()
            raise

    def close(self) -> StreamHandle:
        """Finish the state file and make it durable; returns its handle. Idempotent."""
        if self._handle is not None:
            return self._handle
        if self._aborted:
            raise StorageError(f"state stream {self._store.describe(self._key)} was aborted")
        try:
            summary = self._file.finish()
            compression = self._file.compression
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
        except BaseException:
            self.abort()
            raise
        return self._handle

    def abort(self) -> None:
        """Discard the stream; nothing it wrote stays visible."""
        if self._aborted:
            return
        self._aborted = True
        self._pending = bytearray()
        if self._writer is not None:
            self._writer.abort()

    def __enter__(self) -> StateOutputStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
