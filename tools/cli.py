"""The ``keystate`` command line (and ``inspect-checkpoint``, which is ``keystate inspect``).

Each command parses its arguments, calls one library function that returns data, and renders it as a
table for people or ``--json`` for machines. Exit codes (DESIGN.md section 8): 0 success/compatible;
1 incompatible (check-restore) or verification failed; 2 bad usage or unreadable input, with one line
on stderr and no traceback (set ``KEYSTATE_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from keystate.storage.errors import KeystateError
from keystate.storage.topology import Topology
from keystate.tools.errors import UsageError

__all__ = ["console_main", "inspect_console_main", "inspect_main", "main"]

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

_EXAMPLES = {
    "inspect": """examples:
  keystate inspect ./checkpoints                      newest checkpoint or savepoint under a root
  keystate inspect ./checkpoints/<job>/chk-12 --json  one checkpoint, as JSON
  keystate inspect s3://bucket/ckpt/<job> --verify    read every state file, check sizes and checksums
  keystate inspect ./checkpoints --operator totals    per-subtask handles of one operator
  keystate inspect ./checkpoints --graph dot | dot -Tpng > graph.png""",
    "list": """examples:
  keystate list ./checkpoints
  keystate list s3://bucket/ckpt --json --endpoint-url http://127.0.0.1:9000""",
    "dump": """examples:
  keystate dump ./checkpoints --operator click-counts
  keystate dump ./checkpoints --operator click-counts --state count --key-group 12
  keystate dump ./checkpoints --operator sink --unsafe-unpickle   (only for checkpoints you trust)""",
    "check-restore": """examples:
  keystate check-restore s3://bucket/ckpt/<job> --topology new-topology.json
  keystate check-restore ./checkpoints --job myjobs.orders:build_job --json
exit code: 0 compatible, 1 incompatible, 2 unreadable checkpoint or topology""",
    "topology": """examples:
  keystate topology myjobs.orders:build_job -o topology.json""",
    "demo": """examples:
  keystate demo --duration 10
  keystate demo --checkpoints s3://bucket/demo   (Ctrl-C stops it with a drained savepoint)""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _progress(enabled: bool) -> Callable[[int, int, int], None] | None:
    if not enabled:
        return None
    started = time.monotonic()

    def show(done: int, total: int, nbytes: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        rate = nbytes / max(time.monotonic() - started, 1e-6) / (1 << 20)
        sys.stderr.write(
            f"\rverifying [{'#' * filled}{'.' * (width - filled)}] {done}/{total} handles {rate:.1f} MiB/s"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# --- commands ----------------------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace) -> int:
    from keystate.tools.render import render_graph, render_operator, render_summary, render_verify
    from keystate.tools.summary import inspect_checkpoint, verify_checkpoint

    if args.graph and args.json:
        raise UsageError("--graph and --json cannot be combined")
    summary = inspect_checkpoint(args.location, endpoint_url=args.endpoint_url)
    if args.operator is not None and summary.checkpoint.metadata.operator(args.operator) is None:
        known = ", ".join(o.uid for o in summary.operators)
        raise UsageError(
            f"no operator {args.operator!r} in checkpoint {summary.checkpoint.checkpoint_id} (it has {known})"
        )
    report = None
    if args.verify:
        report = verify_checkpoint(summary.checkpoint, _progress(sys.stderr.isatty() and not args.json))
    if args.json:
        doc = summary.to_dict()
        if report is not None:
            doc["verification"] = report.to_dict()
        _emit_json(doc)
    elif args.graph:
        _print(render_graph(summary, args.graph))
    else:
        _print(render_summary(summary))
        if args.operator is not None:
            _print("")
            _print(render_operator(summary, args.operator))
        if report is not None:
            _print("")
            _print(render_verify(report))
    return EXIT_FAILED if report is not None and not report.ok else EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    args.verify, args.graph, args.operator = True, None, None
    return _cmd_inspect(args)


def _cmd_list(args: argparse.Namespace) -> int:
    from keystate.tools.render import render_listing
    from keystate.tools.summary import list_checkpoints, now_ms

    rows = list_checkpoints(args.root, endpoint_url=args.endpoint_url)
    now = now_ms()
    if args.json:
        _emit_json({"root": args.root, "checkpoints": [r.to_dict(now) for r in rows]})
    else:
        _print(render_listing(rows, now))
    return EXIT_OK


def _cmd_dump(args: argparse.Namespace) -> int:
    from keystate.tools.dump import dump_state
    from keystate.tools.summary import load_location

    checkpoint = load_location(args.location, endpoint_url=args.endpoint_url)
    for record in dump_state(
        checkpoint, args.operator, state=args.state, key_group=args.key_group, unsafe=args.unsafe_unpickle
    ):
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (a damaged snapshot's state name): escape it
                line = json.dumps(record, separators=(",", ":"))
        sys.stdout.write(line + "\n")
    op = checkpoint.metadata.operator(args.operator)
    if op is not None and op.finished_subtasks:
        # Finished tasks record no state (FLIP-147): say why they print nothing, on stderr (stdout stays JSON lines).
        which = "fully finished" if op.fully_finished else f"partially finished (subtasks {op.finished_subtasks})"
        sys.stderr.write(
            f"note: operator {printable(op.uid)!r} is {which} in checkpoint {checkpoint.checkpoint_id}; "
            "finished subtasks have no state to dump\n"
        )
    return EXIT_OK


def load_job_topology(spec: str) -> Topology:
    """The topology of ``module:function``, which returns a ``JobGraph`` or a ``Topology``.

    Raises:
        UsageError: the spec is malformed, the import fails, or the result is not a job graph.
    """
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"--job {spec!r} must look like 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"cannot import {module_name!r} for --job: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"{module_name!r} has no function {func_name!r}")
    try:
        result = func()
    except Exception as exc:
        raise UsageError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(result, Topology):
        return result
    topology = getattr(result, "topology", None)
    if callable(topology):
        found = topology()
        if isinstance(found, Topology):
            return found
    raise UsageError(f"{spec}() returned {type(result).__name__}; it must return a runtime.JobGraph or a Topology")


def _read_topology(args: argparse.Namespace) -> Topology:
    if args.job is not None:
        return load_job_topology(args.job)
    path = Path(args.topology)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read topology file {str(path)!r}: {exc.strerror or exc}") from exc
    return Topology.from_json_bytes(data, str(path))


def _cmd_check_restore(args: argparse.Namespace) -> int:
    from keystate.runtime.restore_rules import check_restore
    from keystate.tools.render import render_report
    from keystate.tools.summary import load_location

    checkpoint = load_location(args.location, endpoint_url=args.endpoint_url)
    topology = _read_topology(args)
    report = check_restore(checkpoint.metadata, topology, allow_non_restored_state=args.allow_non_restored_state)
    if args.json:
        doc = report.to_dict()
        doc["location"] = checkpoint.location
        _emit_json(doc)
    else:
        _print(render_report(report, len(topology.operators)))
    return EXIT_OK if report.compatible else EXIT_FAILED


def _cmd_topology(args: argparse.Namespace) -> int:
    data = load_job_topology(args.job).to_json_bytes()
    if args.output in (None, "-"):
        sys.stdout.write(data.decode())
    else:
        try:
            Path(args.output).write_bytes(data)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output!r}: {exc.strerror or exc}") from exc
        print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from keystate.runtime.demo import run_demo

    if args.duration is not None and args.duration <= 0:
        raise UsageError(f"--duration must be positive, found {args.duration}")
    asyncio.run(run_demo(args.checkpoints, duration=args.duration))
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------------


def _storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (overrides AWS_ENDPOINT_URL)")


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("location", help="checkpoint/savepoint directory, its _metadata, a job directory or a root")
    p.add_argument("--json", action="store_true", help="one JSON object (DESIGN.md section 8)")
    p.add_argument("--verify", action="store_true", help="read every state file; exit 1 on any mismatch")
    p.add_argument("--operator", metavar="UID", help="also show per-subtask handles of this operator")
    p.add_argument(
        "--graph", nargs="?", const="mermaid", choices=["mermaid", "dot"], help="print the topology as a graph"
    )
    _storage_options(p)


def build_parser(prog: str = "keystate") -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=prog, description="keystate: Flink-grade state and checkpoints for Python stream processors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text, epilog=_EXAMPLES.get(name), formatter_class=fmt
        )

    p = add("inspect", "summarize a checkpoint or savepoint")
    _add_inspect_args(p)
    p.set_defaults(run=_cmd_inspect)

    p = add("verify", "read every state file of a checkpoint and check sizes and checksums (= inspect --verify)")
    p.add_argument("location")
    p.add_argument("--json", action="store_true")
    _storage_options(p)
    p.set_defaults(run=_cmd_verify)

    p = add("list", "list completed checkpoints and savepoints under a root, newest first")
    p.add_argument("root")
    p.add_argument("--json", action="store_true")
    _storage_options(p)
    p.set_defaults(run=_cmd_list)

    p = add("dump", "print an operator's keyed and operator state as JSON lines")
    p.add_argument("location")
    p.add_argument("--operator", required=True, metavar="UID")
    p.add_argument("--state", metavar="NAME", help="only this state")
    p.add_argument("--key-group", type=int, metavar="N", help="only this key group (keyed state)")
    p.add_argument(
        "--unsafe-unpickle", action="store_true", help="decode pickled values (runs code from the checkpoint!)"
    )
    _storage_options(p)
    p.set_defaults(run=_cmd_dump)

    p = add("check-restore", "check that a checkpoint can be restored into a new job topology (CI gate)")
    p.add_argument("location")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--topology", metavar="FILE", help="topology file (JSON, DESIGN.md section 8)")
    source.add_argument("--job", metavar="MODULE:FUNCTION", help="import a function returning a JobGraph")
    p.add_argument("--allow-non-restored-state", action="store_true", help="allow dropping state of removed operators")
    p.add_argument("--json", action="store_true")
    _storage_options(p)
    p.set_defaults(run=_cmd_check_restore)

    p = add("topology", "write the topology file of a job graph")
    p.add_argument("job", metavar="MODULE:FUNCTION")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(run=_cmd_topology)

    p = add("demo", "run the demo job (ends with stop-with-savepoint --drain)")
    p.add_argument("--checkpoints", default="./checkpoints", metavar="URI", help="checkpoint location")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="run this long (default: until Ctrl-C)")
    p.set_defaults(run=_cmd_demo)
    return parser


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x09, 0x0A)} | {
    c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def printable(text: str) -> str:
    """Text with control characters (terminal escapes, bidi overrides) shown as escapes: names and
    paths in checkpoints are untrusted and must not drive the user's terminal."""
    return text.translate(_CONTROL)


