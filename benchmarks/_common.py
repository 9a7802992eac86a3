"""What every benchmark script shares: result lines and their JSON, timing, the raw zstd-file baseline,
one-operator checkpoint metadata, operator probes and a local moto S3 server.

The JSON every script prints is ``{"benchmarks": [{"name", "value", "unit", "baseline", "ratio"}]}``,
ratio higher-is-better (a contract: docs/architecture.md#benchmark-json).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import zstandard

from keystate.storage import (
    CheckpointKind,
    CheckpointMetadata,
    KeyedStateHandle,
    OperatorState,
    StreamOptions,
    SubtaskState,
)

T = TypeVar("T")

MIB = 1 << 20
BLOCK = StreamOptions().block_size
"""Raw bytes per block of a state file (1 MiB): the baselines compress in blocks of this size too."""
LEVEL = StreamOptions().compression_level
"""The zstd level of state files, and of the baselines."""


# --- result lines and their JSON ----------------------------------------------------------------------------


def round_figure(x: float) -> float:
    """How figures are rounded in the JSON: one decimal from 100 on, 4 significant digits below."""
    return round(x, 1) if abs(x) >= 100 else float(f"{x:.4g}")


def figure(name: str, value: float, unit: str, baseline: float, ratio: float) -> dict[str, Any]:
    """One entry of the JSON's ``benchmarks`` list, its keys in their documented order.

    A non-finite number (a ratio against a zero baseline) is ``null``: ``Infinity`` is not JSON.
    """
    return {"name": name, "value": _finite(value), "unit": unit, "baseline": _finite(baseline), "ratio": _finite(ratio)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark line: our figure next to the raw reference measured in the same run."""

    name: str
    value: float
    baseline: float
    unit: str
    inverted: bool = False
    """A latency or duration: ratio = baseline / value, so that higher is still better."""
    decimals: int | None = None
    """Decimals of value and baseline in the JSON; None: :func:`round_figure`."""

    @property
    def ratio(self) -> float:
        if self.inverted:
            return self.baseline / self.value if self.value else float("inf")
        return self.value / self.baseline if self.baseline else 0.0

    def _rounded(self, x: float) -> float:
        return round_figure(x) if self.decimals is None else round(x, self.decimals)

    def to_dict(self) -> dict[str, Any]:
        return figure(
            self.name, self._rounded(self.value), self.unit, self._rounded(self.baseline), round(self.ratio, 3)
        )


def print_json(results: Iterable[Result | dict[str, Any]], **extra: Any) -> None:
    """Print ``{"benchmarks": [...], **extra}`` on one line; entries are results or :func:`figure` dicts."""
    entries = [r.to_dict() if isinstance(r, Result) else r for r in results]
    print(json.dumps({"benchmarks": entries, **extra}))


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds ``fn()`` took (``time.perf_counter``), and what it returned."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


# --- the raw baselines ---------------------------------------------------------------------------------------


def baseline_compressor() -> zstandard.ZstdCompressor:
    """zstd at the state files' level, one frame per block (content size in it, no checksum)."""
    return zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)


def compress_blocks(data: bytes, compressor: zstandard.ZstdCompressor) -> Iterator[bytes]:
    """``data`` in the blocks a state file holds, compressed the same way."""
    view = memoryview(data)
    for start in range(0, len(data), BLOCK):
        yield compressor.compress(view[start : start + BLOCK])


def write_blocks(path: Path, blocks: Iterable[bytes], *, fsync: bool) -> list[int]:
    """Write ``blocks`` one after the other to one plain file, fsynced if asked; returns their lengths."""
    lengths: list[int] = []
    with open(path, "wb") as f:
        for block in blocks:
            f.write(block)
            lengths.append(len(block))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return lengths


def keyed_checkpoint_metadata(
    job_id: str, checkpoint_id: int, uid: str, max_parallelism: int, handle: KeyedStateHandle
) -> CheckpointMetadata:
    """``_metadata`` of a checkpoint of one operator (parallelism 1) whose one subtask holds ``handle``."""
    operator = OperatorState(uid, 1, max_parallelism, subtasks=(SubtaskState(0, keyed=(handle,)),))
    return CheckpointMetadata(checkpoint_id, job_id, CheckpointKind.CHECKPOINT, int(time.time() * 1000), (operator,))


# --- jobs and servers --------------------------------------------------------------------------------------


class SharedProbe:
    """Facts the operators of one run report back. Operators are deep-copied per subtask; a probe is
    shared, not copied, so every copy reports to the same object."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with fake credentials in the environment; yields its URL."""
    from moto.server import ThreadedMotoServer

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
