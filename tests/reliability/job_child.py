"""A job process for the crash campaigns (``campaign.py``): run as a script, never collected by pytest.

Usage (with the repository root on ``PYTHONPATH``)::

    python tests/reliability/job_child.py ROOT OUT [--mode bounded|savepoint] [--kill POINT --nth N]
        [--flaky P] [--ballast MIB] [--inline BYTES] [--seed S]

ROOT is the checkpoint location and OUT the sink's location (paths or ``s3://bucket/prefix`` URIs;
S3 through ``AWS_ENDPOINT_URL``). The job (:func:`build_job`)::

    a-src (bounded, 4 splits, p=2) --hash--> a-count (keyed LMDB, p=2) --\\
                                                                          +--> sink (TransactionalFileSink, p=1)
    b-src (p=1) --> b-pass (p=1) --hash--> b-count (keyed LMDB, p=2) ----/

``a`` is fast and finishes early; ``b`` is slow: bounded (``--mode bounded``: the job ends by itself)
or unbounded (``--mode savepoint``: stopped with a drained stop-with-savepoint once ``a`` is recorded
fully finished and a few more checkpoints completed). Records are ``[branch, n, count]``: ``count``
is the running count of ``n``'s key in keyed state, so a lost or replayed state update shows.

The process restores from the latest completed checkpoint or savepoint under ROOT if there is one
(after a drained stop-with-savepoint it restores and stops again at once, so the sinks commit what
that savepoint holds). It checkpoints every 50 ms and prints, flushing each line: ``ready``,
``restored <id> <kind> <location>`` (or ``fresh``), ``armed <point>``, ``kill <point>`` right
before an armed kill, and at the end ``finished`` or ``savepoint <location>``.

Kill points (``--kill``, the ``--nth`` hit): every :data:`keystate.runtime.faults.POINTS` name, and the
storage points of :data:`STORAGE_POINTS` (a ``CRASH`` rule of ``keystate.storage.faults`` or, on S3,
``keystate.storage.s3faults``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from keystate.runtime import (
    CheckpointConfig,
    JobConfig,
    JobGraph,
    Operator,
    RestartStrategy,
    SequenceSource,
    TransactionalFileSink,
    faults,
    submit,
)
from keystate.runtime.sources import GeneratorSource
from keystate.statebackend.serializers import BytesSerializer
from keystate.statebackend.state import ListStateDescriptor
from keystate.storage import CheckpointKind, ObjectStore, PutMode, S3ObjectStore, open_storage
from keystate.storage.faults import Fault, FaultRule, FaultyObjectStore
from keystate.storage.retry import RetryPolicy
from keystate.storage.s3faults import S3FaultInjector, S3FaultRule
from tests.runtime.e2e_support import RunningCount

JOB_ID = "feedfacefeedfacefeedfacefeedface"
A_COUNT = 240
A_KEYS = 7
B_COUNT = 240
B_KEYS = 5
INTERVAL = 0.05
STOP_AFTER = 8
"""Savepoint mode: checkpoints that must complete after ``a`` finished before the job is stopped."""

STORAGE_POINTS = {
    "store.metadata.mid-write": "half of _metadata's bytes are written (a local temp file), then SIGKILL",
    "store.state.mid-write": "half of a state-file chunk is written, then SIGKILL",
    "store.state.before-complete": "a state file is fully written but not completed (linked / multipart completed)",
    "store.sink.mid-commit": "the sink's committed object is half written, then SIGKILL",
    "store.subsume.metadata-delete": "retention is about to delete a subsumed checkpoint's _metadata, then SIGKILL",
    "store.subsume.shared-delete": "the shared-state registry is about to delete shared files nothing needs "
    "(subsumed, or orphans at a restart), then SIGKILL",
    "s3.metadata.in-flight": "SIGKILL while the _metadata PUT is about to be sent (S3 only)",
    "s3.multipart.in-flight": "SIGKILL while an UploadPart of a multipart state upload is in flight (S3 only)",
}


def _say(line: str) -> None:
    print(line, flush=True)


class Ballast(Operator):
    """Forwards records; holds ``size`` incompressible bytes in operator list state, so every snapshot
    writes a state file larger than an S3 part (a multipart upload)."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def initialize_state(self) -> None:
        state = self.ctx.get_list_state(ListStateDescriptor[bytes](name="ballast", serializer=BytesSerializer()))
        if not self.size:
            state.clear()
        elif not state.get():
            rng = random.Random(self.size)
            state.update([rng.randbytes(1 << 20) for _ in range(self.size >> 20)])

    def process(self, record: Any, input_index: int) -> None:
        self.ctx.emit(record)


