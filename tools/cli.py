"""The ``keystate`` command line (and ``inspect-checkpoint``, which is ``keystate inspect``).

Each command parses its arguments, calls one library function that returns data, and renders it as a
table for people or ``--json`` for machines. Exit codes (a contract, docs/architecture.md#command-line-and-exit-codes):
0 success/compatible; 1 incompatible (check-restore) or verification failed; 2 bad usage or unreadable
input, with one line on stderr and no traceback (set ``KEYSTATE_DEBUG=1`` to see one); 3 the checkpoint
was discarded (by retention) while it was read: not damage, read the newer one the line names.
Warnings of the library (e.g. that an unreachable S3 endpoint is being retried) go to stderr, one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from keystate.storage.errors import CheckpointDiscardedError, KeystateError
from keystate.storage.format.topology import Topology
from keystate.tools.errors import UsageError

__all__ = ["ERROR_KINDS", "console_main", "error_kind", "inspect_console_main", "inspect_main", "main"]

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_DISCARDED = 0, 1, 2, 3

_EXAMPLES = {
    "inspect": """examples:
  keystate inspect ./checkpoints                      newest checkpoint or savepoint under a root
  keystate inspect ./checkpoints/<job>/chk-12 --json  one checkpoint, as JSON
  keystate inspect s3://bucket/ckpt/<job> --verify    read every state file, check sizes and checksums
  keystate inspect ./checkpoints --operator totals    per-subtask handles of one operator
  keystate inspect ./checkpoints --graph dot | dot -Tpng > graph.png
  keystate inspect s3://bucket/flink-ck/<jobId>       an Apache Flink checkpoint (detected; docs/flink.md)""",
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
  keystate check-restore ./checkpoints --job myjobs.orders:build_job --verify   (also read every state file)
exit code: 0 compatible, 1 incompatible (or, with --verify, damaged state), 2 unreadable checkpoint or topology""",
    "topology": """examples:
  keystate topology myjobs.orders:build_job -o topology.json""",
    "demo": """examples:
  keystate demo --duration 10
  keystate demo --checkpoints s3://bucket/demo   (Ctrl-C stops it with a drained savepoint)
  keystate demo --executor ray --duration 10     (every subtask a Ray actor on a local Ray cluster)""",
}


class _UsageExit(SystemExit):
    """argparse refused the command line (exit 2); ``message`` is what it said, for ``--json``'s error object."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_ERROR)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        line = f"{message} (see --help)"
        sys.stderr.write(f"{self.prog}: error: {line}\n")
        raise _UsageExit(line)