def _print(text: str) -> None:
    sys.stdout.write(printable(text) + "\n")


def _one_line(exc: BaseException) -> str:
    return printable(" ".join(str(exc).split())) or type(exc).__name__


def run(argv: list[str] | None = None, prog: str = "keystate", parser: argparse.ArgumentParser | None = None) -> int:
    """Run a command; returns the exit code (never raises, except for SystemExit from argparse)."""
    args = (parser or build_parser(prog)).parse_args(argv)
    try:
        code: int = args.run(args)
    except KeystateError as exc:
        if os.environ.get("KEYSTATE_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("KEYSTATE_DEBUG"):
            raise
        sys.stderr.write(
            f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (set KEYSTATE_DEBUG=1 for a traceback)\n"
        )
        return EXIT_ERROR
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keystate`` console script."""
    return run(argv)


def inspect_main(argv: list[str] | None = None) -> int:
    """Entry point of ``inspect-checkpoint``: the same as ``keystate inspect``."""
    parser = _Parser(prog="inspect-checkpoint", description="summarize a checkpoint or savepoint (= keystate inspect)",
                     epilog=_EXAMPLES["inspect"].replace("keystate inspect", "inspect-checkpoint"),
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_inspect_args(parser)
    parser.set_defaults(run=_cmd_inspect)
    return run(argv, "inspect-checkpoint", parser)


def console_main() -> NoReturn:
    sys.exit(main())


def inspect_console_main() -> NoReturn:
    sys.exit(inspect_main())


if __name__ == "__main__":
    console_main()
