"""The ``keystate`` command line (and ``inspect-checkpoint``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from storage.errors import KeystateError


def _demo(args: argparse.Namespace) -> int:
    from runtime.demo import run_demo

    asyncio.run(run_demo(args.checkpoints, duration=args.duration))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keystate", description="keystate: state and checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo job")
    demo.add_argument("--checkpoints", default="./checkpoints", help="checkpoint location (path or URI)")
    demo.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    args = parser.parse_args(argv)
    try:
        return int(_demo(args))
    except KeystateError as exc:
        print(f"keystate: error: {exc}", file=sys.stderr)
        return 2


def inspect_main() -> int:
    print("inspect-checkpoint: not yet available", file=sys.stderr)
    return 2