def build_job(
    mode: str, out: str, *, sink_store: Callable[[ObjectStore], ObjectStore] | None, ballast: int
) -> JobGraph:
    job = JobGraph("crash-campaign")
    a = job.source(SequenceSource(A_COUNT, splits=4, make=_a, rate=600.0), uid="a-src", parallelism=2)
    a_counts = a.key_by(_a_key).process(RunningCount(), uid="a-count", parallelism=2)
    b_source = SequenceSource(B_COUNT, splits=1, make=_b, rate=150.0) if mode == "bounded" else None
    b = job.source(b_source or GeneratorSource(_b, splits=1, rate=150.0), uid="b-src", parallelism=1)
    b_counts = b.transform(Ballast(ballast), uid="b-pass").key_by(_b_key)
    b_counted = b_counts.process(RunningCount(), uid="b-count", parallelism=2)
    sink = TransactionalFileSink(out, wrap_store=sink_store, retry=RetryPolicy(max_attempts=6, initial_backoff=0.01))
    job.operator(sink, uid="sink", inputs=[a_counts.rebalance(), b_counted.rebalance()], parallelism=1)
    return job


def _a(n: int) -> list[Any]:
    return ["a", n]


def _b(n: int) -> list[Any]:
    return ["b", n]


def _a_key(record: list[Any]) -> int:
    return int(record[1]) % A_KEYS


def _b_key(record: list[Any]) -> int:
    return int(record[1]) % B_KEYS


def _kill_here(name: str, context: dict[str, Any]) -> None:
    _say(f"kill {name}")
    faults.KILL(name, context)


class _Stores:
    """Wraps the checkpoint and sink stores: random throttling (``--flaky``) and the storage kill points."""

    def __init__(self, kill: str | None, nth: int, flaky: float, seed: int, ballast: int) -> None:
        self.kill, self.nth, self.flaky, self.seed, self.ballast = kill, nth, flaky, seed, ballast

    def _rules(self, sink: bool) -> list[FaultRule]:
        rules = []
        crash = {
            "store.metadata.mid-write": (False, "put", "*/_metadata"),
            "store.state.mid-write": (False, "write", "*.ksf"),
            "store.state.before-complete": (False, "close", "*.ksf"),
            "store.sink.mid-commit": (True, "put", "*/out/[!_]*.jsonl"),
            "store.subsume.metadata-delete": (False, "delete", "*/chk-*/_metadata"),
            "store.subsume.shared-delete": (False, "delete_many", "*/shared/*"),
        }.get(self.kill or "")
        if crash is not None and crash[0] == sink:
            mode = PutMode.CREATE if crash[1] in ("put", "write", "close") else None
            rules.append(FaultRule(Fault.CRASH, crash[1], key=crash[2], mode=mode, after=self.nth - 1))
        if self.flaky:
            ops = frozenset({"get", "get_range", "size", "exists", "put", "write", "close", "delete", "list_dirs"})
            for fault in (Fault.THROTTLE, Fault.INTERNAL_ERROR, Fault.TIMEOUT_AFTER_WRITE):
                rules.append(FaultRule(fault, ops, probability=self.flaky / 3))
        return rules

    def wrap(self, store: ObjectStore, *, sink: bool) -> ObjectStore:
        if isinstance(store, S3ObjectStore) and not sink:
            if self.ballast:  # parts of the minimum size, so the ballast is a multipart upload
                store = S3ObjectStore(store.bucket, client=store.client, part_size=5 << 20, upload_concurrency=2)
            s3_rule = {
                "s3.metadata.in-flight": S3FaultRule(Fault.CRASH, "PutObject", key="*/_metadata"),
                "s3.multipart.in-flight": S3FaultRule(Fault.CRASH, "UploadPart", after=self.nth - 1),
            }.get(self.kill or "")
            if s3_rule is not None:
                S3FaultInjector([s3_rule], seed=self.seed).install(store.client)
        rules = self._rules(sink)
        return FaultyObjectStore(store, rules, seed=self.seed + sink) if rules else store


