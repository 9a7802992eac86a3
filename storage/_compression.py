"""Helper threads that compress and hash state-file blocks (``keystate.storage.statefile_io.StateFileWriter``)."""

from __future__ import annotations

import queue
import threading
import weakref

import zstandard

from keystate.storage.errors import StateFileError
from keystate.storage.format.statefile import encode_block, zstd_compressor

__all__ = ["BlockHelpers"]


class BlockHelpers:
    """Helper threads that compress and hash blocks while the caller goes on encoding.

    zstd and xxh3 release the GIL, so this overlaps them with the caller's Python work. Blocks are
    numbered as they are cut; the helpers post ``(number, stored, raw length, xxh3, error)`` and the
    writer emits them strictly in number order from the caller's thread (the sink is never called from
    a helper). The helpers hold no reference to the writer: a writer dropped without ``finish`` or
    ``abort`` stops them through a finalizer.
    """

    def __init__(self, level: int, threads: int) -> None:
        self.todo: queue.SimpleQueue[tuple[int, memoryview] | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self.ready: dict[int, _Done] = {}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=_compress_blocks,
                args=(zstd_compressor(level), self.todo, self.done, self.stop),
                name=f"keystate-statefile-compress-{i}",
                daemon=True,
            )
            for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()
        self._finalizer = weakref.finalize(self, _stop_helpers, self.todo, self.stop, len(self.threads))

    def next_done(self) -> _Done:
        """The next finished block, waiting for one (raises if every helper is gone)."""
        while True:
            try:
                return self.done.get(timeout=1.0)
            except queue.Empty:
                if not any(t.is_alive() for t in self.threads):
                    raise StateFileError("state file compression threads exited with blocks in flight") from None

    def shutdown(self, *, discard: bool) -> None:
        """Stop and join the helpers (``discard``: skip blocks not yet compressed)."""
        if discard:
            self.stop.set()
        self._finalizer()
        for thread in self.threads:
            thread.join()


_Done = tuple[int, bytes | memoryview, int, int, BaseException | None]  # block number, stored, raw length, xxh3, error


def _compress_blocks(
    compressor: zstandard.ZstdCompressor,
    todo: queue.SimpleQueue[tuple[int, memoryview] | None],
    done: queue.SimpleQueue[_Done],
    stop: threading.Event,
) -> None:
    while (item := todo.get()) is not None:
        if stop.is_set():
            continue  # aborted: drop the rest
        number, raw = item
        try:
            stored, digest = encode_block(raw, compressor)  # the frame, or ``raw`` itself if that is smaller
            done.put((number, stored, len(raw), digest, None))
        except BaseException as exc:  # handed to the writer's thread, which raises it
            done.put((number, b"", 0, 0, exc))
        del item, raw


def _stop_helpers(todo: queue.SimpleQueue[tuple[int, memoryview] | None], stop: threading.Event, n: int) -> None:
    for _ in range(n):
        todo.put(None)
