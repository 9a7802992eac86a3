"""The ``keystate`` command line (and ``inspect-checkpoint``)."""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from storage import (
    CheckpointKind,
    CheckpointMetadata,
    InputEdge,
    KeyedStateHandle,
    KeyGroupRange,
    KeystateError,
    OperatorState,
    Partitioning,
    SubtaskState,
    open_storage,
)


def _demo(args: argparse.Namespace) -> int:
    """Storage-layer example until the runtime lands: writes checkpoints of a two-operator job."""
    storage = open_storage(args.checkpoints)
    job_id = uuid.uuid4().hex
    deadline = time.monotonic() + args.duration
    checkpoint_id = 0
    print(
        f"example job {job_id}: writing checkpoints to {storage.location} (storage layer only; "
        "the runtime demo replaces this)"
    )
    while time.monotonic() < deadline:
        checkpoint_id += 1
        writer = storage.begin_checkpoint(job_id, checkpoint_id)
        with writer.open_stream("totals/0/keyed") as stream:
            offsets = []
            for kg in range(128):
                offsets.append(stream.start_block())
                stream.write(f"key-group {kg} at checkpoint {checkpoint_id}\n".encode() * 50)
            handle = stream.close()
        metadata = CheckpointMetadata(
            checkpoint_id, job_id, CheckpointKind.CHECKPOINT, int(time.time() * 1000),
            (OperatorState("orders", 1, 128),
             OperatorState("totals", 1, 128, (InputEdge("orders", Partitioning.HASH),),
                           subtasks=(SubtaskState(0, keyed=(KeyedStateHandle(KeyGroupRange(0, 127),
                                                                              tuple(offsets), handle),)),))),
        )  # fmt: skip
        completed = writer.commit(metadata)
        print(f"  checkpoint {checkpoint_id} complete: {completed.location} ({handle.size} bytes)")
        time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keystate", description="keystate: state and checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo job")
    demo.add_argument("--checkpoints", default="./checkpoints", help="checkpoint location (path or URI)")
    demo.add_argument("--duration", type=float, default=5.0, help="seconds to run")
    args = parser.parse_args(argv)
    try:
        return int(_demo(args))
    except KeystateError as exc:
        print(f"keystate: error: {exc}", file=sys.stderr)
        return 2


def inspect_main() -> int:
    print("inspect-checkpoint: not yet available", file=sys.stderr)
    return 2