async def main_async(args: argparse.Namespace) -> int:
    stores = _Stores(args.kill, args.nth, args.flaky, args.seed, args.ballast << 20)
    if args.kill in faults.POINTS:
        faults.arm(args.kill, _kill_here, nth=args.nth)
    if args.kill:
        _say(f"armed {args.kill}")
    latest = await asyncio.to_thread(lambda: open_storage(args.root).latest())
    stop_at_once = latest is not None and latest.metadata.properties.synchronous
    if latest is None:
        _say("fresh")
    else:
        _say(f"restored {latest.checkpoint_id} {latest.kind} {latest.location}")
    config = JobConfig(
        checkpoint=CheckpointConfig(
            interval=INTERVAL,
            storage=args.root,
            num_retained=2,
            incremental=True,  # LMDB's default too; chains of at most 3 deltas, so bases are rewritten often
            max_chain_length=3,
            inline_threshold=args.inline,
            timeout=10.0,
            tolerable_failed_checkpoints=1_000,
            wrap_store=lambda s: stores.wrap(s, sink=False),
            retry=RetryPolicy(max_attempts=6, initial_backoff=0.01),
        ),
        restart=RestartStrategy(max_attempts=3, delay=0.05),
        channel_capacity=4,
        batch_size=16,
    )
    graph = build_job(args.mode, args.out, sink_store=lambda s: stores.wrap(s, sink=True), ballast=args.ballast << 20)
    client = submit(graph, config, restore_from=latest, job_id=JOB_ID)
    _say("ready")
    if args.mode == "bounded" and not stop_at_once:
        result = await client.wait()
        if result.error is not None:
            raise result.error
        _say("finished")
        return 0
    finished_a: list[int] = []
    if latest is not None and all(op.fully_finished for op in latest.metadata.operators if op.uid.startswith("a-")):
        finished_a.append(latest.checkpoint_id)
    done = asyncio.Event()

    def on_checkpoint(checkpoint: Any) -> None:
        a_ops = [op for op in checkpoint.metadata.operators if op.uid.startswith("a-")]
        if all(op.fully_finished for op in a_ops):
            finished_a.append(checkpoint.checkpoint_id)
        if stop_at_once or len(finished_a) > STOP_AFTER:
            done.set()

    client.coordinator.listeners.append(on_checkpoint)
    if stop_at_once:
        done.set()
    waiter = asyncio.ensure_future(client.wait())
    stopper = asyncio.ensure_future(done.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if waiter.done():
        result = waiter.result()
        raise RuntimeError(f"the job ended before it was stopped: {result.status} {result.error}")
    savepoint = await client.stop_with_savepoint(drain=True)
    assert savepoint.kind is CheckpointKind.SAVEPOINT
    _say(f"savepoint {savepoint.location}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["bounded", "savepoint"], default="bounded")
    parser.add_argument("--kill", choices=sorted([*faults.POINTS, *STORAGE_POINTS]), default=None)
    parser.add_argument("--nth", type=int, default=1, help="kill on this hit of the point (1 = the first)")
    parser.add_argument("--flaky", type=float, default=0.0, help="probability of a transient fault per store call")
    parser.add_argument("--ballast", type=int, default=0, help="MiB of operator state in b-pass (multipart on S3)")
    parser.add_argument("--inline", type=int, default=256, help="inline threshold (small: real state files)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.environ.get("KEYSTATE_CHILD_DEBUG"):
        import logging

        logging.disable(logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
