"""Storage throughput: state written and read through keystate's checkpoint storage vs a raw baseline.

Each case moves the same deterministic state bytes (a mix of random bytes and structured records that
zstd level 1 compresses about 2-3x) two ways in the same run, and reports MB/s (10^6 bytes of raw,
uncompressed state per second) for both plus their ratio (ours / baseline, higher is better):

* local write: ``open_storage`` on a temp dir, ``begin_checkpoint``, one state stream written in 64 KiB
  chunks with ``start_block()`` at every key group (every 4 MiB), ``close``, ``commit`` of ``_metadata``.
  Baseline: the same 1 MiB blocks zstd-compressed at the same level, written to one plain file, fsynced
  (our store fsyncs, so the baseline does too). A second line runs both without fsync.
* local read: ``load`` + ``open_state(handle).iter_blocks()`` (every block and whole-file checksum
  verified). Baseline: plain file reads of the same compressed blocks + zstd decompress. Warm page cache
  for both: each reads the file it has just written.
* S3 write and read against moto's ``ThreadedMotoServer`` on 127.0.0.1 (started here). Baseline: compress
  the blocks, one plain boto3 ``put_object`` of the compressed bytes; ``get_object`` + decompress.

Each measurement is repeated (best of 3, best of 2 with ``--quick``); ours and the baseline alternate.
Run: ``python benchmarks/storage.py [--quick] [--json]`` (or ``python -m benchmarks.storage`` from the repo root).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is benchmarks/ and this module would shadow the `storage` package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import random
import struct
import tempfile
import time
import uuid
from typing import Any, Protocol

import boto3
import botocore.config
import zstandard

from benchmarks._common import (
    BLOCK,
    LEVEL,
    MIB,
    Result,
    baseline_compressor,
    compress_blocks,
    keyed_checkpoint_metadata,
    moto_endpoint,
    print_json,
    timed,
    write_blocks,
)
from keystate.storage import (
    CheckpointStorage,
    CompletedCheckpoint,
    KeyedStateHandle,
    KeyGroupRange,
    LocalObjectStore,
    open_storage,
)

FULL_MIB = 256
QUICK_MIB = 32
WRITE_CHUNK = 64 * 1024
"""Bytes per ``stream.write`` call (a keyed backend writes a few tens of KiB at a time)."""
KEY_GROUP_BYTES = 4 * MIB
"""Raw bytes per key group: ``start_block()`` is called at each boundary, as a keyed backend does."""
JOB_ID = "be9c4a11" * 4
SEED = 20240611
BUCKET = "keystate-bench"

# >H key group | >Q key | >I value length, then the value: the layout of one entry in a keyed snapshot.
_RECORD = struct.Struct(">HQI")
_NOISE = 10
"""Random (incompressible) bytes at the start of each value; tunes the data to about 2.3x under zstd -1."""


def make_state(size: int, seed: int = SEED) -> bytes:
    """``size`` bytes of deterministic, state-like data: records of a key and a value whose first bytes
    are random and whose rest is one of 256 small JSON-ish templates."""
    rng = random.Random(seed)
    words = [b"user", b"session", b"click", b"view", b"cart", b"order", b"pay", b"ship", b"refund", b"login"]
    templates = [
        b'{"ev":"%s","n":%d,"ok":%s}' % (rng.choice(words), rng.randrange(1000), rng.choice([b"true", b"false"]))
        for _ in range(256)
    ]
    pack = _RECORD.pack
    out = bytearray()
    key = 0
    per_round = 1024
    while len(out) < size:
        noise = rng.randbytes(_NOISE * per_round)
        picks = rng.randbytes(per_round)
        parts: list[bytes] = []
        for i in range(per_round):
            value = noise[_NOISE * i : _NOISE * (i + 1)] + templates[picks[i]]
            parts.append(pack((key >> 14) & 0x7F, (key * 2654435761) & 0xFFFFFFFFFFFF, len(value)))
            parts.append(value)
            key += 1
        out += b"".join(parts)
    return bytes(out[:size])


class Case(Protocol):
    """One side of a comparison. ``prepare_write`` (untimed) removes what the previous write left."""

    def prepare_write(self) -> None: ...

    def write(self) -> None: ...

    def read(self) -> None: ...


def _race(name: str, size: int, repeats: int, ours: Case, baseline: Case, *, read: bool) -> Result:
    """Time ``write`` (or ``read``) of ours and the baseline ``repeats`` times, alternating; MB/s of the
    best run of each."""
    best_ours = best_base = float("inf")
    for _ in range(repeats):
        for case, is_ours in ((ours, True), (baseline, False)):
            if read:
                elapsed, _ = timed(case.read)
            else:
                case.prepare_write()
                elapsed, _ = timed(case.write)
            if is_ours:
                best_ours = min(best_ours, elapsed)
            else:
                best_base = min(best_base, elapsed)
    return Result(name, size / best_ours / 1e6, size / best_base / 1e6, "MB/s", decimals=1)


# --- ours: through the storage layer ------------------------------------------------------------------


def write_checkpoint(storage: CheckpointStorage, checkpoint_id: int, data: bytes) -> CompletedCheckpoint:
    """Write ``data`` as one keyed state stream of checkpoint ``checkpoint_id`` and commit ``_metadata``."""
    writer = storage.begin_checkpoint(JOB_ID, checkpoint_id)
    try:
        view = memoryview(data)
        offsets: list[int] = []
        with writer.open_stream("bench/0/keyed") as stream:
            for start in range(0, len(data), WRITE_CHUNK):
                if start % KEY_GROUP_BYTES == 0:
                    offsets.append(stream.start_block())
                stream.write(view[start : start + WRITE_CHUNK])
            handle = stream.close()
        keyed = KeyedStateHandle(KeyGroupRange(0, len(offsets) - 1), tuple(offsets), handle)
        return writer.commit(keyed_checkpoint_metadata(JOB_ID, checkpoint_id, "bench", max(128, len(offsets)), keyed))
    except BaseException:
        writer.abort()
        raise


def read_checkpoint(storage: CheckpointStorage, directory: str) -> int:
    """Load a checkpoint and read every state file block by block, fully verified; returns raw bytes."""
    completed = storage.load(directory)
    total = 0
    for handle in completed.metadata.handles():
        for block in completed.open_state(handle).iter_blocks():
            total += len(block)
    return total


class OursCase:
    """Writes checkpoint after checkpoint into one storage, keeping only the newest."""

    def __init__(self, storage: CheckpointStorage, data: bytes) -> None:
        self.storage = storage
        self.data = data
        self.latest: CompletedCheckpoint | None = None
        self._next_id = 1

    def prepare_write(self) -> None:
        if self.latest is not None:
            self.storage.discard(self.latest)
            self.latest = None

    def write(self) -> None:
        self.latest = write_checkpoint(self.storage, self._next_id, self.data)
        self._next_id += 1

    def read(self) -> None:
        assert self.latest is not None
        total = read_checkpoint(self.storage, self.latest.directory)
        if total != len(self.data):
            raise RuntimeError(f"read {total} bytes back, wrote {len(self.data)}")

    def check(self) -> None:
        """Untimed: the bytes read back are the bytes written."""
        assert self.latest is not None
        handle = next(self.latest.metadata.handles())
        if self.latest.open_state(handle).read_all() != self.data:
            raise RuntimeError(f"{self.latest.location}: state read back differs from the state written")


# --- baselines: zstd + plain file / plain boto3 ---------------------------------------------------------


class LocalBaseline:
    """zstd-compressed blocks written to one plain file (fsynced or not) and read back."""

    def __init__(self, root: Path, data: bytes, *, fsync: bool) -> None:
        self.path = root / ("baseline.zst" if fsync else "baseline-nofsync.zst")
        self.data = data
        self.fsync = fsync
        self.lengths: list[int] = []
        self._compressor = baseline_compressor()
        self._decompressor = zstandard.ZstdDecompressor()

    def prepare_write(self) -> None:
        self.path.unlink(missing_ok=True)

    def write(self) -> None:
        self.lengths = write_blocks(self.path, compress_blocks(self.data, self._compressor), fsync=self.fsync)

    def read(self) -> None:
        total = 0
        with open(self.path, "rb") as f:
            for n in self.lengths:
                total += len(self._decompressor.decompress(f.read(n)))
        if total != len(self.data):
            raise RuntimeError(f"baseline read {total} bytes back, wrote {len(self.data)}")


class S3Baseline:
    """zstd-compressed blocks uploaded with one plain ``put_object``; ``get_object`` + decompress."""

    def __init__(self, client: Any, data: bytes) -> None:
        self.client = client
        self.data = data
        self.key = ""
        self.lengths: list[int] = []
        self._compressor = baseline_compressor()
        self._decompressor = zstandard.ZstdDecompressor()

    def prepare_write(self) -> None:
        if self.key:
            self.client.delete_object(Bucket=BUCKET, Key=self.key)
            self.key = ""

    def write(self) -> None:
        blocks = list(compress_blocks(self.data, self._compressor))
        key = f"baseline/state-{uuid.uuid4().hex}.zst"
        self.client.put_object(Bucket=BUCKET, Key=key, Body=b"".join(blocks))
        self.key = key
        self.lengths = [len(b) for b in blocks]

    def read(self) -> None:
        body = self.client.get_object(Bucket=BUCKET, Key=self.key)["Body"]
        try:
            stored = memoryview(body.read())
        finally:
            body.close()
        total = 0
        pos = 0
        for n in self.lengths:
            total += len(self._decompressor.decompress(stored[pos : pos + n]))
            pos += n
        if total != len(self.data):
            raise RuntimeError(f"baseline read {total} bytes back, wrote {len(self.data)}")


# --- the cases ----------------------------------------------------------------------------------------


def local_cases(data: bytes, repeats: int, parent: str | None) -> tuple[list[Result], int]:
    """Local write (fsync), local write (no fsync) and local read; also returns the stored size."""
    with tempfile.TemporaryDirectory(prefix="keystate-bench-", dir=parent) as tmp:
        root = Path(tmp)
        ours = OursCase(open_storage(str(root / "ours")), data)
        base = LocalBaseline(root, data, fsync=True)
        write = _race("local write (fsync)", len(data), repeats, ours, base, read=False)
        read = _race("local read (verified)", len(data), repeats, ours, base, read=True)
        ours.check()
        assert ours.latest is not None
        stored = next(ours.latest.metadata.handles()).size

        ours_nofsync = OursCase(CheckpointStorage(LocalObjectStore(root / "ours-nofsync", fsync=False)), data)
        base_nofsync = LocalBaseline(root, data, fsync=False)
        nofsync = _race("local write (no fsync, both)", len(data), repeats, ours_nofsync, base_nofsync, read=False)
    return [write, nofsync, read], stored


def s3_cases(data: bytes, repeats: int) -> list[Result]:
    with moto_endpoint() as endpoint:
        # Our state files are multipart objects, whose composite checksums botocore does not validate
        # on GET; the baseline's single-PUT object has a full-object CRC32 that it would validate. Skip
        # that validation so both reads do the same work (uploads compute CRC32 on both sides alike).
        config = botocore.config.Config(response_checksum_validation="when_required")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
        client.create_bucket(Bucket=BUCKET)
        ours = OursCase(open_storage(f"s3://{BUCKET}/ours", endpoint_url=endpoint), data)
        base = S3Baseline(client, data)
        write = _race("s3 write (moto)", len(data), repeats, ours, base, read=False)
        read = _race("s3 read (moto, verified)", len(data), repeats, ours, base, read=True)
        ours.check()
    return [write, read]


# --- output -------------------------------------------------------------------------------------------


def render_table(results: list[Result], size: int, stored: int, repeats: int, elapsed: float) -> str:
    lines = [
        f"keystate storage benchmark: {size // MIB} MiB of state, zstd level {LEVEL} -> {stored / MIB:.1f} MiB "
        f"({size / stored:.2f}x), {BLOCK // MIB} MiB blocks, {WRITE_CHUNK // 1024} KiB writes, a key group "
        f"every {KEY_GROUP_BYTES // MIB} MiB; best of {repeats}; MB/s = 10^6 raw bytes per second",
        "",
        f"{'benchmark':<30} {'ours MB/s':>10} {'baseline MB/s':>14} {'ratio':>7}",
    ]
    for r in results:
        lines.append(f"{r.name:<30} {r.value:>10.1f} {r.baseline:>14.1f} {r.ratio:>7.3f}")
    lines += [
        "",
        "baselines: local write = zstd blocks + one plain file write + fsync (no fsync on the no-fsync line);",
        "           local read = plain file reads + zstd decompress; s3 = zstd + one put_object / get_object",
        f"finished in {elapsed:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Throughput of keystate checkpoint storage vs a raw baseline.")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MIB} MiB, best of 2 (under 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--size-mib", type=int, default=None, help="state size in MiB (overrides the default)")
    parser.add_argument("--dir", default=None, help="parent directory for the local files (default: the temp dir)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) cases")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    size_mib = args.size_mib or (QUICK_MIB if args.quick else FULL_MIB)
    if size_mib < 1:
        parser.error("--size-mib must be at least 1")
    repeats = 2 if args.quick else 3
    data = make_state(size_mib * MIB)

    results, stored = local_cases(data, repeats, args.dir)
    if not args.no_s3:
        results += s3_cases(data, repeats)
    elapsed = time.perf_counter() - started

    if args.json:
        print_json(results)
    else:
        print(render_table(results, len(data), stored, repeats, elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