def _progress(enabled: bool) -> Callable[[int, int, int], None] | None:
    if not enabled:
        return None
    from keystate.tools.render import plural

    started = time.monotonic()

    def show(done: int, total: int, nbytes: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        rate = nbytes / max(time.monotonic() - started, 1e-6) / (1 << 20)
        sys.stderr.write(
            f"\rverifying [{'#' * filled}{'.' * (width - filled)}] {done}/{plural(total, 'handle')} {rate:.1f} MiB/s"
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
    if args.operator is not None and summary.find_operator(args.operator) is None:
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
    from keystate.storage.flink_checkpoints import FlinkCheckpoint
    from keystate.tools.dump import dump_state
    from keystate.tools.summary import load_location

    checkpoint = load_location(args.location, endpoint_url=args.endpoint_url)
    if isinstance(checkpoint, FlinkCheckpoint):
        raise UsageError(
            f"{checkpoint.location} is an Apache Flink {checkpoint.kind}: its state is written by Flink's "
            "serializers (Java, Kryo, RocksDB), which keystate never runs; dump reads keystate checkpoints only "
            "(read Flink state with Flink's State Processor API)"
        )
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
    from keystate.tools.render import render_report, render_verify
    from keystate.tools.summary import load_location, verify_checkpoint

    checkpoint = load_location(args.location, endpoint_url=args.endpoint_url)
    topology = _read_topology(args)
    report = check_restore(checkpoint.metadata, topology, allow_non_restored_state=args.allow_non_restored_state)
    # --verify: the rules say whether the topology fits, reading every handle whether the state is there
    # and decodes as a restore decodes it; the gate passes only if both do.
    verification = None
    if args.verify:
        verification = verify_checkpoint(checkpoint, _progress(sys.stderr.isatty() and not args.json))
    if args.json:
        doc = report.to_dict()
        doc["location"] = checkpoint.location
        if verification is not None:
            doc["verification"] = verification.to_dict()
        _emit_json(doc)
    else:
        kind = checkpoint.kind.value
        _print(render_report(report, len(topology.operators), kind=kind, location=checkpoint.location))
        if verification is not None:
            _print(render_verify(verification))
    passed = report.compatible and (verification is None or verification.ok)
    return EXIT_OK if passed else EXIT_FAILED


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
    # The runtime (asyncio, tasks, the coordinator) loads only when the demo runs: every other command
    # is a short-lived read of a checkpoint that must start fast.
    import asyncio

    from keystate.runtime.demo import run_demo

    if args.duration is not None and args.duration <= 0:
        raise UsageError(f"--duration must be positive, found {args.duration}")
    if args.ray_connect_timeout is not None and not args.ray_connect_timeout > 0:
        raise UsageError(f"--ray-connect-timeout must be positive seconds, found {args.ray_connect_timeout}")
    if args.executor != "ray":
        for flag, value in (("--ray-address", args.ray_address), ("--ray-connect-timeout", args.ray_connect_timeout)):
            if value is not None:
                raise UsageError(f"{flag} needs --executor ray")
        asyncio.run(run_demo(args.checkpoints, duration=args.duration))
        return EXIT_OK
    # Ray loads only here; without it RayExecutor raises ExecutorUnavailableError (exit 2, names the extra).
    from keystate.runtime.ray import RayExecutor

    timeout = {} if args.ray_connect_timeout is None else {"connect_timeout": args.ray_connect_timeout}
    executor = RayExecutor(args.ray_address, num_cpus=None if args.ray_address else 2, **timeout)
    from keystate.runtime.executor import ClusterUnavailableError

    try:
        asyncio.run(run_demo(args.checkpoints, duration=args.duration, executor=executor))
    except ClusterUnavailableError as exc:
        # The executor's message names its Python parameter; here the setting is a flag.
        message = str(exc).replace("(RayExecutor(connect_timeout=...))", "(--ray-connect-timeout)")
        raise ClusterUnavailableError(message, address=exc.address, timeout=exc.timeout) from exc
    finally:
        if sys.modules.get("ray") is not None:
            executor.shutdown()
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, found {text!r}")
    return value


def _storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (overrides AWS_ENDPOINT_URL)")
    p.add_argument(
        "--s3-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=f"give up an S3 request after this long, retries included (overrides {_S3_TIMEOUT_ENV})",
    )


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "location",
        help="checkpoint/savepoint directory (keystate's or Apache Flink's), its _metadata, a job directory or a root",
    )
    p.add_argument("--json", action="store_true", help="one JSON object (a contract, see docs/architecture.md)")
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
    source.add_argument("--topology", metavar="FILE", help="topology file (JSON, see docs/format.md)")
    source.add_argument("--job", metavar="MODULE:FUNCTION", help="import a function returning a JobGraph")
    p.add_argument("--allow-non-restored-state", action="store_true", help="allow dropping state of removed operators")
    p.add_argument(
        "--verify", action="store_true", help="also read and decode every state file (as verify); exit 1 if damaged"
    )
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
    p.add_argument(
        "--executor",
        choices=["embedded", "local", "ray"],
        default="embedded",
        help="where the tasks run: in this process (embedded, also 'local'), or one Ray actor per subtask "
        "(ray; a local Ray cluster with 2 CPUs unless --ray-address is given; needs pip install 'keystate[ray]')",
    )
    p.add_argument("--ray-address", metavar="ADDRESS", help="Ray cluster to run on: auto, host:port or ray://host:port")
    p.add_argument(
        "--ray-connect-timeout",
        type=float,
        metavar="SECONDS",
        help="give up connecting to --ray-address after this long (default 30)",
    )
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


# The "kind" of --json's error object, by error class (name, so that the CLI need not import every
# layer's errors at start-up): the nearest listed class in the error's MRO wins, so a new subclass
# reports its listed ancestor's kind until it is listed itself. A contract (docs/cli.md#errors-with---json):
# add kinds, never rename or remove one.
_ERROR_KINDS = {
    "UsageError": "usage",
    "InvalidURIError": "invalid_uri",
    "CheckpointDiscardedError": "checkpoint_discarded",
    "CheckpointNotFoundError": "checkpoint_not_found",
    "BucketNotFoundError": "bucket_not_found",
    "NotFoundError": "not_found",
    "StorageAccessDeniedError": "storage_access_denied",
    "CredentialsError": "credentials",
    "StorageUnavailableError": "storage_unavailable",
    "UnsafeLinkError": "unsafe_link",
    "StorageError": "storage",
    "UnsupportedFormatVersionError": "unsupported_format_version",
    "UnsafePathError": "unsafe_path",
    "MetadataError": "metadata",
    "ChecksumMismatchError": "checksum_mismatch",
    "StateFileError": "state_file",
    "StateRestoreError": "state_restore",
    "TopologyError": "topology",
    "FormatError": "format",
    "StateError": "state",
    "JobError": "job",
    "KeystateError": "keystate",
}
ERROR_KINDS = (*_ERROR_KINDS.values(), "internal", "interrupted")
"""Every ``kind`` the ``--json`` error object can carry: ``internal`` is a bug of keystate (any other
exception), ``interrupted`` Ctrl-C; ``usage`` also covers a command line argparse refuses."""


def error_kind(exc: BaseException) -> str:
    """The stable snake_case kind of an error for ``--json``'s ``{"error": {"kind", "message"}}``."""
    for cls in type(exc).__mro__:
        kind = _ERROR_KINDS.get(cls.__name__)
        if kind is not None:
            return kind
    return "internal"


def _emit_error(kind: str, message: str) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):  # stdout closed: the stderr line is written
        _emit_json({"error": {"kind": kind, "message": message}})
        sys.stdout.flush()


def _json_requested(argv: list[str]) -> bool:
    """Whether ``--json`` (or an abbreviation argparse would accept, ``--js``...) is on the command line."""
    for arg in argv:
        if arg == "--":
            return False
        if arg.startswith("--js") and ("--json".startswith(arg) or arg.startswith("--json=")):
            return True
    return False


_S3_TIMEOUT_ENV = "KEYSTATE_S3_TIMEOUT"  # keystate.storage._s3.TIMEOUT_ENV, named here so boto3 loads only for S3


class _WarningLine(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self._prog = prog

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._prog}: warning: {_one_line(Exception(record.getMessage()))}"


@contextlib.contextmanager
def _command_environment(args: argparse.Namespace, prog: str) -> Iterator[None]:
    """While a command runs: keystate's warnings as one line each on stderr, and ``--s3-timeout`` in
    effect (it is ``KEYSTATE_S3_TIMEOUT`` for this command)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_WarningLine(prog))
    logger = logging.getLogger("keystate")
    logger.addHandler(handler)
    timeout = getattr(args, "s3_timeout", None)
    previous = os.environ.get(_S3_TIMEOUT_ENV)
    if timeout is not None:
        os.environ[_S3_TIMEOUT_ENV] = repr(timeout)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        if timeout is not None:
            if previous is None:
                os.environ.pop(_S3_TIMEOUT_ENV, None)
            else:
                os.environ[_S3_TIMEOUT_ENV] = previous


def run(argv: list[str] | None = None, prog: str = "keystate", parser: argparse.ArgumentParser | None = None) -> int:
    """Run a command; returns the exit code (never raises, except for SystemExit from argparse).

    With ``--json``, an error also prints one object ``{"error": {"kind", "message"}}`` on stdout (kinds:
    :func:`error_kind`), a usage error too: argparse stops before the options are known, so for it the
    command line is searched for ``--json``.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = (parser or build_parser(prog)).parse_args(argv)
    except _UsageExit as exc:
        if _json_requested(argv):
            _emit_error("usage", exc.message)
        raise
    as_json = bool(getattr(args, "json", False))
    try:
        with _command_environment(args, prog):
            code: int = args.run(args)
    except CheckpointDiscardedError as exc:
        if os.environ.get("KEYSTATE_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        if as_json:
            _emit_error(error_kind(exc), _one_line(exc))
        return EXIT_DISCARDED
    except KeystateError as exc:
        if os.environ.get("KEYSTATE_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        if as_json:
            _emit_error(error_kind(exc), _one_line(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        if as_json:
            _emit_error("interrupted", "interrupted")
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
        if as_json:
            _emit_error("internal", f"{type(exc).__name__}: {_one_line(exc)}")
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
